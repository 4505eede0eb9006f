"""Run a bundle's TensorRT engines (built on the device by ``edgevlm build-engine``): vision + decoder with the KV
cache on the GPU. No torch, no onnx; ``tensorrt`` and ``cuda-python`` are imported inside the functions that need
them (``MissingDependency`` naming ``pip install 'edgevlm[tensorrt]'`` otherwise).

    >>> from edgevlm.bundle import read_bundle
    >>> from edgevlm.runtime.trt_backend import TrtBackend, engines_usable_here
    >>> ok, why = engines_usable_here(bundle.manifest)                    # backend="auto": never raises
    >>> be = TrtBackend.from_bundle(read_bundle("out/bundle-orin"))       # engines from manifest["tensorrt"]["engines"]
    >>> image_embeds = be.vision.encode(pixel_values)                     # [1, 3, S, S] -> [1, V, D] (host copy)
    >>> logits = be.decoder.prefill(embeds)                               # [1, T, D] -> [vocab] (pinned host view)
    >>> logits = be.decoder.step(embed_row)                               # [D] -> [vocab] at position = length
    >>> be.close()

The backend is four modules, imported one way (each re-exported here, so ``from edgevlm.runtime.trt_backend import
X`` keeps working for every name):

* ``trt_cuda``: ``import_tensorrt`` / ``import_cudart`` / ``tensorrt_available``, ``DeviceBuffer`` (``cudaMalloc``,
  ``cudaMemcpyAsync`` on the runner's stream), ``PinnedBuffer`` (``cudaMallocHost``), ``free_all``.
* ``trt_engine``: ``TensorInfo`` / ``io_table``, ``ProfileRange`` / ``profile_table`` / ``select_profile``,
  ``TrtEngine`` (one execution context; switches profile only when it changes), ``KVPingPong`` / ``KVStep``.
* ``trt_runners``: ``TrtVisionRunner`` (a ``VisionEncoder``) and ``TrtDecoderRunner`` (a ``Decoder``: preallocated
  buffers, the KV cache on the device in two ping-pong buffers per past tensor).
* ``trt_backend`` (this module): the bundle wiring. ``engine_entries`` reads ``manifest["tensorrt"]["engines"]``
  (never file names); ``check_engine_entry`` raises ``EngineMismatchError`` for engines of another TensorRT release
  or GPU architecture (naming both and the fix); ``engines_usable_here`` says, without raising, whether the engines
  can run here (``backend="auto"``); ``TrtBackend.from_bundle`` loads both runners on one CUDA stream.

Lifetimes: the runners, engines and ``TrtBackend`` are context managers; a constructor that fails half-way (out of
device memory) frees what it had allocated, ``from_bundle`` closes what it had loaded and destroys its stream, and
``close()`` frees every buffer even when one free fails (the first failure is raised afterwards). A DLA engine is
deserialized with ``IRuntime.DLA_core`` set to the core recorded at build time.

Tests: ``tests/test_trt_backend.py`` checks the bookkeeping with hand-made fake engines and runs a real tiny bundle
through ``tests/fake_tensorrt.py`` (a fake ``tensorrt`` whose engines run the bundle's ONNX graphs with ONNX Runtime,
and a fake ``cudart`` whose "device" is host memory); its ``tensorrt``-marked test runs real engines on a device.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from edgevlm.errors import BundleError, EdgeVLMError, RuntimeBackendError
from edgevlm.runtime.trt_cuda import (  # noqa: F401 - _check: re-exported (exporter.verify)
    PROVIDER_NAME, WHERE_TO_RUN, DeviceBuffer, PinnedBuffer, _check, _Closing,
                                      _destroy_stream, device_properties, free_all, import_cudart, import_tensorrt,
                                      tensorrt_available)
from edgevlm.runtime.trt_engine import (KVPingPong, KVStep, ProfileRange, TensorInfo, TrtEngine, io_table,
                                        profile_table, select_profile)
from edgevlm.runtime.trt_runners import TrtDecoderRunner, TrtVisionRunner

log = logging.getLogger(__name__)

__all__ = ["import_tensorrt", "import_cudart", "tensorrt_available", "device_properties", "DeviceBuffer",
           "PinnedBuffer", "TensorInfo", "ProfileRange", "io_table", "profile_table", "select_profile", "TrtEngine",
           "KVPingPong", "KVStep", "TrtVisionRunner", "TrtDecoderRunner", "TrtBackend", "engine_entries",
           "check_engine_entry", "EngineMismatchError", "engines_usable_here", "PROVIDER_NAME", "WHERE_TO_RUN",
           "free_all", "DLA_MIN_TRT11"]

# ---- bundle wiring --------------------------------------------------------------------------------------------------
def engine_entries(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``manifest["tensorrt"]["engines"]`` (component -> metadata written by ``edgevlm build-engine``)."""
    trt_entry = manifest.get("tensorrt")
    engines = trt_entry.get("engines") if isinstance(trt_entry, Mapping) else None
    if not isinstance(engines, Mapping) or not engines:
        if not isinstance(trt_entry, Mapping):
            raise BundleError("this bundle was not exported for a TensorRT target (no 'tensorrt' entry in its "
                              "manifest): re-export it with --target jetson-orin (or another TensorRT target from "
                              "`edgevlm targets`), then build its engines on the device with `edgevlm build-engine`")
        raise BundleError(f"this bundle has no TensorRT engines yet: {WHERE_TO_RUN}")
    return {str(k): dict(v) for k, v in engines.items()}


def _release(version: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> (10, 3, 0): major.minor.patch (the build number is not part of engine compatibility)."""
    out = []
    for part in str(version).strip().lstrip("v").split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


#: DLA returned in TensorRT 11 with 11.4.1 (JetPack 7.2.2+ on AGX Orin); 11.0-11.4.0 have no DLA.
DLA_MIN_TRT11 = (11, 4, 1)


class EngineMismatchError(RuntimeBackendError):
    """The bundle's engines were built for another GPU architecture (compute capability) or another TensorRT release
    than this device has: TensorRT engines only run where they were built. The fix is ``edgevlm build-engine BUNDLE``
    on this device. ``built`` / ``here``: ``{"compute_capability", "device", "tensorrt"}`` of each side."""

    def __init__(self, component: str, built: Mapping[str, Any], here: Mapping[str, Any], what: str) -> None:
        self.component, self.built, self.here, self.what = component, dict(built), dict(here), what
        super().__init__(
            f"the {component} engine does not belong to this device ({what}): it was built for "
            f"{_describe(built)}; this device is {_describe(here)}. TensorRT engines only run on the GPU architecture "
            f"and TensorRT release that built them: rebuild them here with `edgevlm build-engine BUNDLE` on this "
            f"device (or run the bundle with --backend ort)")


def _describe(side: Mapping[str, Any]) -> str:
    cc, dev, ver = side.get("compute_capability"), side.get("device"), side.get("tensorrt")
    gpu = f"SM {cc}" if cc else "an unrecorded GPU"
    return f"{gpu} ({dev or '?'}) with TensorRT {ver or '?'}"


def check_engine_entry(component: str, entry: Mapping[str, Any], trt_version: str,
                       device: tuple[str, str] | None) -> None:
    """An engine only runs with the TensorRT release (major.minor.patch, as recorded at build time; the build
    number does not count) that built it, on the same GPU architecture: ``EngineMismatchError`` naming both sides
    and the fix otherwise. A DLA engine on TensorRT 11 needs 11.4.1 or later (``RuntimeBackendError``).

    Args:
        component: "vision" / "decoder" (for the message).
        entry: the manifest's ``tensorrt.engines[component]`` (``tensorrt``, ``compute_capability``, ``device``).
        trt_version: the installed ``tensorrt.__version__``.
        device: (name, "major.minor") of this GPU, or None when unknown (not checked then).
    """
    built = str(entry.get("tensorrt", ""))
    have, want = _release(trt_version), _release(built)
    n = min(len(have), len(want))
    cc = str(entry.get("compute_capability") or "")
    built_side = {"compute_capability": cc or None, "device": entry.get("device"), "tensorrt": built or None}
    here_side = {"compute_capability": device[1] if device else None, "device": device[0] if device else None,
                 "tensorrt": trt_version}
    other_trt = bool(built) and n >= 2 and have[:n] != want[:n]
    other_gpu = device is not None and bool(cc) and bool(device[1]) and cc != device[1]
    if other_trt or other_gpu:
        what = " and ".join(w for w, bad in (("another GPU architecture", other_gpu),
                                             ("another TensorRT release", other_trt)) if bad)
        raise EngineMismatchError(component, built_side, here_side, what)
    if entry.get("dla_core") is not None and have and have[0] == 11 and have < DLA_MIN_TRT11:
        raise RuntimeBackendError(f"the {component} engine runs on DLA core {entry.get('dla_core')}, but TensorRT "
                                  f"{trt_version} has no DLA (TensorRT 11 brought DLA back in 11.4.1, JetPack "
                                  f"7.2.2+): upgrade TensorRT, or re-export without --dla and rebuild")


def engines_usable_here(manifest: Mapping[str, Any], device: int = 0) -> tuple[bool, str]:
    """Can this bundle's TensorRT engines run here? ``(True, "TensorRT x on <GPU> (SM c)")`` only when the manifest
    records vision and decoder engines, ``tensorrt`` and cuda-python import, a CUDA device exists, and both engines
    were built for its compute capability with the installed TensorRT release; else ``(False, why)``. Never raises
    (``backend="auto"`` falls back to another backend on False)."""
    try:
        entries = engine_entries(manifest)
        missing = [c for c in ("vision", "decoder") if c not in entries]
        if missing:
            return False, f"the bundle records no TensorRT engine for {', '.join(missing)}"
        try:
            trt = import_tensorrt()
        except ImportError:
            return False, "tensorrt is not installed"
        try:
            cudart = import_cudart()
        except ImportError:
            return False, "cuda-python is not installed"
        try:
            dev = device_properties(cudart, device)
        except (RuntimeBackendError, AttributeError, TypeError) as exc:
            return False, f"no usable CUDA device ({exc})"
        version = str(getattr(trt, "__version__", "?"))
        for comp in ("vision", "decoder"):
            check_engine_entry(comp, entries[comp], version, dev)
        return True, f"TensorRT {version} on {dev[0]} (SM {dev[1]})"
    except EdgeVLMError as exc:
        return False, str(exc)
    except Exception as exc:  # noqa: BLE001 - documented never to raise: auto falls back, saying why
        return False, f"TensorRT engines cannot be checked here: {type(exc).__name__}: {exc}"


class TrtBackend(_Closing):
    """The vision and decoder runners of a bundle on one CUDA stream. ``from_bundle`` picks the engines from
    ``manifest["tensorrt"]["engines"]`` (never from file names) and checks their TensorRT version and GPU."""

    def __init__(self, vision: TrtVisionRunner, decoder: TrtDecoderRunner, *, stream: Any, cudart: Any,
                 info: dict[str, Any] | None = None) -> None:
        self.vision, self.decoder, self.stream, self.cudart = vision, decoder, stream, cudart
        self.info = dict(info or {})

    @classmethod
    def from_bundle(cls, bundle: Any, *, context_length: int | None = None, verbose: bool = False,
                    device: int = 0) -> "TrtBackend":
        """Load ``bundle``'s engines (an ``edgevlm.bundle.Bundle``; its hashes were checked by ``read_bundle``)."""
        import time

        from edgevlm.runtime.kv_cache import KVSpec

        t0 = time.perf_counter()
        m = bundle.manifest
        entries = engine_entries(m)
        missing = [c for c in ("vision", "decoder") if c not in entries]
        if missing:
            raise BundleError(f"the bundle has no TensorRT engine for {', '.join(missing)}: build it on the device "
                              f"with `edgevlm build-engine BUNDLE --only {' '.join(missing)}`")
        trt = import_tensorrt()
        cudart = import_cudart()
        _check(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")
        dev = device_properties(cudart, device)
        for comp in ("vision", "decoder"):
            check_engine_entry(comp, entries[comp], trt.__version__, dev)
        stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")

        def load(comp: str) -> TrtEngine:
            e = entries[comp]
            names = [p.get("name") for p in e.get("profiles", []) if isinstance(p, Mapping)]
            core = e.get("dla_core")
            return TrtEngine.load(bundle.path(e["file"]), name=f"{comp} engine", profile_names=names or None,
                                  trt=trt, verbose=verbose, dla_core=None if core is None else int(core))

        held: list[Any] = []                   # closed in reverse if anything below fails (no leaked device memory)
        try:
            vcomp = bundle.component("vision")
            v_engine = load("vision")
            held.append(v_engine)
            vision = TrtVisionRunner(v_engine, input_name=vcomp["inputs"][0]["name"],
                                     output_name=vcomp["outputs"][0]["name"], stream=stream, cudart=cudart)
            held.append(vision)
            dcomp = bundle.component("decoder")
            kv = KVSpec.from_manifest(dcomp.get("kv_cache"))
            dec_engine = load("decoder")
            held.append(dec_engine)
            ctx = None
            if context_length is not None:
                ctx = min(int(context_length), max((p.shapes["attention_mask"][2][1] for p in dec_engine.profiles
                                                    if "attention_mask" in p.shapes), default=int(context_length)))
            decoder = TrtDecoderRunner(dec_engine, kv, stream=stream, cudart=cudart, max_context=ctx)
        except BaseException:
            for obj in reversed(held):
                try:
                    obj.close()
                except Exception as exc:  # noqa: BLE001 - the original error is the one to report
                    log.warning("cleanup after a failed TensorRT load: %s", exc)
            _destroy_stream(cudart, stream, quiet=True)
            raise
        info = {"device": dev[0], "compute_capability": dev[1], "tensorrt": trt.__version__,
                "engines": {c: entries[c]["file"] for c in ("vision", "decoder")},
                "device_bytes": vision.device_bytes + decoder.device_bytes,
                "max_context": decoder.max_context, "max_prompt": decoder.max_prompt,
                "load_s": time.perf_counter() - t0}
        log.info("TensorRT backend: %s, %.1f MiB of device buffers, context %d", dev[0],
                 info["device_bytes"] / 2**20, decoder.max_context)
        return cls(vision, decoder, stream=stream, cudart=cudart, info=info)

    def close(self) -> None:
        """Free both runners' buffers, drop the engines and destroy the stream: every step runs even when one
        fails (the first failure is raised afterwards); calling it twice is harmless."""
        errors: list[BaseException] = []
        for step in (self.vision.close, self.decoder.close, self.vision.engine.close, self.decoder.engine.close):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - collected and re-raised below
                errors.append(exc)
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                _destroy_stream(self.cudart, stream)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]

