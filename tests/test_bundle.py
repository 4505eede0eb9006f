"""Bundle library: atomic writes, validation on read, update_manifest, `edgevlm inspect` (torch-free, fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevlm import bundle as B
from edgevlm.bundle import (FORMAT, MANIFEST_NAME, SCHEMA_VERSION, Bundle, BundleWriter, load_embedding_table,
                            model_entry, prompt_entry, read_bundle, sha256_file, update_manifest)
from edgevlm.config import get_model_config
from edgevlm.errors import BundleError

MODEL = "tiny-ldpnet"


def _manifest(cfg) -> dict:
    from edgevlm.preprocess import PreprocessConfig

    d, kv = cfg.llm.hidden_size, cfg.llm
    return {
        "model": model_entry(cfg, random_init=True, source="random-init"),
        "visual_tokens": cfg.visual_tokens,
        "prompt": prompt_entry("vicuna_v1", bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "preprocess": PreprocessConfig(image_size=cfg.vision.image_size).to_dict(),
        "tokenizer": {"file": "tokenizer/tokenizer.json", "files": ["tokenizer/tokenizer.json"]},
        "target": {"name": "cpu-ort"},
        "components": {
            "vision": {"file": "vision.onnx", "external_data": ["vision.onnx.data"], "opset": 20, "precision": "fp32",
                       "recipe": {"name": "fp32"},
                       "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 56, 56]}],
                       "outputs": [{"name": "image_embeds", "dtype": "float32",
                                    "shape": ["batch", cfg.visual_tokens, d]}],
                       "contrib_ops": False, "parity": {"max_abs_diff": 1.5e-6, "cosine": 0.9999999}},
            "embed": {"file": "embed_tokens.npy", "kind": "table", "dtype": "float32",
                      "shape": [kv.vocab_size, d]},
            "decoder": {"file": "decoder.onnx", "opset": 20, "precision": "fp32",
                        "inputs": [{"name": "inputs_embeds", "dtype": "float32", "shape": ["batch", "seq", d]}],
                        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, kv.vocab_size]}],
                        "kv_cache": {"num_layers": kv.num_layers, "num_kv_heads": kv.num_kv_heads,
                                     "head_dim": kv.head_dim, "layout": "batch,heads,seq,head_dim",
                                     "dtype": "float32", "past_key": "past_key_values.{i}.key",
                                     "past_value": "past_key_values.{i}.value", "present_key": "present.{i}.key",
                                     "present_value": "present.{i}.value"},
                        "logits": "last_position"},
        },
        "notes": ["test bundle"],
    }


def _write(dest: Path, overwrite: bool = False, payload: bytes = b"graph") -> Bundle:
    cfg = get_model_config(MODEL)
    with BundleWriter(dest, overwrite=overwrite) as w:
        (w.root / "vision.onnx").write_bytes(payload)
        (w.root / "vision.onnx.data").write_bytes(os.urandom(1000))
        (w.root / "decoder.onnx").write_bytes(b"decoder" * 10)
        np.save(w.root / "embed_tokens.npy", np.arange(cfg.llm.vocab_size * cfg.llm.hidden_size,
                                                        dtype=np.float32).reshape(cfg.llm.vocab_size, -1))
        w.path("tokenizer/tokenizer.json").write_text('{"model": {}}')
        w.set_manifest(_manifest(cfg))
    assert w.bundle is not None
    return w.bundle


def _edit_manifest(root: Path, fn) -> None:
    mpath = root / MANIFEST_NAME
    m = json.loads(mpath.read_text())
    fn(m)
    mpath.write_text(json.dumps(m))


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    dest = tmp_path / "b"
    _write(dest)
    return dest


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- round trip -------------------------------------------------------------------------------------------------
def test_round_trip(bundle_dir: Path) -> None:
    b = read_bundle(bundle_dir)
    m = b.manifest
    assert m["schema_version"] == SCHEMA_VERSION and m["format"] == FORMAT
    assert m["toolkit"]["name"] == "edgevlm" and m["created"].endswith("+00:00")
    assert set(m["files"]) == {"vision.onnx", "vision.onnx.data", "decoder.onnx", "embed_tokens.npy",
                               "tokenizer/tokenizer.json"}
    for rel, entry in m["files"].items():
        assert entry["size"] == (bundle_dir / rel).stat().st_size
        assert entry["sha256"] == sha256_file(bundle_dir / rel)
    cfg = get_model_config(MODEL)
    assert b.model_config == cfg and b.model_config.to_dict() == cfg.to_dict()
    assert b.preprocess_config.image_size == cfg.vision.image_size
    assert b.schema_version == 1 and b.hashes_verified and b.random_init
    assert b.total_size == sum(e["size"] for e in m["files"].values())
    assert b.component("decoder")["kv_cache"]["num_layers"] == cfg.llm.num_layers
    assert b.path("vision.onnx") == bundle_dir / "vision.onnx"
    assert b.tokenizer_path.name == "tokenizer.json" and b.path("tokenizer").is_dir()
    table = load_embedding_table(b)
    assert isinstance(table, np.memmap) and table.shape == (cfg.llm.vocab_size, cfg.llm.hidden_size)
    # the manifest on disk is sorted, indented JSON
    text = (bundle_dir / MANIFEST_NAME).read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert _leftovers(bundle_dir.parent) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert (bundle_dir.stat().st_mode & 0o777) == 0o777 & ~umask          # not mkdtemp's 0700
    assert ((bundle_dir / MANIFEST_NAME).stat().st_mode & 0o777) == 0o666 & ~umask
    with pytest.raises(AttributeError):
        b.root = Path("/")  # type: ignore[misc]


def test_component_and_path_errors(bundle_dir: Path) -> None:
    b = read_bundle(bundle_dir, verify_hashes=False)
    assert not b.hashes_verified
    with pytest.raises(BundleError, match=r"no component 'audio'.*decoder, embed, vision"):
        b.component("audio")
    with pytest.raises(BundleError, match="leaves the bundle"):
        b.path("../etc/passwd")
    with pytest.raises(BundleError, match="not listed"):
        b.path("stray.bin")


def test_every_registry_model_round_trips(tmp_path: Path) -> None:
    from edgevlm.config import model_names

    for name in model_names():
        cfg = get_model_config(name)
        assert B._model_config(json.loads(json.dumps(model_entry(cfg, random_init=False, source="x")))) == cfg


# ---- rejection ----------------------------------------------------------------------------------------------------
def test_corrupted_file(bundle_dir: Path) -> None:
    p = bundle_dir / "vision.onnx.data"
    data = bytearray(p.read_bytes())
    data[10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"'vision.onnx.data'.*sha256.*modified or corrupted.*re-export or re-copy"):
        read_bundle(bundle_dir)
    read_bundle(bundle_dir, verify_hashes=False)  # same size: only the hash notices


def test_truncated_file(bundle_dir: Path) -> None:
    (bundle_dir / "decoder.onnx").write_bytes(b"short")
    with pytest.raises(BundleError, match=r"'decoder.onnx'.*5 bytes.*says 70"):
        read_bundle(bundle_dir, verify_hashes=False)


def test_missing_file(bundle_dir: Path) -> None:
    (bundle_dir / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match=r"file 'decoder.onnx' listed in the manifest is missing"):
        read_bundle(bundle_dir)


def test_missing_and_invalid_manifest(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(tmp_path / "nope")
    (bundle_dir / MANIFEST_NAME).write_text('{"format": "edgevlm-bundle",')
    with pytest.raises(BundleError, match=r"not valid JSON \(.* line 1 column"):
        read_bundle(bundle_dir)
    (bundle_dir / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match=f"no {MANIFEST_NAME}"):
        read_bundle(bundle_dir)


def test_wrong_format_and_schema_version(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m.update(schema_version=2))
    with pytest.raises(BundleError, match=r"bundle schema version 2, this edgevlm reads 1; upgrade edgevlm"):
        read_bundle(bundle_dir)
    _edit_manifest(bundle_dir, lambda m: m.update(schema_version=0))
    with pytest.raises(BundleError, match=r"bundle schema version 0, this edgevlm reads 1; re-export with edgevlm >="):
        read_bundle(bundle_dir)
    _edit_manifest(bundle_dir, lambda m: m.update(schema_version=1, format="gguf"))
    with pytest.raises(BundleError, match="not an edgevlm bundle: manifest format is 'gguf'"):
        read_bundle(bundle_dir)


@pytest.mark.parametrize("key", ["model", "components", "prompt", "preprocess", "files", "tokenizer"])
def test_missing_required_key(bundle_dir: Path, key: str) -> None:
    _edit_manifest(bundle_dir, lambda m: m.pop(key))
    with pytest.raises(BundleError, match=f"missing the required key '{key}'"):
        read_bundle(bundle_dir)


def test_inconsistent_model(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m.update(visual_tokens=7))
    with pytest.raises(BundleError, match="visual_tokens 7 disagrees"):
        read_bundle(bundle_dir)
    _edit_manifest(bundle_dir, lambda m: (m.update(visual_tokens=4), m["model"].update(wings=2)))
    with pytest.raises(BundleError, match="unknown key.*wings"):
        read_bundle(bundle_dir)


def test_dotdot_in_files(bundle_dir: Path) -> None:
    (bundle_dir.parent / "x").write_bytes(b"outside")
    entry = {"size": 7, "sha256": sha256_file(bundle_dir.parent / "x")}
    _edit_manifest(bundle_dir, lambda m: m["files"].update({"../x": entry}))
    with pytest.raises(BundleError, match=r"manifest path '\.\./x' \(files\) leaves the bundle"):
        read_bundle(bundle_dir)


def test_dotdot_in_component(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m["components"]["vision"].update(file="../x"))
    with pytest.raises(BundleError, match=r"manifest path '\.\./x' \(components.vision.file\) leaves the bundle"):
        read_bundle(bundle_dir)
    _edit_manifest(bundle_dir, lambda m: m["components"]["vision"].update(external_data=["sub/../../x"]))
    with pytest.raises(BundleError, match="leaves the bundle"):
        read_bundle(bundle_dir)


def test_absolute_path(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m["tokenizer"].update(file="/etc/passwd"))
    with pytest.raises(BundleError, match=r"'/etc/passwd' \(tokenizer.file\) is absolute"):
        read_bundle(bundle_dir)


def test_unnormalized_and_unlisted_reference(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m["components"]["decoder"].update(file="./decoder.onnx"))
    with pytest.raises(BundleError, match="not normalized"):
        read_bundle(bundle_dir)
    (bundle_dir / "extra.onnx").write_bytes(b"x")
    _edit_manifest(bundle_dir, lambda m: m["components"]["decoder"].update(file="extra.onnx"))
    with pytest.raises(BundleError, match=r"components.decoder.file references 'extra.onnx'.*not listed in 'files'"):
        read_bundle(bundle_dir)


def test_symlink_escaping_bundle(bundle_dir: Path) -> None:
    outside = bundle_dir.parent / "secret.bin"
    outside.write_bytes(b"graph")                    # same bytes: size and hash would match
    target = bundle_dir / "vision.onnx"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(BundleError, match=r"'vision.onnx' \(files\) leaves the bundle: it is a symlink"):
        read_bundle(bundle_dir)


def test_engines_paths_validated(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m.update(engines={"decoder": {"file": "../plan.engine"}}))
    with pytest.raises(BundleError, match=r"'\.\./plan.engine' \(engines.decoder.file\) leaves the bundle"):
        read_bundle(bundle_dir)


# ---- writer atomicity -------------------------------------------------------------------------------------------
def test_exception_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "b"
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(dest) as w:
            (w.root / "vision.onnx").write_bytes(b"half")
            assert w.root.parent == tmp_path and w.root.name.startswith(".b.tmp-")
            raise RuntimeError("boom")
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        with BundleWriter(dest) as w:
            (w.root / "vision.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_invalid_manifest_on_commit_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "b"
    with pytest.raises(BundleError, match=r"components.vision.file references 'vision.onnx', which was not written"):
        with BundleWriter(dest) as w:
            w.set_manifest(_manifest(get_model_config(MODEL)))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BundleError, match="missing the required key 'model'"):
        with BundleWriter(dest) as w:
            w.path("tokenizer/tokenizer.json").write_text("{}")
            w.add_component("vision", {"file": "tokenizer/tokenizer.json"})
    assert list(tmp_path.iterdir()) == []


def test_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "b"
    _write(dest, payload=b"first")
    with pytest.raises(BundleError, match="already exists; pass overwrite=True"):
        _write(dest, payload=b"second")
    assert read_bundle(dest).path("vision.onnx").read_bytes() == b"first"
    b = _write(dest, overwrite=True, payload=b"second")
    assert b.root == dest and (dest / "vision.onnx").read_bytes() == b"second"
    read_bundle(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]   # old bundle and temp dirs removed


def test_overwrite_failure_keeps_old_bundle(tmp_path: Path) -> None:
    dest = tmp_path / "b"
    _write(dest, payload=b"first")
    with pytest.raises(ValueError):
        with BundleWriter(dest, overwrite=True) as w:
            (w.root / "vision.onnx").write_bytes(b"second")
            raise ValueError
    assert read_bundle(dest).path("vision.onnx").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_refuses_non_bundle_destination(tmp_path: Path) -> None:
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"meow")
    for overwrite in (False, True):
        with pytest.raises(BundleError, match="exists and is not an edgevlm bundle; refusing"):
            with BundleWriter(user, overwrite=overwrite):
                pass
    assert (user / "cat.jpg").read_bytes() == b"meow"
    f = tmp_path / "file.txt"
    f.write_text("data")
    with pytest.raises(BundleError, match="not an edgevlm bundle"):
        with BundleWriter(f, overwrite=True):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty)                                       # an empty directory is fine to fill
    read_bundle(empty)


def test_writer_refuses_symlinks(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="symlink"):
        with BundleWriter(tmp_path / "b") as w:
            (w.root / "link").symlink_to("/etc/hostname")
            w.set_manifest({})
    assert list(tmp_path.iterdir()) == []


# ---- update_manifest --------------------------------------------------------------------------------------------
def test_update_manifest(bundle_dir: Path) -> None:
    (bundle_dir / "engines").mkdir()
    (bundle_dir / "engines" / "decoder.plan").write_bytes(b"plan" * 5)

    def add_engine(m: dict) -> None:
        m["engines"] = {"decoder": {"file": "engines/decoder.plan", "precision": "fp16", "trt_version": "10.3"}}
        m["quantization"] = {"decoder": {"recipe": "int8"}}
        m["schema_version"] = 99                    # the header is not the updater's to change

    created = read_bundle(bundle_dir).manifest["created"]
    b = update_manifest(bundle_dir, add_engine, new_files=["engines/decoder.plan"])
    assert b.manifest["files"]["engines/decoder.plan"]["size"] == 20
    again = read_bundle(bundle_dir)
    assert again.manifest["engines"]["decoder"]["precision"] == "fp16"
    assert again.schema_version == 1 and again.manifest["created"] == created and "updated" in again.manifest
    assert _leftovers(bundle_dir) == []
    with pytest.raises(BundleError, match="new file 'engines/missing.plan' does not exist"):
        update_manifest(bundle_dir, lambda m: None, new_files=["engines/missing.plan"])
    with pytest.raises(BundleError, match=r"engines.x.file references 'nope.plan'"):
        update_manifest(bundle_dir, lambda m: m["engines"].update(x={"file": "nope.plan"}))
    read_bundle(bundle_dir)                         # failed updates left the manifest untouched


def test_embedding_table_checks(bundle_dir: Path) -> None:
    b = update_manifest(bundle_dir, lambda m: m["components"]["embed"].update(shape=[3, 3]))
    with pytest.raises(BundleError, match=r"has shape \[384, 64\] but the manifest says \[3, 3\]"):
        load_embedding_table(b)
    b = update_manifest(bundle_dir, lambda m: m["components"]["embed"].update(kind="onnx", shape=[384, 64]))
    with pytest.raises(BundleError, match="not an embedding table"):
        load_embedding_table(b)


# ---- torch-free import ------------------------------------------------------------------------------------------
def test_bundle_imports_without_torch() -> None:
    code = ("import edgevlm.bundle, sys; bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- edgevlm inspect --------------------------------------------------------------------------------------------
def test_inspect_cli(bundle_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgevlm.cli import main

    assert main(["inspect", str(bundle_dir)]) == 0
    out = capsys.readouterr().out
    for text in (MODEL, "vision.onnx", "pixel_values", "decoder", "KV cache", "RANDOM INIT", "verified",
                 "[batch, 3, 56, 56]", "cosine 0.9999999"):
        assert text in out, text
    assert main(["inspect", str(bundle_dir), "--json-output"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == FORMAT and data["components"]["embed"]["kind"] == "table"
    assert main(["inspect", str(bundle_dir), "--no-verify"]) == 0
    assert "NOT verified" in capsys.readouterr().out
    (bundle_dir / "decoder.onnx").write_bytes(b"x" * 70)
    assert main(["inspect", str(bundle_dir)]) == 2
    assert "modified or corrupted" in capsys.readouterr().err
