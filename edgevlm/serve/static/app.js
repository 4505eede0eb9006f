// edgevlm serve web page: plain JS, no dependencies, no build step (served as-is by edgevlm.serve at /app.js).
//
// Flow: the picked image is read into a data URL in the browser (FileReader), sent with the question to
// POST /v1/chat/completions as OpenAI's content parts with stream=true and stream_options.include_usage; the SSE
// response is read with fetch + ReadableStream, one `data: {chunk}` line at a time until `data: [DONE]`. Each chunk's
// choices[0].delta.content is appended to #answer; the final chunk's `timings` (llama-server's field names plus
// edgevlm's preprocess_ms / image_encode_ms / ttft_ms) becomes the latency bar #timings-bar. Errors in OpenAI's shape
// ({"error": {"message", "type", "param", "code"}}), as an HTTP error or as a data line mid-stream, go to #error.
// document.body.dataset.state: "idle" -> "running" -> "done" | "error" (the browser test waits on it).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("ask-form"), imageInput = $("image"), preview = $("preview"), promptInput = $("prompt");
  const sendBtn = $("send"), stopBtn = $("stop"), statusEl = $("status"), errorEl = $("error");
  const answerEl = $("answer"), barEl = $("timings-bar"), legendEl = $("timings-legend");
  const timingsText = $("timings-text"), usageEl = $("usage");

  // The stages drawn in the bar, in request order: [css class, label, ms field, tokens field, tok/s field].
  const STAGES = [
    ["preprocess", "preprocess", "preprocess_ms", null, null],
    ["image", "image encode", "image_encode_ms", null, null],
    ["prefill", "prefill", "prompt_ms", "prompt_n", "prompt_per_second"],
    ["decode", "decode", "predicted_ms", "predicted_n", "predicted_per_second"],
  ];

  let imageDataUrl = null;
  let controller = null;
  let modelId = null;

  function setState(state, text) {
    document.body.dataset.state = state;
    statusEl.textContent = text || "";
    const running = state === "running";
    sendBtn.disabled = running;
    stopBtn.disabled = !running;
  }

  function showError(message) {
    errorEl.textContent = message;
    errorEl.hidden = false;
  }

  function clearOutput() {
    errorEl.hidden = true;
    errorEl.textContent = "";
    answerEl.textContent = "";
    answerEl.dataset.chunks = "0";
    barEl.replaceChildren();
    legendEl.replaceChildren();
    timingsText.textContent = "";
    usageEl.textContent = "";
  }

  function fmtMs(ms) {
    return ms >= 100 ? ms.toFixed(0) + " ms" : ms.toFixed(1) + " ms";
  }

  // An OpenAI-shaped error body (or anything else) -> one line for #error.
  function errorText(status, body) {
    const err = body && typeof body === "object" ? body.error : null;
    if (err && typeof err === "object") {
      const kind = [err.type, err.code].filter((x) => x !== null && x !== undefined && x !== "").join(" / ");
      const param = err.param ? " (param: " + err.param + ")" : "";
      return (status ? "HTTP " + status + " " : "") + (kind ? kind + ": " : "") + (err.message || "error") + param;
    }
    if (typeof body === "string" && body) {
      return (status ? "HTTP " + status + ": " : "") + body.slice(0, 500);
    }
    return status ? "HTTP " + status : "request failed";
  }

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  async function readBody(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch (e) {
      return text;
    }
  }

  // The served model's id from GET /v1/models (once it answers); null when it cannot be listed.
  async function resolveModel() {
    if (modelId) return modelId;
    try {
      const r = await fetch("v1/models", { headers: authHeaders() });
      if (!r.ok) return null;
      const body = await r.json();
      if (body && Array.isArray(body.data) && body.data.length) {
        modelId = body.data[0].id;
        $("model-name").textContent = modelId;
      }
    } catch (e) {
      // not fatal: the request goes without a model name and the server answers for itself
    }
    return modelId;
  }

  function drawTimings(t) {
    barEl.replaceChildren();
    legendEl.replaceChildren();
    const parts = STAGES.map(([cls, label, msKey, nKey, rateKey]) => ({
      cls, label,
      ms: Number(t[msKey]) || 0,
      n: nKey ? t[nKey] : null,
      rate: rateKey ? Number(t[rateKey]) : null,
    })).filter((p) => p.ms > 0 || p.cls === "prefill" || p.cls === "decode");
    const total = parts.reduce((s, p) => s + p.ms, 0) || 1;
    for (const p of parts) {
      let text = p.label + " " + fmtMs(p.ms);
      if (p.rate && isFinite(p.rate)) text += " · " + p.rate.toFixed(1) + " tok/s";
      if (p.n !== null && p.n !== undefined) text += " (" + p.n + " tok)";
      const seg = document.createElement("div");
      seg.className = "segment " + p.cls;
      seg.dataset.stage = p.cls;
      seg.dataset.ms = String(p.ms);
      seg.style.width = (100 * p.ms / total).toFixed(3) + "%";
      seg.title = text;
      const span = document.createElement("span");
      span.textContent = p.label + " " + fmtMs(p.ms);
      seg.appendChild(span);
      barEl.appendChild(seg);

      const item = document.createElement("span");
      item.className = "legend-item";
      const swatch = document.createElement("i");
      swatch.className = "swatch " + p.cls;
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(text));
      legendEl.appendChild(item);
    }
    const extra = [];
    if (t.ttft_ms !== undefined) extra.push("time to first token " + fmtMs(Number(t.ttft_ms)));
    if (t.cache_n !== undefined) extra.push("cached prompt tokens " + t.cache_n);
    if (t.image_cache_hit !== undefined) extra.push("image cache " + (t.image_cache_hit ? "hit" : "miss"));
    timingsText.textContent = extra.join(" · ");
  }

  function drawUsage(u, finishReason) {
    const parts = [];
    if (u) {
      parts.push("prompt " + u.prompt_tokens + " tokens", "completion " + u.completion_tokens,
        "total " + u.total_tokens);
      const cached = u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens;
      if (cached) parts.push(cached + " cached");
    }
    if (finishReason) parts.push("finish: " + finishReason);
    usageEl.textContent = parts.join(" · ");
  }

  // Read an SSE body: calls onData(payload) for each `data:` line's payload, returns when the body ends or after
  // `[DONE]`. Lines may arrive split across reads, with \n or \r\n endings; other SSE fields are ignored.
  async function readSSE(body, onData) {
    const reader = body.getReader();
    try {
      return await readLines(reader, onData);
    } catch (err) {
      reader.cancel().catch(() => {});
      throw err;
    }
  }

  async function readLines(reader, onData) {
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      buf += decoder.decode(value || new Uint8Array(), { stream: !done });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") {
          reader.cancel().catch(() => {});
          return true;
        }
        if (payload) onData(payload);
      }
      if (done) return false;
    }
  }

  imageInput.addEventListener("change", () => {
    imageDataUrl = null;
    preview.hidden = true;
    const file = imageInput.files && imageInput.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      imageDataUrl = reader.result;
      preview.src = imageDataUrl;
      preview.hidden = false;
    };
    reader.onerror = () => showError("could not read the image file: " + (reader.error && reader.error.message));
    reader.readAsDataURL(file);
  });

  // The data URL of the picked file, waiting for the FileReader when the user submits right after picking.
  function pickedImage() {
    const file = imageInput.files && imageInput.files[0];
    if (!file) return Promise.resolve(null);
    if (imageDataUrl) return Promise.resolve(imageDataUrl);
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new Error("could not read the image file"));
      reader.readAsDataURL(file);
    });
  }

  stopBtn.addEventListener("click", () => {
    if (controller) controller.abort();
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearOutput();
    const question = promptInput.value.trim();
    if (!question) {
      showError("type a question first");
      setState("error");
      return;
    }
    setState("running", "sending…");
    controller = new AbortController();
    let finishReason = null, usage = null, timings = null, sawDone = false;
    const started = performance.now();
    try {
      const image = await pickedImage();
      const content = [];
      if (image) content.push({ type: "image_url", image_url: { url: image } });
      content.push({ type: "text", text: question });
      const request = {
        messages: [{ role: "user", content }],
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: Number($("max-tokens").value) || 64,
        temperature: Number($("temperature").value) || 0,
      };
      const model = await resolveModel();
      if (model) request.model = model;

      const response = await fetch("v1/chat/completions", {
        method: "POST",
        headers: Object.assign({ "Content-Type": "application/json", Accept: "text/event-stream" }, authHeaders()),
        body: JSON.stringify(request),
        signal: controller.signal,
      });
      if (!response.ok) {
        throw new Error(errorText(response.status, await readBody(response)));
      }
      const ctype = response.headers.get("content-type") || "";
      if (!ctype.includes("text/event-stream")) {
        // a server that answered without streaming: take the whole completion
        const body = await readBody(response);
        const choice = body && body.choices && body.choices[0];
        answerEl.textContent = (choice && choice.message && choice.message.content) || "";
        finishReason = choice && choice.finish_reason;
        usage = body && body.usage;
        timings = body && body.timings;
        sawDone = true;
      } else {
        statusEl.textContent = "streaming…";
        sawDone = await readSSE(response.body, (payload) => {
          let chunk;
          try {
            chunk = JSON.parse(payload);
          } catch (e) {
            throw new Error("unreadable stream chunk: " + payload.slice(0, 200));
          }
          if (chunk.error) throw new Error(errorText(null, chunk));
          const choice = chunk.choices && chunk.choices[0];
          if (choice) {
            const delta = choice.delta && choice.delta.content;
            if (delta) {
              answerEl.textContent += delta;
              answerEl.dataset.chunks = String(Number(answerEl.dataset.chunks || 0) + 1);
            }
            if (choice.finish_reason) finishReason = choice.finish_reason;
          }
          if (chunk.usage) usage = chunk.usage;
          if (chunk.timings) timings = chunk.timings;
        });
      }
      if (timings) drawTimings(timings);
      else timingsText.textContent = "the server reported no timings";
      drawUsage(usage, finishReason);
      const wall = (performance.now() - started) / 1000;
      setState("done", (sawDone ? "done" : "stream ended without [DONE]") + " in " + wall.toFixed(2) + " s");
    } catch (err) {
      if (err && err.name === "AbortError") {
        setState("done", "stopped");
      } else {
        showError(err && err.message ? err.message : String(err));
        setState("error", "failed");
      }
    } finally {
      controller = null;
    }
  });

  // The model id is asked for at the first request (with the API key), not at load: a keyed server would answer
  // 401 to a key-less call and the console would show it.
  setState("idle");
})();
