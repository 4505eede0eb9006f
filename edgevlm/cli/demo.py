"""``edgevlm demo``: the whole pipeline on the embedded default (see edgevlm/demo.py)."""

from __future__ import annotations


def demo(out: str = "demo_out", target: str = "cpu", fast: bool = False, overwrite: bool = True,
         threads: int | None = None, bench: bool = True) -> None:
    """Train, export, quantize, run and benchmark the embedded demo model end to end, on this machine.

    Trains the `demo` preset from scratch on the generated synthetic shapes dataset, exports an fp32 bundle for the
    target, quantizes it with the target's default recipe, compares exact-match accuracy (fp32 vs quantized) through
    the torch-free runtime, answers a few test images, prints one request's latency decomposition, and runs a small
    token-budget benchmark. About 10 minutes on 2 CPU cores (--fast: about a minute).

    Args:
        out: output directory (training run, bundles, benchmark report, demo_summary.json).
        target: hardware target profile (`edgevlm targets`); TensorRT targets also get build_plan.json and
            build_engines.sh in their bundles.
        fast: a smoke run of every stage on a few hundred samples (accuracy is then only above chance).
        overwrite: reuse --out when it holds an earlier demo (each stage replaces only what it wrote;
            --no-overwrite refuses). A folder the demo did not write (e.g. `--out .`) is never touched.
        threads: ONNX Runtime threads (default: physical cores).
        bench: run the token-budget benchmark stage.
    """
    from edgevlm.demo import run_demo

    run_demo(out, target=target, fast=fast, overwrite=overwrite, threads=threads, bench=bench)


COMMANDS = {"demo": demo}
