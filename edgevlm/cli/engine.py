"""``edgevlm build-engine BUNDLE`` (TensorRT engines on the device), ``edgevlm register-engines BUNDLE`` (record
engines that the bundle's build_engines.sh built with trtexec) and ``edgevlm verify BUNDLE`` (is the bundle sound;
do its engines agree with ONNX Runtime?).

    edgevlm build-engine out/bundle-orin                      # on the Jetson / GPU box: engines/*.engine + manifest
    edgevlm build-engine out/bundle-orin --only decoder --no-timing-cache --verbose
    bash out/bundle-orin/build_engines.sh                     # trtexec; ends with `edgevlm register-engines .`
    edgevlm register-engines out/bundle-orin --tensorrt 10.3.0
    edgevlm verify out/bundle-orin [--json-output] [--samples 2] [--seed 0] [--engines auto|skip|require]

Nothing heavy at import time; neither verb imports torch (both run on devices).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from edgevlm.cli import positional

__all__ = ["build_engine", "register_engines", "verify", "build_bundle_engines", "register_bundle_engines",
           "COMMANDS"]

log = logging.getLogger(__name__)


def build_bundle_engines(bundle_dir: str | os.PathLike, *, only: list[str] | None = None,
                         allow_version_mismatch: bool = False, timing_cache: bool = True,
                         verbose: bool = False) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Build a TensorRT bundle's engines (``trt_build.build_engines``) and record them in its manifest under
    ``tensorrt.engines`` (file, bytes, sha256, TensorRT version, device, compute capability, build time, profiles),
    with each engine file hashed into ``files`` (``update_manifest``), so ``read_bundle`` verifies them.

    Returns ``(bundle, {component: metadata})``. Raises ``TargetError`` for a bundle exported for a non-TensorRT
    target, ``MissingDependency`` / ``RuntimeBackendError`` (from ``trt_build``) without TensorRT or a GPU.
    """
    from edgevlm.exporter.trt_build import build_engines

    bundle = _tensorrt_bundle(bundle_dir, verify_hashes=True)     # never build from a tampered graph
    results = build_engines(bundle.root, only=only, allow_version_mismatch=allow_version_mismatch,
                            timing_cache=timing_cache, verbose=verbose)
    return _record_engines(bundle.root, results), results


def _tensorrt_bundle(bundle_dir: str | os.PathLike, verify_hashes: bool) -> Any:
    from edgevlm.bundle import read_bundle
    from edgevlm.errors import TargetError
    from edgevlm.graphs.trt_plan import PLAN_FILE

    bundle = read_bundle(bundle_dir, verify_hashes=verify_hashes)
    m = bundle.manifest
    tgt = m.get("target") or {}
    if not (bundle.root / PLAN_FILE).is_file() or "tensorrt" not in m:
        raise TargetError(f"bundle '{bundle.root}' was exported for target '{tgt.get('name', '?')}' "
                          f"({tgt.get('backend', 'onnxruntime')}), which has no TensorRT engines (no {PLAN_FILE}). "
                          f"Re-export it for a TensorRT target, e.g. `edgevlm export ... --target jetson-orin` (see "
                          f"`edgevlm targets`), then build its engines on that device")
    return bundle


def _record_engines(root: Path, results: dict[str, dict[str, Any]]) -> Any:
    """``manifest.tensorrt.engines[component] = metadata`` and each engine file hashed into ``files``."""
    from edgevlm.bundle import update_manifest

    def record(manifest: dict[str, Any]) -> None:
        entry = manifest.setdefault("tensorrt", {})
        engines = entry.get("engines")
        if not isinstance(engines, dict):
            engines = entry["engines"] = {}
        for component, meta in results.items():
            engines[component] = dict(meta)

    return update_manifest(root, record, new_files=[meta["file"] for meta in results.values()])


def register_bundle_engines(bundle_dir: str | os.PathLike, *, tensorrt: str | None = None,
                            built_by: str = "build_engines.sh", validate: bool = True,
                            trt: Any = None) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Record engines that are already on disk (built by the bundle's ``build_engines.sh`` with trtexec) in its
    manifest exactly like ``build_bundle_engines`` does (``trt_build.register_engines``: file, bytes, sha256, the
    full TensorRT version, device, profiles, ``built_by``; ``validated`` when tensorrt here deserialized them), each
    engine file hashed into ``files``. Returns ``(bundle, {component: metadata})``."""
    from edgevlm.exporter.trt_build import register_engines as collect

    bundle = _tensorrt_bundle(bundle_dir, verify_hashes=False)   # only adds files; sizes are still checked
    results = collect(bundle.root, tensorrt=tensorrt, built_by=built_by, validate=validate, trt=trt)
    return _record_engines(bundle.root, results), results


@positional("bundle")
def build_engine(bundle: str, only: list[str] | None = None, allow_version_mismatch: bool = False,
                 timing_cache: bool = True, verbose: bool = False) -> int:
    """Build the TensorRT engines of a bundle on this device and record them in its manifest.

    Reads the bundle's build_plan.json (written by `edgevlm export --target <TensorRT target>`), builds each engine
    with the TensorRT Python API (profiles for prefill and decode, builder flags for the installed TensorRT, DLA when
    planned, a shared timing cache), writes engines/*.engine and records file, size, sha256, TensorRT version, GPU
    and build time under manifest tensorrt.engines. Needs TensorRT and an NVIDIA GPU: run it on the Jetson / GPU box
    (or run the bundle's build_engines.sh there). Afterwards: `edgevlm verify BUNDLE` compares engines with ONNX
    Runtime.

    Args:
        bundle: the bundle directory (exported for a TensorRT target).
        only: build just these components (e.g. --only decoder).
        allow_version_mismatch: build with an installed TensorRT of another minor version than the plan's.
        timing_cache: load/save the plan's timing cache (--no-timing-cache to build from scratch).
        verbose: TensorRT INFO logging (same as the global -v).
    """
    verbose = verbose or logging.getLogger().isEnabledFor(logging.DEBUG)   # main() consumes the --verbose flag
    _, results = build_bundle_engines(bundle, only=only, allow_version_mismatch=allow_version_mismatch,
                                      timing_cache=timing_cache, verbose=verbose)
    _print_engines(bundle, results)
    return 0


@positional("bundle")
def register_engines(bundle: str, tensorrt: str | None = None, validate: bool = True) -> int:
    """Record the engines that the bundle's build_engines.sh built (trtexec) in its manifest.

    build_engines.sh runs this itself when edgevlm is installed on the device. For every engine of build_plan.json
    that is on disk it records what `edgevlm build-engine` records (file, size, sha256, TensorRT version, GPU and
    compute capability, target, builder flags, DLA core, profiles; built_by: build_engines.sh) under manifest
    tensorrt.engines and hashes the engine files into the manifest, so `edgevlm run` / `edgevlm verify` find them.
    Where TensorRT imports and a GPU is present, each engine is deserialized once to check that it loads.

    Args:
        bundle: the bundle directory (exported for a TensorRT target).
        tensorrt: the full TensorRT version that built the engines (build_engines.sh passes trtexec's, e.g.
            10.3.0); default: the installed tensorrt package's.
        validate: deserialize each engine when tensorrt is installed (--no-validate to skip).
    """
    _, results = register_bundle_engines(bundle, tensorrt=tensorrt, validate=validate)
    _print_engines(bundle, results)
    return 0


def _print_engines(bundle: str, results: dict[str, dict[str, Any]]) -> None:
    from rich import box
    from rich.table import Table

    from edgevlm.console import make_console

    table = Table(title=f"TensorRT engines of {bundle}", box=box.SIMPLE, title_justify="left")
    for col in ("component", "engine", "MiB", "build s", "TensorRT", "device", "profiles", "loads"):
        table.add_column(col, justify="right" if col in ("MiB", "build s") else "left")
    for comp, meta in results.items():
        build_s = meta.get("build_s")
        device = f"{meta.get('device') or 'unknown device'} (SM {meta.get('compute_capability') or '?'})"
        loads = ("yes (built here)" if "validated" not in meta else "yes" if meta["validated"]
                 else f"not checked: {meta.get('validation', '')}")
        table.add_row(comp, str(meta["file"]), f"{meta['bytes'] / 2**20:.1f}",
                      "-" if build_s is None else f"{build_s:.0f}", str(meta.get("tensorrt")), device,
                      ", ".join(p["name"] for p in meta.get("profiles", [])), loads)
    console = make_console()
    console.print(table)
    console.print(f"recorded in {Path(bundle) / 'manifest.json'} (tensorrt.engines); check them with "
                  f"`edgevlm verify {bundle}`")


@positional("bundle")
def verify(bundle: str, json_output: bool = False, samples: int = 2, seed: int = 0,
           engines: Literal["auto", "skip", "require"] = "auto") -> int:
    """Verify a bundle: hashes, ONNX graphs vs manifest, test runs, TensorRT checks, engines vs ONNX Runtime.

    Checks every file's sha256, loads each ONNX graph in ONNX Runtime (CPU) and compares its I/O with the manifest,
    runs the vision graph and a decoder prefill + decode step on random inputs (shapes, finiteness, KV-cache
    consistency); for TensorRT targets checks the graphs for TensorRT's parser and that build_plan.json /
    build_engines.sh agree with the graphs and the target; where engines are recorded and TensorRT + a GPU are
    present, runs them against ONNX Runtime. Exits 1 when a check fails.

    Args:
        bundle: the bundle directory.
        json_output: print the report as JSON instead of a table.
        samples: random inputs per run check.
        seed: seed of the random inputs.
        engines: auto (compare engines where TensorRT + GPU exist), skip, or require (fail without them).
    """
    from edgevlm.exporter.verify import print_report, verify_bundle

    report = verify_bundle(bundle, samples=samples, seed=seed, engines=engines)
    if json_output:
        print(report.to_json())
    else:
        print_report(report)
    return 0 if report.passed else 1


COMMANDS = {"build-engine": build_engine, "register-engines": register_engines, "verify": verify}
