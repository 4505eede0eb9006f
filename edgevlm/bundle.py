"""The bundle: the on-disk contract between the torch side (export) and the device side (runtime, bench).

A bundle is a directory holding ONNX graphs (+ external data), an embedding table, tokenizer files and
``manifest.json``, which describes everything the runtime needs: the runtime learns I/O names, dtypes, shapes,
KV layout, prompt template and preprocessing from the manifest, never from file names. This module depends on
the standard library and numpy only (plus the torch-free ``edgevlm.errors`` / ``edgevlm.config``), like gguf-py:
a device reads, validates and inspects bundles without torch, onnx or onnxruntime.

Write (atomically: built in ``.{dest.name}.tmp-XXXX`` beside ``dest``, then renamed)::

    with BundleWriter("out/tiny-bundle") as w:
        save_vision_onnx(w.root / "vision.onnx")
        w.set_manifest({"model": model_entry(cfg, random_init=True, source="random-init"), ...})
        w.add_component("vision", {"file": "vision.onnx", "opset": 20, ...})
    # on clean exit: files hashed, manifest.json written, directory renamed to out/tiny-bundle

Read (validates schema, paths, sizes and sha256 hashes; every failure is a ``BundleError`` naming the problem)::

    b = read_bundle("out/tiny-bundle")
    b.model_config, b.preprocess_config, b.component("decoder")["kv_cache"], b.path("vision.onnx")

Inspect from the shell: ``edgevlm inspect out/tiny-bundle [--json-output] [--no-verify]``.

Manifest schema (``schema_version`` 1)
--------------------------------------
Keys marked * are required; the reader rejects a bundle without them. ``files``, ``schema_version``, ``format``,
``toolkit`` and ``created`` are written by ``BundleWriter`` / ``update_manifest``; the exporter fills the rest.
All paths are relative POSIX paths inside the bundle (no ``..``, no absolute paths, no backslashes, no symlinks
leading outside); every referenced file must also be listed in ``files``::

    {
      "schema_version": 1,                       *  int; readers accept exactly SCHEMA_VERSION
      "format": "edgevlm-bundle",                *
      "toolkit": {"name": "edgevlm", "version": "0.1.0"},          *
      "created": "2025-01-01T12:00:00+00:00",    *  UTC ISO 8601 ("updated" is added by update_manifest)
      "model": {...ModelConfig.to_dict()...,     *  must round-trip through ModelConfig.from_dict (see model_entry)
                "random_init": bool, "source": "<checkpoint dir or 'random-init'>"},
      "visual_tokens": 144,                      *  == model_config.visual_tokens
      "prompt": {"template": "vicuna_v1",        *  "template" required; see prompt_entry
                 "system": "...", "image_placeholder": "<image>", "image_token_index": -200,
                 "chunkwise_tokenization": true, "stop_strings": ["</s>"],
                 "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
      "preprocess": {...PreprocessConfig.to_dict()...},            *  image_size == model vision.image_size
      "tokenizer": {"file": "tokenizer/tokenizer.json",            *  the tokenizers.Tokenizer file
                    "files": ["tokenizer/tokenizer.json", ...]},      every tokenizer file shipped
      "components": {                            *  name -> entry; every entry has "file"
        "vision":  {"file": "vision.onnx", "external_data": ["vision.onnx.data"], "opset": 20,
                    "precision": "fp32", "recipe": {...},
                    "inputs":  [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 336, 336]}],
                    "outputs": [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", 144, 2048]}],
                    "contrib_ops": false, "parity": {"max_abs_diff": ..., "cosine": ..., "tolerance": ...}},
        "embed":   {"file": "embed_tokens.npy", "kind": "table", "dtype": "float32", "shape": [32000, 2048]}
                   (or an ONNX graph entry like "vision", with "kind": "onnx"),
        "decoder": {..."file", "inputs", "outputs" as above...,
                    "kv_cache": {"num_layers": L, "num_kv_heads": H, "head_dim": d,
                                 "layout": "batch,heads,seq,head_dim", "dtype": "float32",
                                 "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
                                 "present_key": "present.{i}.key", "present_value": "present.{i}.value"},
                    "logits": "last_position"}
      },
      "target": {...},                              target profile the bundle was exported for (optional)
      "quantization": {...},                        quantization report (optional)
      "engines": {"<name>": {"file": "engines/<name>.plan", ...}},   optional; every "file"/"files" key at
                                                    any depth under "engines" is a bundle path and is validated
      "notes": ["..."],                             optional
      "files": {"vision.onnx": {"size": 123, "sha256": "<64 hex>"}, ...}   *  every file but manifest.json
    }

Component file references validated by the reader: each component's ``file``, ``external_data`` (list) and
``files`` (list); ``tokenizer.file`` / ``tokenizer.files``; any ``file`` / ``files`` under ``engines``.
Unknown extra keys are allowed everywhere except inside ``model`` (where they must be ModelConfig fields).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from edgevlm.config import ModelConfig
from edgevlm.errors import BundleError
from edgevlm.outputs import replace_dir, umask

__all__ = ["SCHEMA_VERSION", "MANIFEST_NAME", "FORMAT", "REQUIRED_KEYS", "MODEL_EXTRA_KEYS", "sha256_file",
           "BundleWriter", "Bundle", "read_bundle", "update_manifest", "load_embedding_table", "model_entry",
           "prompt_entry", "referenced_paths", "is_bundle"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMAT = "edgevlm-bundle"

#: Top-level keys every manifest must hold (besides ``format`` and ``schema_version``, checked first).
REQUIRED_KEYS = ("toolkit", "created", "model", "visual_tokens", "prompt", "preprocess", "tokenizer",
                 "components", "files")
#: Keys of ``manifest["model"]`` that are not ``ModelConfig`` fields.
MODEL_EXTRA_KEYS = ("random_init", "source")

_CHUNK = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ---- helpers ----------------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (multi-GB decoders never sit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _toolkit() -> dict[str, str]:
    from edgevlm import __version__
    return {"name": "edgevlm", "version": __version__}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    """What ``obj`` becomes after a JSON round trip (tuples -> lists), for comparisons."""
    return json.loads(json.dumps(obj))


def model_entry(cfg: ModelConfig, *, random_init: bool, source: str) -> dict[str, Any]:
    """The manifest's ``model`` section: ``cfg.to_dict()`` plus ``random_init`` and ``source``."""
    d = _jsonable(cfg.to_dict())
    d["random_init"] = bool(random_init)
    d["source"] = str(source)
    return d


def prompt_entry(template_name: str = "vicuna_v1", *, bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None, system: str | None = None) -> dict[str, Any]:
    """The manifest's ``prompt`` section for a template of ``edgevlm.prompt`` (chunk-wise tokenization)."""
    from edgevlm import prompt as _prompt  # torch-free (stdlib + edgevlm.config/errors)

    t = _prompt.template(template_name)
    return {"template": template_name, "system": t["system"] if system is None else system,
            "image_placeholder": _prompt.IMAGE_PLACEHOLDER, "image_token_index": _prompt.IMAGE_TOKEN_INDEX,
            "chunkwise_tokenization": True, "stop_strings": [t["sep2"]],
            "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}


def _check_relpath(rel: Any, where: str) -> str:
    """A manifest path must be a normalized relative POSIX path; returns it. Containment is checked separately."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"manifest path {rel!r} ({where}) is not a non-empty string; re-export the bundle")
    if "\\" in rel or "\x00" in rel:
        raise BundleError(f"manifest path '{rel}' ({where}) contains a backslash or NUL; bundle paths are POSIX "
                          f"relative paths ('dir/file'); re-export the bundle")
    if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        raise BundleError(f"manifest path '{rel}' ({where}) is absolute and leaves the bundle; bundle paths must "
                          f"be relative to the bundle directory")
    if ".." in rel.split("/"):
        raise BundleError(f"manifest path '{rel}' ({where}) leaves the bundle ('..' segment); bundle paths must "
                          f"stay inside the bundle directory")
    if posixpath.normpath(rel) != rel:
        raise BundleError(f"manifest path '{rel}' ({where}) is not normalized (expected "
                          f"'{posixpath.normpath(rel)}'); re-export the bundle")
    return rel


def _resolve_inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` after checking that it (following symlinks) stays inside ``root``."""
    _check_relpath(rel, where)
    p = root / rel
    real_root = root.resolve()
    real = p.resolve()
    if real != real_root and real_root not in real.parents:
        raise BundleError(f"manifest path '{rel}' ({where}) leaves the bundle: it is a symlink (or under one) that "
                          f"resolves to '{real}', outside '{real_root}'; copy the file into the bundle instead")
    return p


def referenced_paths(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (where, path) the manifest references outside ``files``: component files and external data,
    tokenizer files, engine files. ``where`` says which key holds it (for error messages)."""
    out: list[tuple[str, str]] = []

    def take(value: Any, where: str) -> None:
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                out.append((f"{where}[{i}]", v))
        elif value is not None:
            out.append((where, value))

    comps = manifest.get("components")
    if isinstance(comps, dict):
        for name, entry in comps.items():
            if isinstance(entry, dict):
                for key in ("file", "external_data", "files"):
                    if key in entry:
                        take(entry[key], f"components.{name}.{key}")
    tok = manifest.get("tokenizer")
    if isinstance(tok, dict):
        for key in ("file", "files"):
            if key in tok:
                take(tok[key], f"tokenizer.{key}")

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("file", "files"):
                    take(value, f"{where}.{key}")
                else:
                    walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    if isinstance(comps, dict):
        for name, entry in comps.items():
            if isinstance(entry, dict) and isinstance(entry.get("native_decode"), dict):
                walk(entry["native_decode"], f"components.{name}.native_decode")
    if "engines" in manifest:
        walk(manifest["engines"], "engines")
    trt = manifest.get("tensorrt")
    if isinstance(trt, dict) and "engines" in trt:          # where `edgevlm build-engine` records them
        walk(trt["engines"], "tensorrt.engines")
    return out


def is_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory whose manifest.json declares ``format: edgevlm-bundle`` (any version)."""
    m = Path(path) / MANIFEST_NAME
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _load_manifest(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise BundleError(f"bundle '{root}' does not exist; export one with `edgevlm export` or check the path")
    if not root.is_dir():
        raise BundleError(f"bundle '{root}' is not a directory (a bundle is a directory holding {MANIFEST_NAME})")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleError(f"'{root}' has no {MANIFEST_NAME}: not an edgevlm bundle, or an interrupted export or "
                          f"copy; re-export or re-copy it")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{mpath} is not UTF-8 text ({exc}); the manifest is corrupted: re-export or re-copy "
                          f"the bundle") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); the "
                          f"manifest is corrupted or was edited by hand: re-export or re-copy the bundle") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} holds a JSON {type(manifest).__name__}, not an object; re-export the bundle")
    return manifest


def _check_header(manifest: dict[str, Any], root: Path) -> None:
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise BundleError(f"'{root}' is not an edgevlm bundle: manifest format is {fmt!r}, expected '{FORMAT}'")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"bundle '{root}': manifest key 'schema_version' is missing or not an integer "
                          f"({version!r}); re-export the bundle")
    if version != SCHEMA_VERSION:
        toolkit = manifest.get("toolkit")
        made_by = toolkit.get("version", "?") if isinstance(toolkit, dict) else "?"
        from edgevlm import __version__
        fix = (f"re-export with edgevlm >= {__version__} (this version)" if version < SCHEMA_VERSION else
               f"upgrade edgevlm (the bundle was written by edgevlm {made_by}) or re-export it with this one")
        raise BundleError(f"bundle schema version {version}, this edgevlm reads {SCHEMA_VERSION}; {fix} "
                          f"(bundle '{root}')")


def _model_config(model: dict[str, Any]) -> ModelConfig:
    """``ModelConfig`` from ``manifest['model']``, checking it round-trips ``ModelConfig.to_dict()``."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)} | {"visual_tokens"}
    core = {k: v for k, v in model.items() if k not in MODEL_EXTRA_KEYS}
    unknown = sorted(set(core) - fields)
    if unknown:
        raise BundleError(f"manifest 'model' has unknown key(s) {', '.join(unknown)}: the bundle was written by a "
                          f"newer edgevlm; upgrade edgevlm or re-export the bundle")
    try:
        cfg = ModelConfig.from_dict(core)
    except (TypeError, KeyError, ValueError) as exc:
        raise BundleError(f"manifest 'model' is not a valid model configuration ({type(exc).__name__}: {exc}); "
                          f"re-export the bundle") from exc
    back = _jsonable(cfg.to_dict())
    if "visual_tokens" not in core:
        back.pop("visual_tokens")
    if back != _jsonable(core):
        diff = sorted(k for k in set(back) | set(core) if back.get(k) != _jsonable(core).get(k))
        raise BundleError(f"manifest 'model' does not round-trip through ModelConfig (differs in: "
                          f"{', '.join(diff)}); re-export the bundle")
    return cfg


def _validate(root: Path, manifest: dict[str, Any], *, verify_hashes: bool,
              skip_hash: Iterable[str] = ()) -> ModelConfig:
    """Everything ``read_bundle`` checks; returns the model config. ``skip_hash``: files just hashed."""
    _check_header(manifest, root)
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise BundleError(f"bundle '{root}': manifest is missing the required key '{key}'; it is incomplete "
                              f"or was written by an older edgevlm: re-export the bundle")
    for key in ("toolkit", "model", "prompt", "preprocess", "tokenizer", "components", "files"):
        if not isinstance(manifest[key], dict):
            raise BundleError(f"bundle '{root}': manifest key '{key}' must be a JSON object, got "
                              f"{type(manifest[key]).__name__}; re-export the bundle")
    if not manifest["components"]:
        raise BundleError(f"bundle '{root}': manifest 'components' is empty; re-export the bundle")
    for name, entry in manifest["components"].items():
        if not isinstance(entry, dict) or "file" not in entry:
            raise BundleError(f"bundle '{root}': component '{name}' has no 'file' entry; re-export the bundle")
    if "template" not in manifest["prompt"]:
        raise BundleError(f"bundle '{root}': manifest 'prompt' is missing the key 'template'; re-export the bundle")
    for key in ("image_size", "mean", "std"):
        if key not in manifest["preprocess"]:
            raise BundleError(f"bundle '{root}': manifest 'preprocess' is missing the key '{key}'; re-export")
    if "file" not in manifest["tokenizer"]:
        raise BundleError(f"bundle '{root}': manifest 'tokenizer' is missing the key 'file'; re-export the bundle")

    cfg = _model_config(manifest["model"])
    if manifest["visual_tokens"] != cfg.visual_tokens:
        raise BundleError(f"bundle '{root}': manifest visual_tokens {manifest['visual_tokens']!r} disagrees with "
                          f"the model config ({cfg.visual_tokens}); re-export the bundle")
    if manifest["preprocess"]["image_size"] != cfg.vision.image_size:
        raise BundleError(f"bundle '{root}': preprocess image_size {manifest['preprocess']['image_size']!r} "
                          f"disagrees with the vision tower ({cfg.vision.image_size}); re-export the bundle")

    files = manifest["files"]
    for rel, entry in files.items():
        p = _resolve_inside(root, rel, "files")
        if rel == MANIFEST_NAME:
            raise BundleError(f"manifest 'files' lists '{MANIFEST_NAME}' itself; re-export the bundle")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) \
                or not isinstance(entry.get("sha256"), str) or not _HEX64.match(entry["sha256"]):
            raise BundleError(f"manifest 'files' entry for '{rel}' must be {{'size': int, 'sha256': 64 hex}}, got "
                              f"{entry!r}; re-export the bundle")
        if not p.is_file():
            what = "is not a regular file" if p.exists() else "is missing"
            raise BundleError(f"file '{rel}' listed in the manifest {what} in bundle '{root}'; the bundle is "
                              f"incomplete (interrupted copy?): re-copy or re-export it")
        size = p.stat().st_size
        if size != entry["size"]:
            raise BundleError(f"file '{rel}' in bundle '{root}' is {size} bytes but the manifest says "
                              f"{entry['size']}: it was truncated, modified or corrupted; re-export or re-copy the "
                              f"bundle")
    for where, rel in referenced_paths(manifest):
        _resolve_inside(root, rel, where)
        if rel not in files:
            raise BundleError(f"manifest {where} references '{rel}', which is not listed in 'files' (no size or "
                              f"hash); re-export the bundle")
    if verify_hashes:
        skip = set(skip_hash)
        for rel, entry in files.items():
            if rel in skip:
                continue
            digest = sha256_file(root / rel)
            if digest != entry["sha256"]:
                raise BundleError(f"file '{rel}' in bundle '{root}' does not match its sha256 in the manifest "
                                  f"(got {digest[:12]}..., expected {entry['sha256'][:12]}...): it was modified or "
                                  f"corrupted after export; re-export or re-copy the bundle")
    return cfg


def _hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    """{relative POSIX path: {size, sha256}} for every regular file under ``root`` except the manifest."""
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                rel = Path(dirpath, d).relative_to(root).as_posix()
                raise BundleError(f"'{rel}' in the bundle being written is a symlink; bundles hold regular files "
                                  f"only (copy the target in)")
        for name in sorted(filenames):
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                continue
            if full.is_symlink() or not full.is_file():
                raise BundleError(f"'{rel}' in the bundle being written is a symlink or not a regular file; "
                                  f"bundles hold regular files only (copy the target in)")
            files[rel] = {"size": full.stat().st_size, "sha256": sha256_file(full)}
    return files


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON (sorted keys, indent 2) to a temp file beside ``path``, fsync, then ``os.replace``."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask()   # mkstemp makes 0600 files
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _manifest_for_write(manifest: dict[str, Any], files: dict[str, Any]) -> dict[str, Any]:
    m = copy.deepcopy(manifest)
    m["schema_version"] = SCHEMA_VERSION
    m["format"] = FORMAT
    m["toolkit"] = _toolkit()
    m.setdefault("created", _now())
    m["files"] = files
    try:
        json.dumps(m, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"the manifest is not JSON-serializable ({exc}); convert numpy values and tuples to "
                          f"plain Python (float(), int(), list()) before writing") from exc
    return m


# ---- the writer -------------------------------------------------------------------------------------------------
class BundleWriter:
    """Write a bundle atomically. Files go under ``w.root`` (a temp dir beside ``dest``); on a clean exit the
    manifest is completed (files, hashes, header), validated like ``read_bundle`` would, written, and the temp dir is
    renamed to ``dest``. On any exception (KeyboardInterrupt included) the temp dir is removed and nothing appears
    at ``dest``.

    Args:
        dest: the bundle directory to create.
        overwrite: replace an existing bundle at ``dest`` (never a non-bundle directory or file).
    """

    def __init__(self, dest: str | os.PathLike, overwrite: bool = False) -> None:
        self.dest = Path(dest)
        self.overwrite = overwrite
        self.manifest: dict[str, Any] = {}
        self._root: Path | None = None
        self.bundle: Bundle | None = None   # the written bundle, after a clean exit

    # -- lifecycle
    def _check_dest(self) -> None:
        d = self.dest
        if not d.exists() and not d.is_symlink():
            return
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            return                                            # an empty directory holds nothing to lose
        if not d.is_dir() or d.is_symlink() or not is_bundle(d):
            raise BundleError(f"'{d}' exists and is not an edgevlm bundle; refusing to replace it (it may hold your "
                              f"data). Choose another destination or remove it yourself")
        if not self.overwrite:
            raise BundleError(f"bundle '{d}' already exists; pass overwrite=True (--overwrite) to replace it or "
                              f"choose another destination")

    def __enter__(self) -> "BundleWriter":
        self._check_dest()
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._root = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self._root is not None and self._root.exists():
                shutil.rmtree(self._root, ignore_errors=True)
        return False

    @property
    def root(self) -> Path:
        """The temp directory to write component files into (valid inside the ``with`` block)."""
        if self._root is None:
            raise BundleError("BundleWriter.root is only available inside `with BundleWriter(dest) as w:`")
        return self._root

    # -- manifest building
    def set_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest being built (``files`` and the header keys are filled in on exit)."""
        self.manifest = copy.deepcopy(dict(manifest))

    def add_component(self, name: str, entry: dict[str, Any]) -> None:
        """Add (or replace) ``manifest['components'][name]``."""
        self.manifest.setdefault("components", {})[name] = copy.deepcopy(dict(entry))

    def path(self, rel: str) -> Path:
        """``root / rel`` for a file to write, with its parent directories created (``rel`` is checked)."""
        _check_relpath(rel, "BundleWriter.path")
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # -- commit
    def _commit(self) -> None:
        root = self.root
        for where, rel in referenced_paths(self.manifest):
            p = _resolve_inside(root, rel, where)
            if not p.is_file():
                raise BundleError(f"manifest {where} references '{rel}', which was not written into the bundle")
        files = _hash_tree(root)
        manifest = _manifest_for_write(self.manifest, files)
        cfg = _validate(root, manifest, verify_hashes=False)
        _write_json_atomic(root / MANIFEST_NAME, manifest)
        self._check_dest()                                    # re-check: something may have appeared meanwhile
        dest = self.dest
        replace_dir(root, dest)                               # umask modes (mkdtemp/mkstemp made 0700/0600)
        self._root = None
        self.manifest = manifest
        self.bundle = Bundle(dest, manifest, cfg=cfg, hashes_verified=True)
        log.info("wrote bundle %s (%d files, %.1f MB)", dest, len(files),
                 sum(f["size"] for f in files.values()) / 1e6)


# ---- the reader -------------------------------------------------------------------------------------------------
class Bundle:
    """A validated bundle. Attributes are read-only; treat ``manifest`` as read-only too."""

    __slots__ = ("_root", "_manifest", "_cfg", "_hashes_verified")

    def __init__(self, root: Path, manifest: dict[str, Any], *, cfg: ModelConfig | None,
                 hashes_verified: bool) -> None:
        object.__setattr__(self, "_root", Path(root))
        object.__setattr__(self, "_manifest", manifest)
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_hashes_verified", hashes_verified)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Bundle is read-only (cannot set '{name}'); use update_manifest() to change a bundle")

    def __repr__(self) -> str:
        return (f"Bundle('{self._root}', model='{self._manifest['model'].get('name')}', "
                f"components={list(self._manifest['components'])})")

    @property
    def root(self) -> Path:
        return self._root

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    @property
    def schema_version(self) -> int:
        return int(self._manifest["schema_version"])

    @property
    def hashes_verified(self) -> bool:
        """True when every file's sha256 was checked against the manifest on read (or just written)."""
        return self._hashes_verified

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self._manifest["files"]

    @property
    def total_size(self) -> int:
        """Bytes of all files listed in the manifest (manifest.json excluded)."""
        return sum(int(e["size"]) for e in self._manifest["files"].values())

    @property
    def manifest_sha256(self) -> str:
        """sha256 of manifest.json: identifies the bundle's exact contents (it lists every file's hash)."""
        return sha256_file(self._root / MANIFEST_NAME)

    @property
    def visual_tokens(self) -> int:
        return int(self._manifest["visual_tokens"])

    @property
    def prompt(self) -> dict[str, Any]:
        return self._manifest["prompt"]

    @property
    def components(self) -> list[str]:
        return list(self._manifest["components"])

    def path(self, rel: str) -> Path:
        """Absolute-ish path of a bundle file (or a directory holding bundle files), after checking that ``rel`` is
        a normalized relative path, stays inside the bundle and is listed in the manifest."""
        p = _resolve_inside(self._root, rel, "Bundle.path")
        files = self._manifest["files"]
        if rel not in files and not any(f.startswith(rel + "/") for f in files):
            raise BundleError(f"'{rel}' is not part of bundle '{self._root}' (not listed in the manifest's files)")
        return p

    def component(self, name: str) -> dict[str, Any]:
        comps = self._manifest["components"]
        if name not in comps:
            raise BundleError(f"bundle '{self._root}' has no component '{name}'; it has: {', '.join(comps)}")
        return comps[name]

    def component_path(self, name: str) -> Path:
        """Path of a component's main file (``components[name]['file']``)."""
        return self.path(self.component(name)["file"])

    @property
    def tokenizer_path(self) -> Path:
        """The ``tokenizers.Tokenizer`` JSON file (``tokenizer.file``)."""
        return self.path(self._manifest["tokenizer"]["file"])

    @property
    def model_config(self) -> ModelConfig:
        if self._cfg is None:
            object.__setattr__(self, "_cfg", _model_config(self._manifest["model"]))
        return self._cfg  # type: ignore[return-value]

    @property
    def random_init(self) -> bool:
        return bool(self._manifest["model"].get("random_init", False))

    @property
    def preprocess_config(self):  # -> edgevlm.preprocess.PreprocessConfig (imported lazily: it needs PIL)
        from edgevlm.preprocess import PreprocessConfig

        try:
            return PreprocessConfig.from_dict(self._manifest["preprocess"])
        except (TypeError, KeyError, ValueError) as exc:
            raise BundleError(f"manifest 'preprocess' is not a valid preprocessing config ({exc}); re-export the "
                              f"bundle") from exc


def read_bundle(path: str | os.PathLike, *, verify_hashes: bool = True) -> Bundle:
    """Open and validate a bundle: manifest JSON, format, schema version, required keys, model config, every
    path (relative, normalized, inside the bundle), every file's presence and size, and (``verify_hashes``) every
    file's sha256. Raises ``BundleError`` naming the problem and the fix."""
    root = Path(path)
    manifest = _load_manifest(root)
    cfg = _validate(root, manifest, verify_hashes=verify_hashes)
    return Bundle(root, manifest, cfg=cfg, hashes_verified=verify_hashes)


def update_manifest(bundle_dir: str | os.PathLike, updater: Callable[[dict[str, Any]], Any],
                    new_files: Iterable[str] = ()) -> Bundle:
    """Change an existing bundle in place (engine builds, quantization reports).

    ``updater(manifest)`` mutates the manifest (or returns a new dict). Each path in ``new_files`` (already
    written into the bundle directory) gets its size and sha256 recorded in ``files``. The result is validated
    (existing files by size; new ones were just hashed) and manifest.json is replaced atomically (temp file +
    ``os.replace``). Concurrent updates of the same bundle are not supported (the last writer wins).
    """
    root = Path(bundle_dir)
    manifest = _load_manifest(root)
    _check_header(manifest, root)
    new = copy.deepcopy(manifest)
    result = updater(new)
    if isinstance(result, dict):
        new = result
    new_files = list(new_files)
    files = new.setdefault("files", {})
    if not isinstance(files, dict):
        raise BundleError("update_manifest: manifest 'files' must stay a JSON object")
    for rel in new_files:
        p = _resolve_inside(root, rel, "new_files")
        if rel == MANIFEST_NAME:
            raise BundleError(f"update_manifest: '{MANIFEST_NAME}' cannot be listed as a bundle file")
        if p.is_symlink() or not p.is_file():
            raise BundleError(f"update_manifest: new file '{rel}' does not exist in bundle '{root}' (or is not a "
                              f"regular file); write it into the bundle directory first")
        files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    for key in ("schema_version", "format", "toolkit", "created"):     # the header is not the updater's to change
        if key in manifest:
            new[key] = manifest[key]
    new["updated"] = _now()
    try:
        json.dumps(new, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"update_manifest: the manifest is not JSON-serializable ({exc}); convert numpy values "
                          f"and tuples to plain Python first") from exc
    cfg = _validate(root, new, verify_hashes=False)
    _write_json_atomic(root / MANIFEST_NAME, new)
    return Bundle(root, new, cfg=cfg, hashes_verified=False)


# ---- numpy-side helpers -----------------------------------------------------------------------------------------
def load_embedding_table(bundle: Bundle, component: str = "embed") -> np.ndarray:
    """Memory-map the ``[vocab, hidden]`` embedding table of a ``kind: table`` component (``np.load(mmap_mode='r')``;
    read-only, pages in only the rows gathered)."""
    entry = bundle.component(component)
    kind = entry.get("kind", "table" if str(entry.get("file", "")).endswith(".npy") else "onnx")
    if kind != "table":
        raise BundleError(f"component '{component}' of bundle '{bundle.root}' is a '{kind}', not an embedding table "
                          f"(.npy); run it as a graph instead")
    path = bundle.path(entry["file"])
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"embedding table '{entry['file']}' of bundle '{bundle.root}' cannot be read as .npy "
                          f"({exc}); re-export the bundle") from exc
    if "shape" in entry and list(table.shape) != list(entry["shape"]):
        raise BundleError(f"embedding table '{entry['file']}' has shape {list(table.shape)} but the manifest says "
                          f"{entry['shape']}; re-export the bundle")
    if "dtype" in entry and str(table.dtype) != entry["dtype"]:
        raise BundleError(f"embedding table '{entry['file']}' has dtype {table.dtype} but the manifest says "
                          f"{entry['dtype']}; re-export the bundle")
    return table
