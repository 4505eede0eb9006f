"""``edgevlm run BUNDLE --image IMG --prompt TEXT``: answer one request with the torch-free runtime and print the
latency decomposition (MobileVLM's Eq. 4).

    edgevlm run out/tiny-bundle --image cat.png --prompt "What is in the picture?"
    edgevlm run out/tiny-bundle --image cat.png --prompt "Describe it." --stream --temperature 0.7 --seed 0
    edgevlm run out/tiny-bundle --image cat.png --prompt "..." --json-output     # one JSON object
    edgevlm run out/orin-bundle --image cat.png --prompt "..." --backend tensorrt  # the engines of build-engine

``--backend auto|ort|native|tensorrt`` picks the decoder (and, for tensorrt, the vision engine): auto runs the
bundle's TensorRT engines when they were built for this GPU and TensorRT, else the native kernel where it runs, else
ONNX Runtime. The output names the backend that ran vision and the one that ran the decoder.

Imports only numpy / onnxruntime / PIL / tokenizers / rich (no torch): this verb runs on a device install.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Literal

from edgevlm.cli import positional


def _native_path(info: dict[str, Any]) -> str:
    """`` (avx512-vnni, prebuilt, float16 KV)`` where the native kernel decoded: its ISA path and how it was built
    (``native_info``); empty otherwise."""
    parts = [str(info[k]) for k in ("isa", "build") if info.get(k)]
    parts += [f"{info['kv_dtype']} KV"] if info.get("kv_dtype") else []
    return f" ({', '.join(parts)})" if parts else ""


def _table(result: Any, session: Any) -> None:
    from rich import box
    from rich.table import Table

    from edgevlm.console import make_console
    from edgevlm.runtime.timings import eq4_terms

    t = result.timings
    console = make_console()
    parts = Table(title="request", box=box.SIMPLE, title_justify="left")
    for col in ("part", "ms", "detail"):
        parts.add_column(col, justify="left" if col != "ms" else "right")
    parts.add_row("preprocess", f"{t.preprocess_ms:.1f}", "image decode + pad/resize/normalize")
    parts.add_row("tokenize", f"{t.tokenize_ms:.1f}", f"{t.text_tokens} text tokens")
    parts.add_row("vision", f"{t.vision_ms:.1f}", f"{t.visual_tokens} visual tokens, {t.vision_backend}")
    parts.add_row("prefill", f"{t.prefill_ms:.1f}", f"{t.prompt_tokens} tokens, {t.prefill_tok_s:.1f} tok/s")
    parts.add_row("ttft", f"{t.ttft_ms:.1f}", "request start -> first token")
    parts.add_row("decode", f"{t.decode_ms:.1f}", f"{t.decode_steps} steps, {t.decode_tok_s:.1f} tok/s, p50 "
                  f"{t.decode_token_ms_p50:.2f} / p95 {t.decode_token_ms_p95:.2f} ms per token, "
                  f"{t.decoder_backend}{_native_path(session.native_info)}")
    parts.add_row("sampling", f"{t.sampling_ms:.2f}", f"{t.generated_tokens} tokens")
    parts.add_row("detokenize", f"{t.detokenize_ms:.2f}", "incremental decode + stop strings")
    parts.add_row("other", f"{t.other_ms:.2f}", "not in a measured part")
    parts.add_row("total", f"{t.total_ms:.1f}", f"peak RSS {t.peak_rss_mb:.0f} MiB, {t.threads} threads, CPU "
                  f"{t.cpu_ms:.0f} ms ({t.decode_cpu_ms_per_token:.2f} ms per decode step)")
    console.print(parts)

    # the formula on its own line: as the table's title it would wrap to the (narrower) table's width
    console.print("Eq. 4: total ≈ load + Tks_in / v_prompt + Tks_out / v_sample + (Tks_out - 1) / v_decode + others",
                  highlight=False, soft_wrap=True)
    eq = Table(box=box.SIMPLE)
    eq.add_column("term")
    eq.add_column("s", justify="right")
    eq.add_column("value")
    rows = eq4_terms(t)
    for r in rows:
        eq.add_row(r["term"], f"{r['seconds']:.4f}", r["formula"])
    eq.add_row("sum", f"{sum(r['seconds'] for r in rows):.4f}", "sum of the terms")
    eq.add_row("measured", f"{t.load_s + t.total_ms / 1e3:.4f}",
               f"load {t.load_s:.3f} s + request {t.total_ms / 1e3:.4f} s (wall clock)")
    console.print(eq)
    caches = ", ".join(f"{k}: {v.cache}" for k, v in session.session_info.items())
    console.print("load breakdown: " + ", ".join(f"{k} {v:.3f}" for k, v in t.load_breakdown.items())
                  + f" (optimized-graph cache {caches}; sha256 {session.verification})", soft_wrap=True)


@positional("bundle")
def run(bundle: str, image: str, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
        top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None, threads: int | None = None,
        provider: list[str] | None = None, stream: bool = False, json_output: bool = False, raw_prompt: bool = False,
        verify: bool = True, cache: bool = False, cache_dir: str | None = None, warmup: bool = False,
        spinning: bool = False, profile_dir: str | None = None,
        backend: Literal["auto", "ort", "native", "tensorrt"] = "auto",
        native_decode: Literal["auto", "on", "off"] = "auto",
        native_kv: Literal["float16", "float32"] = "float16") -> int:
    """Answer one image question with a bundle (numpy + ONNX Runtime, no torch) and print the latency decomposition.

    The table splits the request into preprocess / tokenize / vision / prefill / decode / sampling and lays them
    out as MobileVLM's Eq. 4: total ≈ load + Tks_in / v_prompt + Tks_out / v_sample + (Tks_out - 1) / v_decode +
    others, next to the measured total.

    Args:
        bundle: the bundle directory (written by `edgevlm export`).
        image: the image file.
        prompt: the question (the bundle's prompt template is applied), or a full prompt that holds <image>.
        max_new_tokens: at most this many generated tokens.
        temperature: 0 = greedy; > 0 samples.
        top_k: keep the k most likely tokens when sampling (0 = off).
        top_p: nucleus sampling mass (1 = off).
        seed: random seed for sampling.
        stop: extra stop strings (the bundle's, e.g. </s>, always apply).
        threads: ONNX Runtime intra-op threads (default: physical cores).
        provider: execution providers in priority order: cpu (default), cuda, tensorrt.
        stream: print the answer as it is generated.
        json_output: print one JSON object (answer, tokens, timings) instead of text and tables.
        raw_prompt: use --prompt verbatim (no template); it must contain <image>.
        verify: check every bundle file's sha256 on load (files verified before and unchanged since are not
            hashed again; --no-verify skips hashing).
        cache: keep ORT-optimized graphs in a cache and load them from it (off by default: on the project's
            machine loading is dominated by reading and prepacking weights, not by graph optimization).
        cache_dir: where optimized ORT graphs are cached (implies --cache; default $EDGEVLM_CACHE/ort or
            ~/.cache/edgevlm/ort).
        warmup: run one tiny request before the measured one (first-run allocations excluded).
        spinning: let ORT worker threads spin between parallel sections (off by default, as in `edgevlm bench`:
            on a quiet machine it gave +7 % decode, 23.2 vs 21.7 tok/s, but with other processes on the cores it
            halved it, 2.7 vs 4.9 tok/s, docs/runtime.md; --spinning on a dedicated device).
        profile_dir: write ONNX Runtime profiles (JSON traces) into this directory.
        backend: auto (default): the bundle's TensorRT engines when they were built for this GPU and the installed
            TensorRT, else the native kernel where it runs, else ONNX Runtime; ort: ONNX Runtime (--provider
            picks cpu / cuda); native: ONNX Runtime prefill + the native kernel's decode steps (an error where it
            cannot run); tensorrt: the engines built by `edgevlm build-engine` (an error naming the package where
            tensorrt is not installed, or the fix where the engines belong to another GPU / TensorRT).
        native_decode: the older switch, used with --backend auto: auto (default): decode steps on edgevlm's
            native int4/int8 kernel when the bundle has a native_decode plan and this CPU runs it (x86-64 with
            AVX-512 VNNI or AVX2 + FMA, ARM64 with the dot product; prebuilt at install, else compiled on demand),
            else on ONNX Runtime; on: as --backend native; off: as --backend ort.
        native_kv: what the native kernel's attention reads: float16 (default; an fp16 copy of the KV cache, half
            the bytes per step) or float32 (ONNX Runtime's own buffers).
    """
    from edgevlm.preprocess import check_image_path
    from edgevlm.runtime import Session

    check_image_path(image)                 # a directory or a typo fails here, before the bundle is loaded
    cache_opt: Any = (cache_dir or "auto") if (cache or cache_dir) else None
    session = Session.from_bundle(bundle, threads=threads, providers=provider, verify_hashes=verify,
                                  optimized_cache=cache_opt, spinning=spinning, profile_dir=profile_dir, warmup=warmup,
                                  native_decode=native_decode, native_kv=native_kv, backend=backend)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  stop=stop, raw_prompt=raw_prompt)
    if stream and not json_output:
        def emit(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()
        result = session.generate(image, prompt, stream=emit, **kwargs)
        sys.stdout.write("\n")
    else:
        result = session.generate(image, prompt, **kwargs)
    profiles = session.end_profiling() if profile_dir else []
    if json_output:
        out = result.to_dict()
        out["bundle"] = str(bundle)
        out["model"] = session.config.name
        out["backends"] = {"vision": session.vision_backend, "decoder": session.decoder_backend}
        out["load_info"] = {k: v.to_dict() for k, v in session.session_info.items()}
        out["load_info"]["sha256"] = session.verification
        out["load_info"]["native_decode"] = session.native_info
        out["backend_info"] = session.info()
        if profiles:
            out["profiles"] = profiles
        print(json.dumps(out, default=str))
        return 0
    if not stream:
        print(result.text)
    print(f"[{result.finish_reason}: {len(result.tokens)} tokens] vision: {session.vision_backend}, decoder: "
          f"{session.decoder_backend}{_native_path(session.native_info)}")
    _table(result, session)
    for p in profiles:
        print(f"ORT profile: {p}")
    return 0


COMMANDS = {"run": run}
