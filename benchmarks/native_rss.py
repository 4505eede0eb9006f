"""Peak RSS of ``edgevlm run`` with native decode: the weights read in place against the earlier private copy.

Each variant runs ``edgevlm run BUNDLE --image ... --prompt ... --max-new-tokens N --json-output`` in its own process
while this script polls ``/proc/PID/status`` every few milliseconds for ``VmRSS`` / ``RssAnon`` / ``RssFile`` and
the kernel's high-water mark ``VmHWM``. Variants:

* ``mapped``: this checkout (``edgevlm.runtime.native`` maps the decoder's data file read-only and shared);
* ``copy``: the same CLI with ``edgevlm/runtime/native/engine.py`` taken from ``--copy-rev`` (default ``8efd54d``,
  the last version that copied the weights into an anonymous huge-page mapping), swapped in before the session
  builds the native decoder;
* ``ort``: decode on ONNX Runtime (no native decoder), the reference for what ORT itself holds.

Next to the figures it writes what the bundle says should be resident: the native plan's weight bytes, the decoder's
external data file, and the KV cache at the request's context (ORT's fp32 buffers plus the kernel's fp16 copy; the
buffers are sized for the full context but only the rows written become resident). Results go to one JSON file with
the command lines, the CPU model, the kernel version and the date.

    python benchmarks/native_rss.py --bundle B4 --repeat 3 --out benchmarks/results/native_rss_mobilevlm-1.7b-int4.json

Never imports torch (the children are device-side processes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COPY_REV = "8efd54d"

# child bootstrap: optionally swap in another engine.py, then run the CLI
_BOOT = r"""
import sys, importlib.util
engine = sys.argv.pop(1)
if engine != "-":
    import edgevlm.runtime.native as nat
    spec = importlib.util.spec_from_file_location("edgevlm.runtime.native.engine", engine)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["edgevlm.runtime.native.engine"] = mod
    spec.loader.exec_module(mod)
    nat.NativeDecoder = mod.NativeDecoder
from edgevlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def run_one(cmd: list[str], interval: float = 0.005) -> dict:
    """Run ``cmd``; peaks of each RSS counter (bytes, sampled) and the last VmHWM seen; the child's JSON output."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak: dict[str, int] = {}
    at_peak: dict[str, int] = {}
    while p.poll() is None:
        try:
            st = _status(p.pid)
        except (OSError, ValueError):
            break
        for k, v in st.items():
            peak[k] = max(peak.get(k, 0), v)
        if st.get("VmRSS", 0) >= at_peak.get("VmRSS", 0):
            at_peak = st
        time.sleep(interval)
    out, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}")
    res = json.loads(out[out.index("{"):])
    return {"wall_s": round(time.perf_counter() - t0, 2), "peak_bytes": peak, "at_peak_rss": at_peak,
            "result": res}


def expected(bundle: Path, context: int) -> dict:
    """What the bundle says should be resident: native weights, the decoder data file, the KV cache at ``context``."""
    m = json.loads((bundle / "manifest.json").read_text())
    dec = m["components"]["decoder"]
    plan = dec.get("native_decode") or {}
    refs = []
    if plan:
        lins = [plan["lm_head"]] + [lp[f] for lp in plan["layers"] for f in ("qkv", "o", "gate_up", "up", "down")
                                    if lp[f] is not None]
        refs = [plan["cos_cache"], plan["sin_cache"], plan["final_norm"]]
        refs += [lp[k] for lp in plan["layers"] for k in ("input_norm", "post_attention_norm")]
        refs += [r for lin in lins for r in (lin["weight"], lin["scales"], lin.get("zero_points")) if r]
    native_w = sum(int(r["length"]) for r in refs if "inline" not in r)
    data = sorted({str(r["file"]) for r in refs if "file" in r})
    n_layers, kvh, hd = len(plan.get("layers", [])), int(plan.get("kv_heads", 0)), int(plan.get("head_dim", 0))
    kv32 = 2 * n_layers * kvh * hd * 4 * context
    return {"native_weight_bytes": native_w, "decoder_data_files": {f: (bundle / f).stat().st_size for f in data},
            "embed_table_bytes": sum(p.stat().st_size for p in bundle.glob("embed_tokens*.npy")),
            "vision_bytes": sum(p.stat().st_size for p in bundle.glob("vision.onnx*")),
            "kv_context_tokens": context, "kv_fp32_bytes": kv32, "kv_fp16_copy_bytes": kv32 // 2,
            "weights_plus_kv_bytes": native_w + kv32 + kv32 // 2}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--image", type=Path, help="default: a random 336x336 PNG")
    ap.add_argument("--prompt", default="What is in the picture?")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["copy", "mapped", "ort"], choices=["copy", "mapped", "ort"])
    ap.add_argument("--repeat", type=int, default=1, help="runs per variant, interleaved")
    ap.add_argument("--copy-rev", default=COPY_REV)
    ap.add_argument("--copy-engine", type=Path, help="the copying engine.py itself (instead of git show --copy-rev)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", default="")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="native-rss-"))
    image = a.image
    if image is None:
        from PIL import Image

        image = tmp / "image.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8)).save(image)
    old = tmp / "engine_copy.py"
    if a.copy_engine:
        old.write_text(a.copy_engine.read_text())
    else:
        old.write_text(subprocess.run(["git", "show", f"{a.copy_rev}:edgevlm/runtime/native/engine.py"], cwd=ROOT,
                                      check=True, capture_output=True, text=True).stdout)
    base = ["run", str(a.bundle), "--image", str(image), "--prompt", a.prompt, "--max-new-tokens",
            str(a.max_new_tokens), "--threads", str(a.threads), "--json-output", "--no-verify"]
    decode = {"copy": ["--native-decode", "on"], "mapped": ["--native-decode", "on"],
              "ort": ["--native-decode", "off"]}
    runs: dict[str, list] = {v: [] for v in a.variants}
    cmds = {}
    for _ in range(a.repeat):
        for v in a.variants:
            cmd = [sys.executable, "-c", _BOOT, str(old) if v == "copy" else "-", *base, *decode[v]]
            cmds[v] = "edgevlm " + " ".join(base + decode[v]) + (
                f"  (engine.py from {a.copy_rev})" if v == "copy" else "")
            r = run_one(cmd)
            t = r["result"].get("timings", {})
            runs[v].append({"wall_s": r["wall_s"], "peak_bytes": r["peak_bytes"], "at_peak_rss": r["at_peak_rss"],
                            "decode_tok_s": t.get("decode_tok_s"), "decode_backend": t.get("decode_backend"),
                            "prefill_tok_s": t.get("prefill_tok_s"), "load_s": t.get("load_s"),
                            "prompt_tokens": t.get("prompt_tokens"),
                            "generated_tokens": t.get("generated_tokens"),
                            "peak_rss_mb_reported": t.get("peak_rss_mb")})
            pk = r["peak_bytes"]
            print(f"{v:7s} VmHWM {pk.get('VmHWM', 0) / 2**20:7.0f} MiB  RssAnon {pk.get('RssAnon', 0) / 2**20:6.0f}"
                  f"  RssFile {pk.get('RssFile', 0) / 2**20:6.0f}  decode {t.get('decode_tok_s')} tok/s "
                  f"({t.get('decode_backend')})", flush=True)
    first = next(iter(runs.values()))[0]
    ctx = int(first["prompt_tokens"] or 0) + int(first["generated_tokens"] or 0)
    summary = {}
    for v, rs in runs.items():
        summary[v] = {"peak_rss_mib_median": round(float(np.median([r["peak_bytes"]["VmHWM"] for r in rs])) / 2**20,
                                                   1),
                      "peak_rss_anon_mib_median": round(float(np.median(
                          [r["peak_bytes"]["RssAnon"] for r in rs])) / 2**20, 1),
                      "peak_rss_file_mib_median": round(float(np.median(
                          [r["peak_bytes"]["RssFile"] for r in rs])) / 2**20, 1),
                      "decode_tok_s_median": round(float(np.median([r["decode_tok_s"] for r in rs])), 2),
                      "decode_tok_s_all": [r["decode_tok_s"] for r in rs]}
    out = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
           "bundle": str(a.bundle), "threads": a.threads, "commands": cmds, "expected": expected(a.bundle, ctx),
           "summary": summary, "runs": runs, "note": a.note}
    text = json.dumps(out, indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
