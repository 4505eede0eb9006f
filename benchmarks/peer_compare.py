"""llama.cpp vs edgevlm on the same MobileVLM-1.7B weights: load, vision, prefill, decode and end to end, interleaved,
each run in a process of its own, medians over ``--repeats``, ratios, the decode roofline measured in the same run.

    python benchmarks/peer_compare.py --llama-build LLAMA_BUILD --checkpoint CKPT --repeats 3 --threads 2 \\
        --gguf-dir GGUF_DIR --bundle BUNDLE          # converts / exports what is missing, then measures

**Inputs, nothing downloaded.** ``--checkpoint``: a MobileVLM-1.7B checkpoint in the released format (config.json,
sharded fp16 safetensors, tokenizer). The committed result used random weights made by
``python benchmarks/export_full.py --model mobilevlm-1.7b --make-checkpoint CKPT`` (timing does not depend on the
weights' values; the tokenizer is edgevlm's stand-in BPE). ``--llama-build``: a CMake build directory of llama.cpp
with ``llama-bench``, ``llama-mtmd-cli`` and ``llama-quantize``; its source tree (found through ``CMakeCache.txt``, or
``--llama-src``) provides the converters and the ``gguf`` package (the conversion also needs ``edgevlm[export]``:
torch, transformers, safetensors, sentencepiece). llama.cpp is on PyPI as ``llama-cpp-python``, whose sdist vendors
the tree:

    pip download llama-cpp-python --no-binary :all: --no-deps -d SRC && tar xzf SRC/llama_cpp_python-*.tar.gz -C SRC
    cmake -S SRC/llama_cpp_python-*/vendor/llama.cpp -B LLAMA_BUILD -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build LLAMA_BUILD -j2 --target llama-bench llama-mtmd-cli llama-quantize

**Conversion (llama.cpp's own tools; reused from ``--gguf-dir`` when its stamp matches the checkpoint and tree).**
The LLM: ``convert_hf_to_gguf.py`` (f16) on a directory that presents the checkpoint's language model as a plain
``LlamaForCausalLM`` (config.json rewritten, the shards linked: the converter skips ``vision_*`` / ``projector.``
tensors itself) with a SentencePiece ``tokenizer.model`` written from the checkpoint's tokenizer.json (same pieces;
BPE merge rank -> piece score; the converter pads the vocabulary to the 32000 rows of the embedding), then
``llama-quantize ... Q4_0`` (``--llm-quant``). The mmproj: what ``tools/mtmd/legacy-models/llava_surgery.py`` does
(the ``model.mm_projector.*`` tensors, float32, ``torch.save``d to ``llava.projector``; it reads only
``pytorch_model*.bin``, this checkpoint is safetensors), the CLIP tower written as a Hugging Face ``CLIPVisionModel``
directory (``vision_model.*`` keys, ``projection_dim`` 768 added for the converter), then
``convert_image_encoder_to_gguf.py --clip-model-is-vision --llava-projector ... --projector-type ldp`` (f16, the
MobileVLM doc's recipe). That converter was written for transformers 4 (``model.vision_model.encoder.layers``); under
transformers >= 5, whose ``CLIPVisionModel`` has no ``vision_model`` child, it runs with ``CLIPVisionModel`` replaced
by a wrapper holding the real model as ``vision_model`` (same state-dict keys as transformers 4; nothing else changed).

**edgevlm side.** ``--bundle``: an int4 CPU bundle of the same checkpoint; when it does not exist it is made with
``edgevlm quantize FP32 --precision int4`` from ``--fp32-bundle`` or else ``edgevlm export --checkpoint CKPT
--precision int4`` (~7 min). Runtime defaults (native int4 decode kernel where the CPU runs it, ``edgevlm run``'s
settings), ``--threads`` intra-op threads.

**Workload.** One request = a distinct 336x336 synthetic image (``edgevlm.bench.workload.make_image``; the same
image for both tools within a repetition, PNG for llama.cpp) + a prompt of exactly ``--prompt-tokens`` (192) LLM
positions: 144 visual + the text (BOS, template, filler), fitted per tool by its own tokenizer (llama.cpp: the
``--chat-template deepseek`` text around the image, fitted by running it; edgevlm: ``<image>\\n`` + filler, raw, via
``fit_prompt``) + ``--new-tokens`` (64) greedy tokens with EOS ignored (llama.cpp ``--ignore-eos``; its
``deepseek`` template still stops at a generated ``###``: the run records the count and a short run is reported).

Per repetition (the order of the two tools alternates between repetitions):
  * llama.cpp: ``llama-mtmd-cli`` with the image and prompt (one process: load + its built-in warm-up, which runs
    the LLM on two tokens and only reserves the CLIP graph's memory; then the one request), then
    ``llama-bench -o json -r 1 -t T`` (warm: it runs each test once unmeasured first): ``-p P -n 0`` (prefill, pp at
    depth 0) and ``-p 0 -n N -d 0,P`` (tg at depth 0 and after a P-token prompt);
  * edgevlm: one worker process: ``Session.from_bundle`` (the runtime's defaults: no warm-up), the first request on
    the repetition's image (the cold-process request), then a second request on another image (warm).

Stages (table): **load** = spawn -> ready, the wall clock from the process start to the request's start (llama.cpp:
the ``encoding mtmd batch`` line; edgevlm: the worker's READY line after ``Session.from_bundle``; both include the
interpreter / binary start and reading both models; the tools' own load figures are kept too); **vision** =
CLIP-L/336 + LDP encode (llama.cpp ``mtmd batch encoding done in`` / ``image slice encoded in`` of its request;
edgevlm ``vision_ms`` of the warm request); **prefill** = prompt tok/s over P positions (llama.cpp: ``llama-bench``
pp; edgevlm: the warm request's prefill); **decode** = tok/s (llama.cpp: ``llama-bench`` tg at depth P, i.e. at the
context the request decodes at; edgevlm: the warm request's decode steps); **end to end** = the first request of a
fresh process, ready -> last token (llama.cpp: its request up to the perf summary; edgevlm: READY -> DONE). Kept as
secondary figures: the cold start (spawn -> end of the first request), the tools' own load figures, both tools'
first-request vision / prefill / decode (llama.cpp: its request's prompt eval minus the CLIP encode that
llama_perf's window spans, and its ``eval`` rate), llama-bench tg at depth 0, peak RSS. Ratios are edgevlm /
llama.cpp: for times below 1 means edgevlm is faster, for rates above 1.

**Roofline** (measured in this run): read bandwidth (``edgevlm.bench.env.bandwidth``, the probe ``edgevlm bench`` and
``runtime_compare.py`` use; the median of 3 probes before and 3 after the repetitions, because a single probe on this
VM sometimes reads far above the others) / bytes read per generated token: llama.cpp = the GGUF's tensors except
``token_embd`` (a row gather) + its f16 KV cache at the mean decode context; edgevlm = the decoder's files (int4
weights, 8-bit LM head) + the fp16 KV copy the native kernel reads. The probe is numpy's best streaming read
(``np.sum`` / ``np.dot``, 1 and N threads), not the machine's ceiling: a kernel can exceed it.

Output: ``benchmarks/results/peer_compare_<cpu-slug>.json`` (environment: CPU model, ISA flags, cores, RAM, versions,
llama.cpp build info, the load average and the CPU time other processes used during every process (a repetition
during which they used more than 5 % of a core is run again, ``--retry-shared``); every run; medians; ratios;
rooflines; the reference table) and ``.md``; machine paths are written as placeholders (CKPT, LLAMA_BUILD,
LLAMA_SRC, GGUF_DIR, BUNDLE, LOGS, TMP). One JSON line is printed last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:                     # run as a script from anywhere: the checkout's edgevlm
    sys.path.insert(0, str(ROOT))

#: the targets `cmake --build` must have built
REQUIRED_BINARIES = ("llama-bench", "llama-mtmd-cli", "llama-quantize")
#: the converters (relative to the llama.cpp source tree)
LLM_CONVERTER = "convert_hf_to_gguf.py"
CLIP_CONVERTER = "tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py"
GGUF_PY = "gguf-py"
#: a run during which the rest of the machine used more than this many cores on average is flagged in the notes
OTHER_CPU_LIMIT = 0.05
#: read-bandwidth probes before and after the repetitions (the roofline divides their median)
BANDWIDTH_PROBES = 3
VISUAL_TOKENS = 144                                # LDP: 24x24 patches -> 12x12
CHAT_TEMPLATE = "deepseek"                        # llama.cpp's docs/multimodal/MobileVLM.md
FILLER = ("describe the picture in detail what colour is each shape and where does it sit relative to other "
          "objects near the edge of the image how many are there").split()

#: The issue's table, measured earlier on another machine (2-core AMD EPYC Zen 3, AVX2; llama.cpp Q4_0 LLM + f16 LDP
#: mmproj via llama-mtmd-cli / llama-bench pp / tg64; edgevlm int4 bundle). Kept beside this run's numbers.
REFERENCE = {
    "machine": "2-core AMD EPYC Zen 3 (AVX2)",
    "vision_ms": {"llama.cpp": 2664, "edgevlm": 1973},
    "prefill_tok_s": {"llama.cpp": 64.2, "edgevlm": 73.7},
    "decode_tok_s": {"llama.cpp": 29.3, "edgevlm": 25.3},
    "load_s": {"llama.cpp": 0.87, "edgevlm": 1.70},
    "e2e_s": {"llama.cpp": 8.77, "edgevlm": 7.10},
}

#: table rows: key, label, unit, kind ("time": lower is better, "rate": higher is better)
STAGES = (("load_s", "load (spawn -> ready)", "s", "time"),
          ("vision_ms", "vision (CLIP-L/336 + LDP)", "ms", "time"),
          ("prefill_tok_s", "prefill", "tok/s", "rate"),
          ("decode_tok_s", "decode", "tok/s", "rate"),
          ("e2e_s", "end to end (request)", "s", "time"))


class PeerCompareError(SystemExit):
    """A failure with the fix in the message (exits 2)."""

    def __init__(self, msg: str) -> None:
        super().__init__(f"peer_compare: {msg}")


# ==== output parsers (unit-tested on captured output: tests/test_peer_compare.py) ===================================
_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_MTMD_PATTERNS: dict[str, re.Pattern[str]] = {
    "image_encode_ms": re.compile(rf"(?:mtmd batch encoding done in|image slice encoded in)\s+{_NUM}\s*ms"),
    "image_decode_ms": re.compile(rf"image decoded \(batch \d+/\d+\) in\s+{_NUM}\s*ms"),
    "load_ms": re.compile(rf"llama_perf_context_print:\s+load time\s*=\s*{_NUM}\s*ms"),
    "prompt_eval_ms": re.compile(rf"llama_perf_context_print:\s+prompt eval time\s*=\s*{_NUM}\s*ms\s*/\s*(\d+)\s+tokens"),
    "eval_ms": re.compile(rf"llama_perf_context_print:\s+eval time\s*=\s*{_NUM}\s*ms\s*/\s*(\d+)\s+runs"),
    "total_ms": re.compile(rf"llama_perf_context_print:\s+total time\s*=\s*{_NUM}\s*ms\s*/\s*(\d+)\s+tokens"),
    "sampling_ms": re.compile(rf"common_perf_print:\s+sampling time\s*=\s*{_NUM}\s*ms"),
}
#: a line that marks the start of the request in llama-mtmd-cli's log (load and warm-up are over)
MTMD_READY = re.compile(r"main: loading model:|encoding mtmd batch|encoding image slice")
#: the first line printed after the last token (the perf summary)
MTMD_DONE = re.compile(r"common_perf_print|llama_perf_(?:context|sampler)_print")


def parse_mtmd_log(text: str) -> dict[str, Any]:
    """Timings from ``llama-mtmd-cli``'s log (stdout + stderr): image encode / image-embedding decode ms, the
    ``llama_perf_context_print`` load, prompt eval (ms, tokens), eval (ms, runs), total; derived tok/s. Raises
    ValueError when the image encode or the perf lines are missing (the run did not finish a request)."""
    out: dict[str, Any] = {}
    for key, pat in _MTMD_PATTERNS.items():
        hits = pat.findall(text)
        if not hits:
            continue
        last = hits[-1]
        if isinstance(last, tuple):
            out[key] = float(last[0])
            out[{"prompt_eval_ms": "prompt_tokens", "eval_ms": "eval_runs", "total_ms": "total_tokens"}[key]] = \
                int(last[1])
        else:
            out[key] = float(last)
        if key == "image_encode_ms":
            out["image_encodes"] = len(hits)
    missing = [k for k in ("image_encode_ms", "prompt_eval_ms", "eval_ms") if k not in out]
    if missing:
        raise ValueError(f"llama-mtmd-cli output lacks {', '.join(missing)} (did the request run?)")
    # llama_perf's prompt-eval window opens at the first text chunk's decode and closes at the first synchronize
    # (after the image-embedding batch), so it spans the CLIP encode run in between: subtract it
    pe = out["prompt_eval_ms"]
    if pe > out["image_encode_ms"]:
        pe -= out["image_encode_ms"]
        out["prefill_excludes_encode"] = True
    out["prefill_ms"] = pe
    out["prefill_tok_s"] = out["prompt_tokens"] / (pe / 1e3) if pe else 0.0
    out["decode_tok_s"] = out["eval_runs"] / (out["eval_ms"] / 1e3) if out["eval_ms"] else 0.0
    m = re.search(r"system_info:\s*(.*)", text)
    if m:
        out["system_info"] = m.group(1).strip()
    return out


def parse_llama_bench_json(text: str) -> list[dict[str, Any]]:
    """The records of ``llama-bench -o json`` (a JSON array; log lines around it are ignored), each reduced to the
    fields the comparison uses, plus ``test`` ("pp192", "tg64@d192")."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise ValueError("no JSON array in llama-bench output")
    rows = json.loads(text[start:end + 1])
    keep = ("build_commit", "build_number", "cpu_info", "backends", "model_filename", "model_type", "model_size",
            "model_n_params", "n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "flash_attn", "repack", "poll",
            "load_mode", "n_prompt",
            "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts")
    out = []
    for r in rows:
        row = {k: r[k] for k in keep if k in r}
        n_p, n_g, d = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0)), int(r.get("n_depth", 0))
        test = f"pp{n_p}" if n_g == 0 else f"tg{n_g}" if n_p == 0 else f"pp{n_p}+tg{n_g}"
        row["test"] = test + (f"@d{d}" if d else "")
        out.append(row)
    return out


def bench_rate(rows: Sequence[dict[str, Any]], test: str) -> float | None:
    """``avg_ts`` of the llama-bench record named ``test`` (``parse_llama_bench_json``), None if absent."""
    for r in rows:
        if r["test"] == test:
            return float(r["avg_ts"])
    return None


# ==== statistics and the table (unit-tested) ========================================================================
def median(xs: Sequence[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return float(statistics.median(vals)) if vals else None


def ratio_row(key: str, label: str, unit: str, kind: str, llama: float | None, edge: float | None) -> dict[str, Any]:
    """One table row: medians, ratio edgevlm / llama.cpp, and which side is faster (times: lower wins; rates:
    higher wins)."""
    row: dict[str, Any] = {"stage": key, "label": label, "unit": unit, "kind": kind, "llama.cpp": llama,
                           "edgevlm": edge, "ratio": None, "faster": None}
    if llama and edge:
        r = edge / llama
        row["ratio"] = r
        edge_wins = r < 1 if kind == "time" else r > 1
        row["faster"] = "edgevlm" if edge_wins else "llama.cpp" if r != 1 else "tie"
        if kind == "time":
            row["ratio_text"] = f"{r:.2f}x time" + ("" if edge_wins else f" ({r:.1f}x slower)" if r >= 1.5 else "")
        else:
            row["ratio_text"] = f"{r:.2f}x"
    return row


def summary_table(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over the repetitions of each stage for both tools -> rows (``ratio_row``). ``runs``: one dict per
    repetition with ``llama.cpp`` and ``edgevlm`` dicts holding the STAGES keys (None where a run failed)."""
    rows = []
    for key, label, unit, kind in STAGES:
        ll = median([(r.get("llama.cpp") or {}).get(key) for r in runs])
        ed = median([(r.get("edgevlm") or {}).get(key) for r in runs])
        rows.append(ratio_row(key, label, unit, kind, ll, ed))
    return rows


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "ms":
        return f"{v:.0f} ms"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:.1f} {unit}"


def markdown_table(rows: Sequence[dict[str, Any]], roofline: dict[str, Any] | None = None) -> str:
    lines = ["| stage | llama.cpp | edgevlm | ratio (edgevlm / llama.cpp) | faster |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {_fmt(r['llama.cpp'], r['unit'])} | {_fmt(r['edgevlm'], r['unit'])} | "
                     f"{r.get('ratio_text', 'n/a')} | {r['faster'] or 'n/a'} |")
    if roofline:
        ll, ed = roofline.get("llama.cpp") or {}, roofline.get("edgevlm") or {}
        lines.append(f"| decode roofline (median read BW / bytes per token) | {_fmt(ll.get('bound_tok_s'), 'tok/s')} "
                     f"({_pct(ll.get('fraction'))}) | {_fmt(ed.get('bound_tok_s'), 'tok/s')} "
                     f"({_pct(ed.get('fraction'))}) | | |")
        if ll.get("bound_at_max_probe_tok_s"):
            lines.append(f"| decode roofline at the fastest probe | {_fmt(ll['bound_at_max_probe_tok_s'], 'tok/s')} "
                         f"({_pct(ll.get('fraction_of_max_probe'))}) | "
                         f"{_fmt(ed.get('bound_at_max_probe_tok_s'), 'tok/s')} "
                         f"({_pct(ed.get('fraction_of_max_probe'))}) | | |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} % reached"


# ==== llama.cpp build and source tree ===============================================================================
def find_binaries(build: Path) -> dict[str, Path]:
    """The REQUIRED_BINARIES in ``build/bin`` (or ``build``); a missing one raises with the command to build it."""
    out, missing = {}, []
    for name in REQUIRED_BINARIES:
        for cand in (build / "bin" / name, build / name):
            if cand.is_file() and os.access(cand, os.X_OK):
                out[name] = cand
                break
        else:
            missing.append(name)
    if missing:
        raise PeerCompareError(
            f"{build} lacks {', '.join(missing)}; build them: cmake --build {build} -j2 --target "
            f"{' '.join(REQUIRED_BINARIES)} (configure a CPU Release build first: cmake -S LLAMA_SRC -B {build} "
            f"-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF)")
    return out


def find_source(build: Path, explicit: str | None) -> Path:
    """The llama.cpp source tree: ``--llama-src`` or ``CMAKE_HOME_DIRECTORY`` from the build's CMakeCache.txt."""
    src = Path(explicit) if explicit else None
    if src is None:
        cache = build / "CMakeCache.txt"
        if cache.is_file():
            m = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache.read_text(errors="replace"), re.M)
            if m:
                src = Path(m.group(1).strip())
    if src is None:
        raise PeerCompareError(f"cannot find the llama.cpp source tree of {build} (no CMakeCache.txt); pass "
                               f"--llama-src DIR")
    missing = [p for p in (LLM_CONVERTER, CLIP_CONVERTER, GGUF_PY) if not (src / p).exists()]
    if missing:
        raise PeerCompareError(f"{src} is not a llama.cpp source tree with the converters (missing "
                               f"{', '.join(missing)}); pass --llama-src DIR")
    return src


def build_info(bins: dict[str, Path], build: Path) -> dict[str, Any]:
    """``--version`` of the binaries, the ggml version/commit and the compile flags from CMakeCache.txt."""
    info: dict[str, Any] = {}
    try:
        p = subprocess.run([str(bins["llama-bench"]), "--version"], capture_output=True, text=True, timeout=30)
        text = (p.stdout + p.stderr).strip()
        info["version"] = text.splitlines()[0] if text else None
        m = re.search(r"version:\s*(\S+)\s*\(build\s*(\d+),\s*commit\s*([0-9a-f]+)\)", text)
        if m:
            info["ggml_version"], info["build_number"], info["build_commit"] = m.group(1), int(m.group(2)), m.group(3)
        else:
            m = re.search(r"version:\s*(\d+)\s*\(([0-9a-f]+)\)", text)
            if m:
                info["build_number"], info["build_commit"] = int(m.group(1)), m.group(2)
        m = re.search(r"built with (.*)", text)
        if m:
            info["compiler"] = m.group(1).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["version_error"] = str(exc)
    cache = build / "CMakeCache.txt"
    if cache.is_file():
        text = cache.read_text(errors="replace")
        for key in ("CMAKE_BUILD_TYPE", "GGML_NATIVE", "LLAMA_CURL", "BUILD_SHARED_LIBS", "GGML_AVX512", "GGML_AVX2",
                    "GGML_OPENMP", "CMAKE_C_COMPILER", "CMAKE_CXX_COMPILER"):
            m = re.search(rf"^{key}:[A-Z]+=(.*)$", text, re.M)
            if m:
                info.setdefault("cmake", {})[key] = m.group(1).strip()
    return info


# ==== conversion ===================================================================================================
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_fingerprint(ckpt: Path) -> dict[str, Any]:
    """Hashes of the small files + size/mtime of the weight shards (what the GGUF files are reused against)."""
    fp: dict[str, Any] = {}
    for name in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model"):
        if (ckpt / name).is_file():
            fp[name] = _sha256(ckpt / name)
    for f in sorted(ckpt.glob("*.safetensors")):
        st = f.stat()
        fp[f.name] = [st.st_size, int(st.st_mtime)]
    return fp


def _checkpoint_tensors(ckpt: Path) -> dict[str, Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        return {k: ckpt / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = ckpt / "model.safetensors"
    if not single.is_file():
        raise PeerCompareError(f"{ckpt} has no model.safetensors(.index.json); make one with: python "
                               f"benchmarks/export_full.py --model mobilevlm-1.7b --make-checkpoint {ckpt}")
    from safetensors import safe_open

    with safe_open(str(single), framework="np") as h:
        return {k: single for k in h.keys()}


def _read_tensors(where: dict[str, Path], names: Sequence[str]) -> dict[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(where[n], []).append(n)
    for f, ns in by_file.items():
        with safe_open(str(f), framework="np") as h:
            for n in ns:
                out[n] = h.get_tensor(n)
    return out


def sentencepiece_from_tokenizer_json(tj: dict[str, Any]) -> bytes:
    """A SentencePiece BPE ``tokenizer.model`` with the pieces of a Metaspace BPE ``tokenizer.json`` (LLaMA style),
    id for id: a merged piece scores ``-rank`` of the merge that makes it (SentencePiece merges the highest score
    first, HF BPE the lowest rank), single characters score below every merge, ``<unk>`` / special tokens keep their
    types. Used because llama.cpp's converter reads SentencePiece (and pads to the model's vocab_size) but refuses a
    BPE tokenizer.json without byte fallback."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = tj["model"]
    if model.get("type") != "BPE":
        raise PeerCompareError(f"tokenizer.json model type {model.get('type')!r}: only BPE is converted; give the "
                               f"checkpoint a tokenizer.model")
    merges = model.get("merges") or []
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        rank.setdefault(a + b, r)
    specials = {t["id"] for t in tj.get("added_tokens", []) if t.get("special")}
    unk = model.get("unk_token")
    proto = pb.ModelProto()
    for piece, idx in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        if idx != len(proto.pieces):
            raise PeerCompareError(f"tokenizer.json vocabulary has a gap at id {len(proto.pieces)}")
        p = proto.pieces.add()
        p.piece = piece
        if piece == unk:
            p.type, p.score = pb.ModelProto.SentencePiece.UNKNOWN, 0.0
        elif idx in specials:
            p.type, p.score = pb.ModelProto.SentencePiece.CONTROL, 0.0
        else:
            p.type = pb.ModelProto.SentencePiece.NORMAL
            p.score = -float(rank[piece]) if piece in rank else -float(len(merges) + 1)
    ids = model["vocab"]
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(proto.pieces)
    ts.unk_id = ids.get(unk, 0) if unk else 0
    ts.bos_id = ids.get("<s>", -1)
    ts.eos_id = ids.get("</s>", -1)
    ts.pad_id = -1
    ts.byte_fallback = bool(model.get("byte_fallback", False))
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()


_LLM_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                    "rope_scaling", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                    "pad_token_id", "torch_dtype", "attention_bias", "mlp_bias", "head_dim")


def write_llm_dir(ckpt: Path, dest: Path) -> Path:
    """``dest`` = the checkpoint's language model as a plain Llama checkpoint for ``convert_hf_to_gguf.py``."""
    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    llm = {k: cfg[k] for k in _LLM_CONFIG_KEYS if k in cfg}
    llm.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    (dest / "config.json").write_text(json.dumps(llm, indent=2))
    for f in [*ckpt.glob("*.safetensors"), ckpt / "model.safetensors.index.json"]:
        if f.is_file():
            link = dest / f.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(f.resolve())
    if (ckpt / "tokenizer.model").is_file():
        shutil.copyfile(ckpt / "tokenizer.model", dest / "tokenizer.model")
    elif (ckpt / "tokenizer.json").is_file():
        (dest / "tokenizer.model").write_bytes(
            sentencepiece_from_tokenizer_json(json.loads((ckpt / "tokenizer.json").read_text())))
    else:
        raise PeerCompareError(f"{ckpt} has neither tokenizer.model nor tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, dest / name)
    return dest


def write_clip_dir(ckpt: Path, dest: Path) -> tuple[Path, Path]:
    """``dest/clip`` = the CLIP tower as a HF ``CLIPVisionModel`` directory, ``dest/llava.projector`` = the LDP
    tensors (``llava_surgery.py``'s output: ``model.mm_projector.*`` names, float32, ``torch.save``)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    cfg = json.loads((ckpt / "config.json").read_text())
    where = _checkpoint_tensors(ckpt)
    vis_prefix = "model.vision_tower.vision_tower."
    vis = [k for k in where if k.startswith(vis_prefix)]
    proj = [k for k in where if k.startswith("model.mm_projector.")]
    if not vis or not proj:
        raise PeerCompareError(f"{ckpt} lacks the vision tower ({vis_prefix}*) or the projector "
                               f"(model.mm_projector.*) tensors: not a MobileVLM checkpoint with its CLIP weights")
    if cfg.get("mm_projector_type", "ldpnet") not in ("ldpnet",):
        raise PeerCompareError(f"mm_projector_type {cfg.get('mm_projector_type')!r}: this comparison converts LDP "
                               f"(ldpnet, MobileVLM v1) only")
    clip = dest / "clip"
    clip.mkdir(parents=True, exist_ok=True)
    tensors = _read_tensors(where, vis)
    save_file({k[len(vis_prefix):]: np.ascontiguousarray(v.astype(np.float32)) for k, v in tensors.items()},
              str(clip / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    v = (cfg.get("edgevlm") or {}).get("vision_config") or {}
    clip_cfg = {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
                "hidden_size": v.get("hidden_size", cfg.get("mm_hidden_size", 1024)),
                "intermediate_size": v.get("intermediate_size", 4096),
                "num_hidden_layers": v.get("num_layers", 24), "num_attention_heads": v.get("num_heads", 16),
                "image_size": v.get("image_size", 336), "patch_size": v.get("patch_size", 14),
                "hidden_act": v.get("hidden_act", "quick_gelu"), "layer_norm_eps": v.get("layer_norm_eps", 1e-5),
                "num_channels": 3, "projection_dim": 768, "torch_dtype": "float32"}
    (clip / "config.json").write_text(json.dumps(clip_cfg, indent=2))
    ptensors = _read_tensors(where, proj)
    projector = dest / "llava.projector"
    torch.save({k: torch.from_numpy(np.ascontiguousarray(a)).float() for k, a in ptensors.items()}, projector)
    return clip, projector


#: runs the legacy CLIP converter; under transformers >= 5 CLIPVisionModel is wrapped so that the converter finds
#: ``model.vision_model`` and ``vision_model.*`` state-dict keys as in transformers 4 (nothing else changes)
_CLIP_SHIM = r'''
import runpy, sys
import torch, transformers
if int(transformers.__version__.split(".")[0]) >= 5:
    # patched where it is defined, before anything resolves transformers.CLIPVisionModel (the lazy module caches it)
    import transformers.models.clip.modeling_clip as modeling_clip
    _Real = modeling_clip.CLIPVisionModel

    class CLIPVisionModel(torch.nn.Module):
        """transformers-4 layout over the transformers-5 class (which has no ``vision_model`` child)."""

        @classmethod
        def from_pretrained(cls, path, **kw):
            m = cls()
            m.vision_model = _Real.from_pretrained(path, **kw)
            return m

    modeling_clip.CLIPVisionModel = CLIPVisionModel
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def _run_checked(cmd: Sequence[str], what: str, env: dict[str, str] | None = None, timeout: float = 3600,
                 log: Path | None = None) -> str:
    t = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    text = p.stdout + p.stderr
    if log is not None:
        log.write_text(text)
    if p.returncode != 0:
        raise PeerCompareError(f"{what} failed (exit {p.returncode}):\n{text[-3000:]}")
    print(f"  {what}: {time.perf_counter() - t:.0f} s", flush=True)
    return text


def convert(ckpt: Path, src: Path, bins: dict[str, Path], gguf_dir: Path, quant: str, threads: int,
            force: bool = False) -> dict[str, Any]:
    """GGUF files of the checkpoint in ``gguf_dir`` (reused when ``stamp.json`` matches): ``llm-<quant>.gguf`` and
    ``mmproj-model-f16.gguf``. Returns the stamp (sources, commands, sizes, seconds)."""
    gguf_dir.mkdir(parents=True, exist_ok=True)
    stamp_file = gguf_dir / "stamp.json"
    llm_q = gguf_dir / f"llm-{quant.lower()}.gguf"
    mmproj = gguf_dir / "mmproj-model-f16.gguf"
    want = {"checkpoint": checkpoint_fingerprint(ckpt), "llama_src": str(src), "quant": quant}
    if not force and stamp_file.is_file() and llm_q.is_file() and mmproj.is_file():
        old = json.loads(stamp_file.read_text())
        if all(old.get(k) == v for k, v in want.items()):
            print(f"reusing {llm_q.name} and {mmproj.name} in {gguf_dir}", flush=True)
            return old
    print(f"converting {ckpt} with llama.cpp's tools into {gguf_dir}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / GGUF_PY), os.environ.get("PYTHONPATH", "")])}
    work = gguf_dir / "hf"
    shutil.rmtree(work, ignore_errors=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    llm_dir = write_llm_dir(ckpt, work / "llm")
    llm_f16 = gguf_dir / "llm-f16.gguf"
    _run_checked([sys.executable, src / LLM_CONVERTER, llm_dir, "--outfile", llm_f16, "--outtype", "f16"],
                 "convert_hf_to_gguf.py (LLM, f16)", env=env, log=gguf_dir / "convert_llm.log")
    seconds["llm_f16"] = time.perf_counter() - t
    t = time.perf_counter()
    _run_checked([bins["llama-quantize"], llm_f16, llm_q, quant, str(threads)], f"llama-quantize {quant}",
                 log=gguf_dir / "quantize.log")
    seconds["llm_quantize"] = time.perf_counter() - t
    llm_f16.unlink()
    t = time.perf_counter()
    clip_dir, projector = write_clip_dir(ckpt, work)
    _run_checked([sys.executable, "-c", _CLIP_SHIM, src / CLIP_CONVERTER, "-m", clip_dir, "--clip-model-is-vision",
                  "--llava-projector", projector, "--output-dir", gguf_dir, "--projector-type", "ldp"],
                 "convert_image_encoder_to_gguf.py (CLIP + LDP, f16)", env=env, log=gguf_dir / "convert_mmproj.log")
    seconds["mmproj"] = time.perf_counter() - t
    shutil.rmtree(work, ignore_errors=True)
    if not mmproj.is_file():
        raise PeerCompareError(f"the CLIP converter did not write {mmproj}")
    stamp = {**want, "llm": llm_q.name, "mmproj": mmproj.name, "seconds": seconds,
             "sizes": {llm_q.name: llm_q.stat().st_size, mmproj.name: mmproj.stat().st_size},
             "commands": [f"python {LLM_CONVERTER} LLM_DIR --outfile llm-f16.gguf --outtype f16",
                          f"llama-quantize llm-f16.gguf {llm_q.name} {quant} {threads}",
                          f"python {CLIP_CONVERTER} -m CLIP_DIR --clip-model-is-vision --llava-projector "
                          f"llava.projector --output-dir GGUF_DIR --projector-type ldp"]}
    stamp_file.write_text(json.dumps(stamp, indent=2))
    return stamp


def gguf_read_bytes(path: Path, src: Path) -> dict[str, Any]:
    """Bytes per tensor type of a GGUF (gguf-py from the llama.cpp tree) and the bytes a decode step reads: all
    tensors but ``token_embd.weight`` (a row gather)."""
    sys.path.insert(0, str(src / GGUF_PY))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(src / GGUF_PY))
    r = GGUFReader(str(path))
    by_type: dict[str, int] = {}
    total = embd = 0
    for t in r.tensors:
        n = int(t.n_bytes)
        total += n
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + n
        if t.name == "token_embd.weight":
            embd = n
    out_type = next((t.tensor_type.name for t in r.tensors if t.name == "output.weight"), None)
    return {"tensor_bytes": total, "token_embd_bytes": embd, "decode_read_bytes": total - embd,
            "bytes_by_type": by_type, "output_weight_type": out_type, "file_bytes": path.stat().st_size}


# ==== edgevlm bundle ===============================================================================================
def ensure_bundle(bundle: Path, ckpt: Path, fp32: Path | None, timeout: float) -> dict[str, Any]:
    """``bundle`` as given, or made: ``edgevlm quantize FP32 --precision int4`` / ``edgevlm export --checkpoint``."""
    if (bundle / "manifest.json").is_file():
        return {"made": False}
    if fp32 is not None:
        cmd = [sys.executable, "-m", "edgevlm", "quantize", str(fp32), "--precision", "int4", "--out", str(bundle)]
    else:
        cmd = [sys.executable, "-m", "edgevlm", "export", "--checkpoint", str(ckpt), "--precision", "int4",
               "--out", str(bundle)]
    print(f"making the edgevlm int4 bundle: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    _run_checked(cmd, "edgevlm bundle", timeout=timeout)
    return {"made": True, "command": " ".join(cmd[2:]), "seconds": time.perf_counter() - t}


# ==== process runner: spawn -> ready -> exit timestamps, per-child peak RSS ============================================
def busy_cpu_s() -> float | None:
    """CPU seconds all processes have spent so far (/proc/stat: user + nice + system + irq + softirq + steal)."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_timed(cmd: Sequence[str], ready: Callable[[str], bool], timeout: float, env: dict[str, str] | None = None,
              done: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (stdout and stderr merged), timestamping output lines as they arrive: ``ready_s`` = spawn -> the
    first line for which ``ready(line)`` holds, ``request_s`` = that line -> the first ``done(line)`` (or the exit),
    ``wall_s`` = spawn -> exit, ``peak_rss_mib`` = the child's ``ru_maxrss`` (``os.wait4``: this child only),
    ``output`` = the text."""
    busy0 = busy_cpu_s()
    t0 = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         bufsize=0)
    chunks: list[bytes] = []
    marks: dict[str, float] = {}
    preds = {"ready": ready, **({"done": done} if done else {})}
    pending = b""

    def reader() -> None:
        nonlocal pending
        assert p.stdout is not None
        while True:
            b = p.stdout.read(65536)
            if not b:
                break
            now = time.perf_counter()
            chunks.append(b)
            if len(marks) < len(preds):
                pending += b
                *lines, pending = pending.split(b"\n")
                for ln in lines:
                    text = ln.decode(errors="replace")
                    for name, pred in preds.items():
                        if name not in marks and (name == "ready" or "ready" in marks) and pred(text):
                            marks[name] = now

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    deadline = t0 + timeout
    timed_out = False
    while True:
        pid, status, rusage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            p.kill()
            timed_out = True
            pid, status, rusage = os.wait4(p.pid, 0)
            break
        time.sleep(0.002)
    t_end = time.perf_counter()
    busy1 = busy_cpu_s()
    p.returncode = os.waitstatus_to_exitcode(status)
    th.join(timeout=10)
    text = b"".join(chunks).decode(errors="replace")
    ready_at = marks.get("ready")
    end = marks.get("done", t_end)
    return {"returncode": p.returncode, "timed_out": timed_out, "wall_s": t_end - t0,
            "ready_s": (ready_at - t0) if ready_at else None, "request_s": (end - ready_at) if ready_at else None,
            "request_end": "done line" if "done" in marks else "exit",
            "peak_rss_mib": rusage.ru_maxrss / 1024, "cpu_s": rusage.ru_utime + rusage.ru_stime,
            # CPU time the rest of the machine used meanwhile (this parent's reader thread included: ~0):
            # the sign of another job sharing the cores during the measurement
            "other_cpu_s": (busy1 - busy0 - rusage.ru_utime - rusage.ru_stime)
            if busy0 is not None and busy1 is not None else None, "output": text}


def loadavg() -> list[float]:
    from edgevlm.bench.env import loadavg as la

    return la()


# ==== llama.cpp runs ===============================================================================================
def mtmd_cmd(bins: dict[str, Path], llm: Path, mmproj: Path, image: Path, prompt: str, n_new: int,
             threads: int) -> list[str]:
    return [str(bins["llama-mtmd-cli"]), "-m", str(llm), "--mmproj", str(mmproj), "--image", str(image), "-p", prompt,
            "-n", str(n_new), "--ignore-eos", "--temp", "0", "--seed", "0", "-t", str(threads), "-c", "2048",
            "--chat-template", CHAT_TEMPLATE, "-lv", "4"]     # 4: the library's INFO lines (perf, image decoded)


def run_mtmd(bins, llm, mmproj, image, prompt, n_new, threads, timeout) -> dict[str, Any]:
    la0 = loadavg()
    r = run_timed(mtmd_cmd(bins, llm, mmproj, image, prompt, n_new, threads), lambda s: bool(MTMD_READY.search(s)),
                  timeout, done=lambda s: bool(MTMD_DONE.search(s)))
    rec: dict[str, Any] = {"loadavg_before": la0, "returncode": r["returncode"], "wall_s": r["wall_s"],
                           "ready_s": r["ready_s"], "request_s": r["request_s"], "request_end": r["request_end"],
                           "peak_rss_mib": r["peak_rss_mib"], "cpu_s": r["cpu_s"], "other_cpu_s": r["other_cpu_s"]}
    if r["returncode"] != 0 or r["timed_out"]:
        rec["error"] = f"llama-mtmd-cli exit {r['returncode']}{' (timed out)' if r['timed_out'] else ''}: " + \
            r["output"][-2000:]
        return rec
    try:
        rec.update(parse_mtmd_log(r["output"]))
    except ValueError as exc:
        rec["error"] = f"{exc}: {r['output'][-2000:]}"
    rec["_output"] = r["output"]
    return rec


def run_llama_bench(bins, llm, threads, args: Sequence[str], timeout) -> dict[str, Any]:
    cmd = [str(bins["llama-bench"]), "-m", str(llm), "-t", str(threads), "-r", "1", "-o", "json", *args]
    la0 = loadavg()
    busy0, ru0 = busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    busy1, ru1 = busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    rec: dict[str, Any] = {"args": list(args), "loadavg_before": la0, "wall_s": wall, "cpu_s": cpu,
                           "other_cpu_s": (busy1 - busy0 - cpu) if busy0 is not None and busy1 is not None
                           else None}
    if p.returncode != 0:
        rec["error"] = f"llama-bench exit {p.returncode}: {(p.stderr or p.stdout)[-2000:]}"
        return rec
    try:
        rec["rows"] = parse_llama_bench_json(p.stdout)
    except (ValueError, json.JSONDecodeError) as exc:
        rec["error"] = f"cannot parse llama-bench JSON ({exc}): {p.stdout[-1000:]}"
    rec["_stdout"] = p.stdout
    return rec


def fit_llama_prompt(bins, llm, mmproj, image, threads, target: int, timeout, tries: int = 6) -> tuple[str, dict]:
    """A prompt for which llama-mtmd-cli evaluates exactly ``target`` prompt positions (144 image + text incl. its
    template), found by running it with ``-n 1``: words from FILLER, then single `` a`` tokens (one piece ``▁a``)."""
    words = list(FILLER[:4])
    extra = 0
    last: dict[str, Any] = {}
    for _ in range(tries):
        prompt = " ".join(words) + " a" * extra
        last = run_mtmd(bins, llm, mmproj, image, prompt, 1, threads, timeout)
        if "error" in last:
            raise PeerCompareError(f"llama-mtmd-cli does not run the converted model: {last['error']}")
        n = int(last["prompt_tokens"])
        if n == target:
            return prompt, last
        if n < target:
            grow = target - n
            if extra == 0 and grow > 4:             # coarse: more filler words (each >= 1 token), keep a margin
                more = max(1, grow // 3)
                words += [FILLER[(len(words) + i) % len(FILLER)] for i in range(more)]
            else:
                extra += grow
        else:
            if extra >= n - target:
                extra -= n - target
            elif len(words) > 1:
                words = words[:-max(1, (n - target) // 3)] or words[:1]
                extra = 0
            else:
                raise PeerCompareError(f"the shortest llama.cpp prompt already takes {n} > {target} positions")
    raise PeerCompareError(f"could not fit the llama.cpp prompt to {target} positions in {tries} runs "
                           f"(last: {last.get('prompt_tokens')})")


# ==== edgevlm worker ==============================================================================================
def worker_main(argv: list[str]) -> None:
    """``--worker JOB.json``: load the bundle (``Session.from_bundle`` with the runtime's defaults: no warm-up), print
    READY, run the first request (the cold-process one), print DONE, run a second request on another image (warm),
    print ``RESULT {json}``. With ``fit``: only fit the prompt to ``text_tokens``."""
    job = json.loads(Path(argv[argv.index("--worker") + 1]).read_text())
    t_import = time.perf_counter()
    from edgevlm.bench.sweep import _request_record
    from edgevlm.bench.workload import fit_prompt, make_image
    from edgevlm.runtime import Session
    from edgevlm.runtime.timings import peak_rss_bytes

    import_s = time.perf_counter() - t_import
    s = Session.from_bundle(job["bundle"], threads=job["threads"])
    size = (s.preprocess_config.image_size,) * 2
    out: dict[str, Any] = {"import_s": import_s, "load_s": s.load_s, "load_breakdown": dict(s.load_breakdown),
                           "threads": s.threads, "vision_backend": s.vision_backend,
                           "decoder_backend": s.decoder_backend, "native_decode": s.native_info,
                           "visual_tokens": s.visual_tokens, "manifest_sha256": s.bundle.manifest_sha256}
    if job.get("fit"):
        prompt, n = fit_prompt(s, int(job["text_tokens"]), "raw")
        out.update({"prompt": prompt, "text_tokens": n})
    else:
        import numpy as np

        def one(index: int) -> dict[str, Any]:
            img = make_image(index, size, seed=int(job["seed"]))
            tag = hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()[:12]
            r = s.generate(img, job["prompt"], max_new_tokens=int(job["new_tokens"]), ignore_eos=True,
                           raw_prompt=True)
            return _request_record(r, tag, int(job.get("repeat", 0)), index)

        print("READY", file=sys.stderr, flush=True)
        out["request"] = one(int(job["image_index"]))
        print("DONE", file=sys.stderr, flush=True)
        out["request_warm"] = one(int(job["warm_image_index"]))
    out["peak_rss_mb"] = peak_rss_bytes() / 2**20
    s.close()
    print("RESULT " + json.dumps(out), flush=True)


def save_log(where: str | None, name: str, text: str | None) -> None:
    if where and text is not None:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / name).write_text(text)


def run_edgevlm(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    from edgevlm.bench.sweep import worker_result

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, prefix="peer-compare-job-") as f:
        json.dump(job, f)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    la0 = loadavg()
    try:
        r = run_timed([sys.executable, str(Path(__file__).resolve()), "--worker", f.name],
                      lambda s: s.strip() == "READY", timeout, env=env, done=lambda s: s.strip() == "DONE")
    finally:
        os.unlink(f.name)
    res = worker_result(r["output"], r["wall_s"])
    rec: dict[str, Any] = {"loadavg_before": la0, "returncode": r["returncode"], "wall_s": r["wall_s"],
                           "ready_s": r["ready_s"], "peak_rss_mib": r["peak_rss_mib"], "cpu_s": r["cpu_s"],
                           "other_cpu_s": r["other_cpu_s"]}
    if res is None:
        rec["error"] = f"edgevlm worker exit {r['returncode']}: {r['output'][-3000:]}"
        return rec
    rec.update(res)
    rec["_output"] = r["output"]
    if "request" in res:
        rec["request_s"] = r["request_s"]             # READY -> DONE (not -> exit: the close and RESULT line)
        rec["request_end"] = r["request_end"]
    return rec


# ==== one repetition ===============================================================================================
def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def llama_stages(mt: dict[str, Any], pp: dict[str, Any], tg: dict[str, Any], p: int, n: int) -> dict[str, Any]:
    pp_rows, tg_rows = pp.get("rows") or [], tg.get("rows") or []
    return {"load_s": mt.get("ready_s"), "vision_ms": mt.get("image_encode_ms"),
            "prefill_tok_s": bench_rate(pp_rows, f"pp{p}"), "decode_tok_s": bench_rate(tg_rows, f"tg{n}@d{p}"),
            "e2e_s": mt.get("request_s"), "cold_s": _add(mt.get("ready_s"), mt.get("request_s")),
            "wall_s": mt.get("wall_s"),
            "decode_tok_s_depth0": bench_rate(tg_rows, f"tg{n}"),
            "first_vision_ms": mt.get("image_encode_ms"), "first_prefill_tok_s": mt.get("prefill_tok_s"),
            "first_decode_tok_s": mt.get("decode_tok_s"),
            "mtmd_prompt_tokens": mt.get("prompt_tokens"), "mtmd_generated": (mt.get("eval_runs") or 0) + 1
            if "eval_runs" in mt else None, "tool_load_ms": mt.get("load_ms"),
            "image_decode_ms": mt.get("image_decode_ms"), "peak_rss_mib": mt.get("peak_rss_mib")}


def edgevlm_stages(ed: dict[str, Any]) -> dict[str, Any]:
    """Engine speeds (vision, prefill, decode) from the second (warm) request, like llama-bench's warm pp / tg;
    load and end to end from the first request of the fresh process, like llama-mtmd-cli's single request."""
    first, warm = ed.get("request") or {}, ed.get("request_warm") or {}
    return {"load_s": ed.get("ready_s"), "vision_ms": warm.get("vision_ms"), "prefill_tok_s": warm.get("prefill_tok_s"),
            "decode_tok_s": warm.get("decode_tok_s"), "e2e_s": ed.get("request_s"),
            "cold_s": _add(ed.get("ready_s"), ed.get("request_s")), "wall_s": ed.get("wall_s"),
            "first_vision_ms": first.get("vision_ms"), "first_prefill_tok_s": first.get("prefill_tok_s"),
            "first_decode_tok_s": first.get("decode_tok_s"), "first_total_ms": first.get("total_ms"),
            "warm_total_ms": warm.get("total_ms"), "prompt_tokens": first.get("prompt_tokens"),
            "generated": first.get("generated_tokens"), "tool_load_s": ed.get("load_s"),
            "import_s": ed.get("import_s"), "peak_rss_mib": ed.get("peak_rss_mib"),
            "decode_backend": ed.get("decoder_backend")}


# ==== environment, roofline, output =============================================================================
def cpu_extra() -> dict[str, Any]:
    """cpu family / model / stepping (lscpu-style; the model name alone is 'AMD EPYC' under some hypervisors)."""
    out: dict[str, Any] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("cpu family", "model", "stepping", "vendor_id", "cache size") and k not in out:
                out[k] = v.strip()
            if k == "flags" and "vnni" not in out:
                flags = v.split()
                out["avx512"] = "avx512f" in flags
                out["avx2"] = "avx2" in flags
                out["vnni"] = sorted(f for f in flags if "vnni" in f)
            if not line.strip() and out:
                break
    except OSError:
        pass
    return out


def cpu_slug(env: dict[str, Any]) -> str:
    cpu = env["cpu"]
    name = re.sub(r"\(.*?\)|cpu|processor|@.*$|\d+-core", " ", cpu["model"].lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or platform.machine()
    isa = "avx512" if "avx512f" in cpu.get("isa", []) else "avx2" if "avx2" in cpu.get("isa", []) else \
        platform.machine()
    return f"{name}-{cpu.get('cores_usable') or cpu.get('cores_physical')}c-{isa}"


def scrub(obj: Any, subs: Sequence[tuple[str, str]]) -> Any:
    """``obj`` with every machine path replaced by its placeholder: longest path first, and only where the path
    stands alone or starts a longer path (``/tmp`` is not replaced inside ``/srv/tmp/x``)."""
    pats = [(re.compile(r"(?<![\w./-])" + re.escape(str(a).rstrip("/")) + r"(?![\w.-])"), b)
            for a, b in sorted(((str(a), b) for a, b in subs if a and str(a) != "/"), key=lambda ab: -len(ab[0]))]

    def s(x: Any) -> Any:
        if isinstance(x, str):
            for pat, b in pats:
                x = pat.sub(b, x)
            return x
        if isinstance(x, dict):
            return {s(k): s(v) for k, v in x.items()}
        if isinstance(x, list):
            return [s(v) for v in x]
        return x

    return s(obj)


def decode_roofline(read_gbs: float, weight_bytes: float, kv_bytes_per_pos: float, ctx: float,
                    measured: float | None, max_read_gbs: float | None = None) -> dict[str, Any]:
    """Decode tok/s bound = bandwidth / bytes read per token; also against the fastest probe when given."""
    per_token = weight_bytes + kv_bytes_per_pos * ctx
    bound = read_gbs * 1e9 / per_token
    out = {"bytes_per_token": per_token, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes_per_pos * ctx,
           "mean_context": ctx, "bound_tok_s": bound, "measured_tok_s": measured,
           "fraction": (measured / bound) if measured else None}
    if max_read_gbs:
        top = max_read_gbs * 1e9 / per_token
        out.update({"bound_at_max_probe_tok_s": top, "fraction_of_max_probe": (measured / top) if measured else None})
    return out


def write_outputs(report: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(render_markdown(report))
    return js, md


def render_markdown(rep: dict[str, Any]) -> str:
    env = rep["environment"]
    cpu = env["cpu"]
    lines = [f"# llama.cpp vs edgevlm, MobileVLM-1.7B ({rep['date']})", "",
             f"**CPU: {cpu['model']}** (family {rep['cpu_extra'].get('cpu family')} model "
             f"{rep['cpu_extra'].get('model')}; {cpu.get('cores_usable')} usable cores, ISA "
             f"{', '.join(cpu.get('isa', []))}), {env.get('ram_gib')} GiB RAM, {env.get('os')}. "
             f"{rep['threads']} threads both sides. Load average during the run: "
             f"{rep['loadavg']['min_1m']:.2f}-{rep['loadavg']['max_1m']:.2f} (1-minute, sampled before every process).",
             "",
             f"Workload: a distinct 336x336 image per repetition, {rep['workload']['prompt_tokens']} prompt positions "
             f"({VISUAL_TOKENS} visual + text), {rep['workload']['new_tokens']} new tokens, greedy, EOS ignored; "
             f"medians of {rep['repeats']} interleaved repetitions, each tool in its own processes.", "",
             markdown_table(rep["table"], rep.get("roofline")), "",
             "Ratios are edgevlm / llama.cpp (times: < 1 = edgevlm faster; rates: > 1 = edgevlm faster).", "",
             f"* llama.cpp {rep['llama_cpp']['build'].get('version')} ({rep['llama_cpp']['source']}), "
             f"LLM {rep['llama_cpp']['quant']} ({rep['llama_cpp']['llm_gguf']['file_bytes'] / 2**20:.0f} MiB, "
             f"output.weight {rep['llama_cpp']['llm_gguf'].get('output_weight_type')}), mmproj f16 "
             f"({rep['llama_cpp']['mmproj_bytes'] / 2**20:.0f} MiB); prefill = llama-bench pp"
             f"{rep['workload']['prompt_tokens']}, decode = llama-bench tg{rep['workload']['new_tokens']} at depth "
             f"{rep['workload']['prompt_tokens']}; vision, load and end to end from llama-mtmd-cli.",
             f"* edgevlm {env['versions'].get('edgevlm')}, onnxruntime {env['versions'].get('onnxruntime')}: int4 "
             f"bundle ({rep['edgevlm']['bundle_bytes'] / 2**20:.0f} MiB; decode backend "
             f"{rep['edgevlm'].get('decode_backend')}; vision {rep['edgevlm'].get('vision_precision')}, LLM "
             f"{rep['edgevlm'].get('decoder_precision')}, LM head {rep['edgevlm'].get('lm_head_precision')}); "
             f"vision, prefill and decode from each worker's second (warm) request, load and end to end from its "
             f"first.",
             f"* Read bandwidth measured in this run: {rep['bandwidth']['read_gbs']:.1f} GB/s (median of the probes "
             f"{', '.join(f'{x:.1f}' for x in rep['bandwidth'].get('read_gbs_samples', []))} GB/s, before and after "
             f"the repetitions); rooflines = it / bytes read per token: {rep['roofline']['note']}.", "",
             "Secondary figures (medians):", "",
             "| | llama.cpp | edgevlm |", "|---|---:|---:|"]
    sec = rep["secondary"]
    for key, label, fmt in (("cold_s", "cold start: spawn -> end of the first request (s)", ".2f"),
                            ("tool_load_s", "the tool's own load figure (s)", ".2f"),
                            ("first_vision_ms", "first request: vision (ms)", ".0f"),
                            ("first_prefill_tok_s", "first request: prefill (tok/s)", ".1f"),
                            ("first_decode_tok_s", "first request: decode (tok/s)", ".1f"),
                            ("decode_tok_s_depth0", "decode at depth 0 (llama-bench tg, tok/s)", ".1f"),
                            ("peak_rss_mib", "peak RSS of the process (MiB)", ".0f")):
        ll, ed = sec.get(key, {}).get("llama.cpp"), sec.get(key, {}).get("edgevlm")
        lines.append(f"| {label} | {'n/a' if ll is None else format(ll, fmt)} | "
                     f"{'n/a' if ed is None else format(ed, fmt)} |")
    lines += ["", "Notes on the secondary figures: " + "; ".join(f"{k}: {v}" for k, v in sec.get("notes", {}).items())
              + "."]
    ref = rep["reference"]
    lines += ["", f"Reference (issue table, {ref['machine']}): vision {ref['vision_ms']['llama.cpp']} / "
              f"{ref['vision_ms']['edgevlm']} ms, prefill {ref['prefill_tok_s']['llama.cpp']} / "
              f"{ref['prefill_tok_s']['edgevlm']} tok/s, decode {ref['decode_tok_s']['llama.cpp']} / "
              f"{ref['decode_tok_s']['edgevlm']} tok/s, load {ref['load_s']['llama.cpp']} / {ref['load_s']['edgevlm']} s, "
              f"end to end {ref['e2e_s']['llama.cpp']} / {ref['e2e_s']['edgevlm']} s (llama.cpp / edgevlm).", "",
              "Command:", "", "```bash", rep["command"], "```", ""]
    if rep.get("notes"):
        lines += ["Notes:", ""] + [f"* {n}" for n in rep["notes"]] + [""]
    return "\n".join(lines)


# ==== main =========================================================================================================
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-build", required=True, help="llama.cpp CMake build directory with llama-bench, "
                    "llama-mtmd-cli and llama-quantize (in bin/)")
    ap.add_argument("--llama-src", default=None, help="llama.cpp source tree (default: from the build's CMakeCache)")
    ap.add_argument("--checkpoint", required=True, help="MobileVLM-1.7B checkpoint directory (released format)")
    ap.add_argument("--gguf-dir", default=None, help="where the GGUF files are written / reused (default: a temp "
                    "directory, removed at the end)")
    ap.add_argument("--bundle", default=None, help="edgevlm int4 bundle of the checkpoint; made when missing "
                    "(default: a temp directory, removed at the end)")
    ap.add_argument("--fp32-bundle", default=None, help="an fp32 bundle of the same checkpoint: the int4 bundle is "
                    "quantized from it (minutes faster than exporting)")
    ap.add_argument("--repeats", type=int, default=3, help="repetitions (each: both tools, order alternating)")
    ap.add_argument("--threads", type=int, default=None, help="threads for both tools (default: physical cores)")
    ap.add_argument("--prompt-tokens", type=int, default=192, help="LLM prompt positions (144 visual + text)")
    ap.add_argument("--new-tokens", type=int, default=64, help="generated tokens per request (EOS ignored)")
    ap.add_argument("--llm-quant", default="Q4_0", help="llama-quantize type of the LLM")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="array size of the read-bandwidth probe")
    ap.add_argument("--reconvert", action="store_true", help="convert even when --gguf-dir has matching files")
    ap.add_argument("--timeout", type=float, default=900, help="per-process time limit (s)")
    ap.add_argument("--retry-shared", type=int, default=2, help="repeat a repetition (up to N times) when other "
                    "processes used more than 5 %% of a core during any of its runs (measured from /proc/stat "
                    "minus the run's own CPU time); the discarded attempts stay in the JSON")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--name", default=None, help="output stem (default: peer_compare_<cpu-slug>)")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--keep-logs", default=None, help="directory for every process's raw output (llama-mtmd-cli "
                    "log, llama-bench JSON, edgevlm worker output)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from edgevlm.bench.env import bandwidth, environment
    from edgevlm.bench.workload import make_image
    from edgevlm.runtime.backends import physical_cores

    build = Path(args.llama_build).resolve()
    bins = find_binaries(build)
    src = find_source(build, args.llama_src).resolve()
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        raise PeerCompareError(f"{ckpt} is not a checkpoint (no config.json); make one with: python "
                               f"benchmarks/export_full.py --model mobilevlm-1.7b --make-checkpoint {ckpt}")
    threads = args.threads or physical_cores()
    if args.repeats < 1:
        raise PeerCompareError("--repeats must be >= 1")
    text_tokens = args.prompt_tokens - VISUAL_TOKENS
    if text_tokens < 2:
        raise PeerCompareError(f"--prompt-tokens must exceed the {VISUAL_TOKENS} visual tokens by at least 2")
    tmp = Path(tempfile.mkdtemp(prefix="peer_compare_"))
    gguf_dir = Path(args.gguf_dir).resolve() if args.gguf_dir else tmp / "gguf"
    bundle = Path(args.bundle).resolve() if args.bundle else tmp / "bundle-int4"
    notes: list[str] = []
    t_all = time.perf_counter()
    try:
        stamp = convert(ckpt, src, bins, gguf_dir, args.llm_quant, threads, force=args.reconvert)
        llm, mmproj = gguf_dir / stamp["llm"], gguf_dir / stamp["mmproj"]
        made = ensure_bundle(bundle, ckpt, Path(args.fp32_bundle).resolve() if args.fp32_bundle else None,
                             args.timeout * 4)
        binfo = build_info(bins, build)
        env = environment(threads, bundles=[bundle])
        print(f"{env['cpu']['model']} ({env['cpu'].get('cores_usable')} cores, {env.get('ram_gib')} GiB), "
              f"{threads} threads; llama.cpp {binfo.get('version')}", flush=True)
        bw_samples = [bandwidth(threads, gib=args.bandwidth_gib) for _ in range(BANDWIDTH_PROBES)]
        print("read bandwidth " + ", ".join(f"{b['read_gbs']:.1f}" for b in bw_samples) + " GB/s", flush=True)
        images = tmp / "images"
        images.mkdir()

        def image(i: int) -> Path:
            from PIL import Image

            p = images / f"img{i}.png"
            if not p.exists():
                Image.fromarray(make_image(i, (336, 336), seed=args.seed)).save(p)
            return p

        # ---- priming: fit both prompts (and warm the page cache, the hash stamps) -----------------------------
        print("fitting the llama.cpp prompt (llama-mtmd-cli -n 1) ...", flush=True)
        llama_prompt, first = fit_llama_prompt(bins, llm, mmproj, image(10_000), threads, args.prompt_tokens,
                                               args.timeout)
        print(f"  {first['prompt_tokens']} positions; image encoded in {first['image_encode_ms']:.0f} ms", flush=True)
        fit = run_edgevlm({"bundle": str(bundle), "threads": threads, "fit": True, "text_tokens": text_tokens},
                          args.timeout)
        if "error" in fit:
            raise PeerCompareError(f"edgevlm worker failed: {fit['error']}")
        edge_prompt = fit["prompt"]
        print(f"  edgevlm prompt: {fit['text_tokens']} text tokens + {fit['visual_tokens']} visual", flush=True)

        # ---- repetitions ---------------------------------------------------------------------------------------
        runs: list[dict[str, Any]] = []
        raw: list[dict[str, Any]] = []
        la: list[float] = []

        def repetition(rep: int, attempt: int) -> tuple[dict[str, Any], list[str]]:
            img = image(rep)
            order = ["llama.cpp", "edgevlm"] if rep % 2 == 0 else ["edgevlm", "llama.cpp"]
            rec: dict[str, Any] = {"repeat": rep, "attempt": attempt, "order": order, "image": img.name}
            rnotes: list[str] = []
            tag = f"r{rep}" + (f"-a{attempt}" if attempt else "")
            for tool in order:
                if tool == "llama.cpp":
                    mt = run_mtmd(bins, llm, mmproj, img, llama_prompt, args.new_tokens, threads, args.timeout)
                    pp = run_llama_bench(bins, llm, threads, ["-p", str(args.prompt_tokens), "-n", "0"],
                                         args.timeout)
                    tg = run_llama_bench(bins, llm, threads, ["-p", "0", "-n", str(args.new_tokens), "-d",
                                                              f"0,{args.prompt_tokens}"], args.timeout)
                    for r in (mt, pp, tg):
                        la.append(r["loadavg_before"][0] if r.get("loadavg_before") else 0.0)
                        if "error" in r:
                            rnotes.append(f"repeat {rep}: {r['error'][:300]}")
                    save_log(args.keep_logs, f"{tag}-llama-mtmd-cli.log", mt.get("_output"))
                    save_log(args.keep_logs, f"{tag}-llama-bench-pp.json", pp.get("_stdout"))
                    save_log(args.keep_logs, f"{tag}-llama-bench-tg.json", tg.get("_stdout"))
                    rec["llama.cpp"] = llama_stages(mt, pp, tg, args.prompt_tokens, args.new_tokens)
                    rec["llama.cpp_raw"] = {"mtmd": {k: v for k, v in mt.items() if not k.startswith("_")},
                                            "bench_pp": {k: v for k, v in pp.items() if not k.startswith("_")},
                                            "bench_tg": {k: v for k, v in tg.items() if not k.startswith("_")}}
                    gen = rec["llama.cpp"]["mtmd_generated"]
                    if gen is not None and gen != args.new_tokens:
                        rnotes.append(f"repeat {rep}: llama-mtmd-cli generated {gen} tokens, not {args.new_tokens} "
                                      f"(a generated '###' ends the deepseek template); its end-to-end time is short")
                else:
                    ed = run_edgevlm({"bundle": str(bundle), "threads": threads, "prompt": edge_prompt,
                                      "new_tokens": args.new_tokens, "image_index": rep,
                                      "warm_image_index": 1000 + rep, "seed": args.seed, "repeat": rep},
                                     args.timeout)
                    la.append(ed["loadavg_before"][0] if ed.get("loadavg_before") else 0.0)
                    if "error" in ed:
                        rnotes.append(f"repeat {rep}: {ed['error'][:300]}")
                    save_log(args.keep_logs, f"{tag}-edgevlm-worker.log", ed.pop("_output", None))
                    rec["edgevlm"] = edgevlm_stages(ed)
                    rec["edgevlm_raw"] = ed
                st = rec[tool]
                print(f"[{rep + 1}/{args.repeats}] {tool:9s}: load {_fmt(st['load_s'], 's')}, vision "
                      f"{_fmt(st['vision_ms'], 'ms')}, prefill {_fmt(st['prefill_tok_s'], 'tok/s')}, decode "
                      f"{_fmt(st['decode_tok_s'], 'tok/s')}, e2e {_fmt(st['e2e_s'], 's')}", flush=True)
            lr = rec["llama.cpp_raw"]
            procs = (("llama-mtmd-cli", lr["mtmd"]), ("llama-bench pp", lr["bench_pp"]),
                     ("llama-bench tg", lr["bench_tg"]), ("edgevlm", rec["edgevlm_raw"]))
            rec["other_cpu_fraction"] = {name: r["other_cpu_s"] / r["wall_s"] for name, r in procs
                                         if r.get("other_cpu_s") is not None and r.get("wall_s")}
            return rec, rnotes

        for rep in range(args.repeats):
            discarded: list[dict[str, Any]] = []
            for attempt in range(args.retry_shared + 1):
                rec, rnotes = repetition(rep, attempt)
                busy = {k: v for k, v in rec["other_cpu_fraction"].items() if v > OTHER_CPU_LIMIT}
                if not busy:
                    break
                msg = (f"repeat {rep}: other processes used CPU during " + ", ".join(
                    f"{k} ({100 * v:.0f} % of a core on average)" for k, v in busy.items()))
                print(f"  {msg}", flush=True)
                if attempt < args.retry_shared:
                    discarded.append({"attempt": attempt, "other_cpu_fraction": rec["other_cpu_fraction"],
                                      "llama.cpp": rec["llama.cpp"], "edgevlm": rec["edgevlm"]})
                    print("  repeating it", flush=True)
                    continue
                rnotes.append(msg + " (kept: no retries left)")
            if discarded:
                rec["discarded_attempts"] = discarded
                notes.append(f"repeat {rep}: {len(discarded)} attempt(s) discarded because other processes shared "
                             f"the cores (> {100 * OTHER_CPU_LIMIT:.0f} % of a core); kept attempt {rec['attempt']}")
            notes.extend(rnotes)
            runs.append({"llama.cpp": rec["llama.cpp"], "edgevlm": rec["edgevlm"]})
            raw.append(rec)
        la.append(loadavg()[0] if loadavg() else 0.0)
        bw_samples += [bandwidth(threads, gib=args.bandwidth_gib) for _ in range(BANDWIDTH_PROBES)]
        bw = {"read_gbs": median([b["read_gbs"] for b in bw_samples]),
              "read_gbs_samples": [round(b["read_gbs"], 2) for b in bw_samples],
              "note": f"median of {BANDWIDTH_PROBES} probes before and {BANDWIDTH_PROBES} after the repetitions "
                      f"(one probe on this VM can read far above the others)", "probes": bw_samples}
        print("read bandwidth after " + ", ".join(f"{b['read_gbs']:.1f}" for b in bw_samples[BANDWIDTH_PROBES:])
              + f" GB/s; roofline uses the median {bw['read_gbs']:.1f}", flush=True)

        # ---- summary ---------------------------------------------------------------------------------------------
        table = summary_table(runs)
        gguf_bytes = gguf_read_bytes(llm, src)
        from edgevlm.bundle import read_bundle
        from edgevlm.config import get_model_config

        b = read_bundle(bundle, verify_hashes=False)
        dec = b.component("decoder")
        dec_files = dict.fromkeys([dec["file"], *(dec.get("external_data") or [])])
        dec_bytes = sum(b.files[f]["size"] for f in dec_files if f in b.files)
        c = get_model_config(b.model_config.name).llm
        kv_f16 = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 2
        ctx = args.prompt_tokens + args.new_tokens / 2
        med = {r["stage"]: r for r in table}
        top = max(b["read_gbs"] for b in bw_samples)
        roof = {"llama.cpp": decode_roofline(bw["read_gbs"], gguf_bytes["decode_read_bytes"], kv_f16, ctx,
                                             med["decode_tok_s"]["llama.cpp"], top),
                "edgevlm": decode_roofline(bw["read_gbs"], dec_bytes, kv_f16, ctx, med["decode_tok_s"]["edgevlm"], top),
                "note": "read bandwidth / (weights read per token + f16 KV cache at the mean decode context); "
                        "llama.cpp weights = GGUF tensors except token_embd, edgevlm = the decoder's files. The "
                        "bandwidth is numpy's best streaming read (np.sum / np.dot, 1 and N threads): not the "
                        "machine's ceiling, so a fraction above 1 means a kernel streams faster than that probe"}

        def sec(key_l: str, key_e: str | None = None) -> dict[str, float | None]:
            return {"llama.cpp": median([r["llama.cpp"].get(key_l) for r in runs]),
                    "edgevlm": median([r["edgevlm"].get(key_e or key_l) for r in runs])}

        tool_load = {"llama.cpp": (lambda v: v / 1e3 if v is not None else None)(
            median([r["llama.cpp"].get("tool_load_ms") for r in runs])),
            "edgevlm": median([r["edgevlm"].get("tool_load_s") for r in runs])}
        secondary = {"cold_s": sec("cold_s"), "tool_load_s": tool_load,
                     "first_vision_ms": sec("first_vision_ms"),
                     "first_prefill_tok_s": sec("first_prefill_tok_s"),
                     "first_decode_tok_s": sec("first_decode_tok_s"),
                     "decode_tok_s_depth0": {"llama.cpp": median([r["llama.cpp"].get("decode_tok_s_depth0")
                                                                  for r in runs]), "edgevlm": None},
                     "peak_rss_mib": sec("peak_rss_mib"),
                     "notes": {
                         "cold_s": "spawn -> end of the first request (= load + end to end)",
                         "tool_load_s": "llama.cpp: llama_perf 'load time' (the LLM file only, not the mmproj); "
                                        "edgevlm: Session.load_s (both graphs, tokenizer, hash check)",
                         "first_*": "the first request of the fresh process; llama.cpp: llama-mtmd-cli's request "
                                    "(prefill = prompt eval minus the CLIP encode its window spans, image batch + "
                                    "text; decode = eval runs), edgevlm: its first request (the table's figures "
                                    "are its second, warm request)",
                         "peak_rss_mib": "ru_maxrss of the llama-mtmd-cli process / the edgevlm worker (two "
                                         "requests)"}}
        cmd = ("python benchmarks/peer_compare.py " + " ".join(
            a for a in (sys.argv[1:] if argv is None else list(argv))))
        report: dict[str, Any] = {
            "benchmark": "peer_compare", "date": time.strftime("%Y-%m-%d"), "command": cmd,
            "repeats": args.repeats, "threads": threads,
            "workload": {"prompt_tokens": args.prompt_tokens, "visual_tokens": VISUAL_TOKENS,
                         "new_tokens": args.new_tokens, "image": "336x336 edgevlm.bench.workload.make_image(i, seed)",
                         "seed": args.seed, "llama_prompt": llama_prompt, "llama_chat_template": CHAT_TEMPLATE,
                         "llama_prompt_positions": first["prompt_tokens"], "edgevlm_prompt": edge_prompt,
                         "edgevlm_text_tokens": fit["text_tokens"], "greedy": True, "ignore_eos": True},
            "table": table, "roofline": roof, "bandwidth": bw, "secondary": secondary,
            "loadavg": {"samples_1m": la, "min_1m": min(la), "max_1m": max(la),
                        "start": env.get("loadavg_start")},
            "environment": env, "cpu_extra": cpu_extra(),
            "llama_cpp": {"build": binfo, "source": "llama-cpp-python sdist vendor/llama.cpp" if
                          "llama_cpp_python" in str(src) else "LLAMA_SRC",
                          "binaries": {k: str(v) for k, v in bins.items()}, "quant": args.llm_quant,
                          "conversion": stamp, "llm_gguf": gguf_bytes, "mmproj_bytes": mmproj.stat().st_size},
            "edgevlm": {"bundle": str(bundle), "bundle_made": made, "bundle_bytes": b.total_size,
                        **{f"{k}_precision": v for k, v in
                           ((b.manifest.get("recipe") or {}).get("components") or {}).items()},
                        "decoder_bytes": dec_bytes, "precision": b.manifest.get("precision"),
                        "manifest_sha256": b.manifest_sha256,
                        "decode_backend": runs[0]["edgevlm"].get("decode_backend"),
                        "native_decode": (raw[0].get("edgevlm_raw") or {}).get("native_decode")},
            "reference": REFERENCE, "runs": raw, "notes": notes, "wall_s": time.perf_counter() - t_all}
        subs = [(str(build), "LLAMA_BUILD"), (str(src), "LLAMA_SRC"), (str(ckpt), "CKPT"), (str(gguf_dir), "GGUF_DIR"),
                (str(bundle), "BUNDLE"), (str(tmp), "TMP"), (tempfile.gettempdir(), "TMP"),
                (str(Path.home()), "~"), (str(ROOT), "REPO"), (sys.executable, "python")]
        if args.keep_logs:
            subs.append((str(Path(args.keep_logs).resolve()), "LOGS"))
        if args.fp32_bundle:
            subs.append((str(Path(args.fp32_bundle).resolve()), "FP32_BUNDLE"))
        report = scrub(report, subs)
        print(markdown_table(report["table"], report["roofline"]), flush=True)
        if not args.no_write:
            name = args.name or f"peer_compare_{cpu_slug(env)}"
            js, md = write_outputs(report, Path(args.out_dir), name)
            print(f"wrote {js} and {md}", flush=True)
        print(json.dumps({"table": {r["stage"]: {"llama.cpp": r["llama.cpp"], "edgevlm": r["edgevlm"],
                                                 "ratio": r["ratio"]} for r in report["table"]},
                          "cpu": env["cpu"]["model"], "loadavg_max": max(la)}))
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
    else:
        main()
