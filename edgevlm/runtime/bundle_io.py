"""Reading a bundle for the runtime: ``open_verified`` (``read_bundle`` with remembered sha256 checks), the
manifest's I/O tables and dtypes, and ONNX Runtime session creation for one component.

Shared by ``decoders`` (``OrtDecoder``), ``vision`` (``OrtVisionEncoder``) and ``session``. numpy + stdlib only
(onnxruntime is imported lazily by ``backends``); never torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgevlm.bundle import Bundle, read_bundle, sha256_file
from edgevlm.errors import BundleError
from edgevlm.runtime.backends import BackendOptions, SessionInfo, create_session

log = logging.getLogger(__name__)

__all__ = ["open_verified", "np_dtype", "io_table", "check_session_io", "create_component_session"]

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def np_dtype(entry: dict[str, Any], where: str) -> np.dtype:
    """The numpy dtype of one manifest I/O entry (``{"name", "dtype", "shape"}``)."""
    name = str(entry.get("dtype", "float32"))
    if name not in _NP:
        raise BundleError(f"{where}: dtype '{name}' is not supported by the runtime (supported: {', '.join(_NP)})")
    return np.dtype(_NP[name])


def io_table(entry: dict[str, Any], direction: str, component: str) -> dict[str, dict[str, Any]]:
    """``components.<component>.<inputs|outputs>`` as ``name -> entry``."""
    items = entry.get(direction)
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        raise BundleError(f"manifest components.{component}.{direction} is missing or malformed (a list of "
                          f"{{name, dtype, shape}}); re-export the bundle")
    return {i["name"]: i for i in items}


def check_session_io(sess: Any, entry: dict[str, Any], component: str) -> None:
    """The graph's real I/O names must be the manifest's."""
    for direction, actual in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        declared = set(io_table(entry, direction, component))
        got = {a.name for a in actual}
        if declared != got:
            raise BundleError(f"component '{component}': the graph's {direction} {sorted(got - declared)} are not "
                              f"in the manifest and {sorted(declared - got)} of the manifest are not in the graph; "
                              f"the manifest does not describe this graph: re-export the bundle")


def create_component_session(bundle: Bundle, component: str, providers: Sequence[Any],
                             opts: BackendOptions) -> tuple[Any, SessionInfo]:
    """An ``InferenceSession`` for ``component`` (``"vision"`` / ``"decoder"``), batch pinned to 1, through the
    optimized-graph cache when ``opts`` enables it; its I/O names checked against the manifest."""
    entry = bundle.component(component)
    files = [entry["file"], *(entry.get("external_data") or []), *(entry.get("files") or [])]
    hashes = [bundle.files[f]["sha256"] for f in dict.fromkeys(files) if f in bundle.files]
    free_dims: dict[str, int] = {}
    for io in entry.get("inputs") or []:
        shape = io.get("shape") or []
        if shape and isinstance(shape[0], str):
            free_dims[shape[0]] = 1                        # batch-1 runtime
    sess, info = create_session(bundle.component_path(component), kind=component, component=component,
                                file_hashes=hashes, providers=providers, opts=opts, free_dims=free_dims)
    check_session_io(sess, entry, component)
    return sess, info


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def open_verified(path: str | os.PathLike, *, verify_hashes: bool, stamp_dir: Path | None) -> tuple[Bundle, str]:
    """``read_bundle`` with the sha256 check remembered across loads.

    With ``stamp_dir``, a file whose hash was verified before and whose size, mtime,
    ctime, inode and device are unchanged since is not hashed again (ctime cannot be set back from user space, so any
    write to the file invalidates its stamp); every other file is hashed and compared with the manifest. Returns the
    bundle and how it was verified: ``"off"``, ``"full"`` or ``"stamps (N hashed)"``.
    """
    if not verify_hashes:
        return read_bundle(path, verify_hashes=False), "off"
    if stamp_dir is None:
        return read_bundle(path, verify_hashes=True), "full"
    bundle = read_bundle(path, verify_hashes=False)                    # structure, paths, sizes
    root = bundle.root
    ident = hashlib.sha256(f"{root.resolve()}\0{bundle.manifest_sha256}".encode()).hexdigest()[:24]
    stamp_file = stamp_dir / f"{ident}.json"
    try:
        stamps = json.loads(stamp_file.read_text())
        if not isinstance(stamps, dict):
            stamps = {}
    except (OSError, ValueError):
        stamps = {}
    hashed = 0
    fresh: dict[str, Any] = {}
    for rel, entry in bundle.files.items():
        p = root / rel
        key = _stat_key(p)
        old = stamps.get(rel)
        if isinstance(old, dict) and old.get("sha256") == entry["sha256"] and old.get("stat") == key:
            fresh[rel] = old
            continue
        digest = sha256_file(p)
        hashed += 1
        if digest != entry["sha256"]:
            raise BundleError(f"file '{rel}' in bundle '{root}' does not match its sha256 in the manifest (got "
                              f"{digest[:12]}..., expected {entry['sha256'][:12]}...): it was modified or corrupted "
                              f"after export; re-export or re-copy the bundle")
        fresh[rel] = {"sha256": digest, "stat": _stat_key(p)}
    if hashed or fresh != stamps:
        try:
            stamp_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = stamp_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, stamp_file)
        except OSError as exc:
            log.warning("cannot write hash stamps to %s (%s); the next load hashes the bundle again", stamp_file, exc)
    return bundle, f"stamps ({hashed} of {len(bundle.files)} files hashed)"
