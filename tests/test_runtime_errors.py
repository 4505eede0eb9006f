"""Bad requests to the runtime give typed errors that say what is wrong (ImageError, PromptError, ConfigError,
BundleError, RuntimeBackendError), from the Python API and from ``edgevlm run`` (exit code 2, no traceback)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_bundles import QUESTION, make_image, tiny_bundle, write_png

from edgevlm.errors import BundleError, ConfigError, ImageError, PromptError, RuntimeBackendError
from edgevlm.runtime import Session

_SESSION: list[Session] = []


@pytest.fixture
def session(tmp_path_factory) -> Session:
    if not _SESSION:
        path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
        _SESSION.append(Session.from_bundle(path, threads=1, hash_stamps=None))
    return _SESSION[0]


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file whose IHDR claims ``width x height`` (a decompression bomb's header; 60 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)            # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


# ---- images -------------------------------------------------------------------------------------------------------
def test_corrupt_image_file(session, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not a png body" * 10)
    with pytest.raises(ImageError, match="cannot be decoded"):
        session.generate(bad, QUESTION, max_new_tokens=2)
    with pytest.raises(ImageError, match="cannot be decoded"):
        session.generate(b"GIF89a garbage", QUESTION, max_new_tokens=2)


def test_truncated_image_file(session, tmp_path):
    good = write_png(tmp_path / "good.png")
    data = good.read_bytes()
    cut = tmp_path / "truncated.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError):
        session.generate(cut, QUESTION, max_new_tokens=2)


def test_missing_image_file(session, tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        session.generate(tmp_path / "nope.png", QUESTION, max_new_tokens=2)


def test_zero_size_image(session):
    with pytest.raises(ImageError, match="0x0|at least one pixel"):
        session.generate(Image.new("RGB", (0, 0)), QUESTION, max_new_tokens=2)
    with pytest.raises(ImageError, match="shape"):
        session.generate(np.zeros((0, 0, 3), np.uint8), QUESTION, max_new_tokens=2)


def test_decompression_bomb_header(session, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))                   # claims 10 gigapixels
    assert bomb.stat().st_size < 200
    with pytest.raises(ImageError, match="decompression bomb|limit"):
        session.generate(bomb, QUESTION, max_new_tokens=2)
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(9_000, 9_000))                        # 81 MP: above the 64 MP default
    with pytest.raises(ImageError, match="limit"):
        session.generate(big, QUESTION, max_new_tokens=2)


def test_max_pixels_is_enforced(tmp_path_factory, tmp_path):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    s = Session.from_bundle(path, threads=1, hash_stamps=None, max_pixels=1000)
    img = write_png(tmp_path / "img.png")                                  # 60 x 40 = 2400 pixels
    with pytest.raises(ImageError, match="limit"):
        s.generate(img, QUESTION, max_new_tokens=2)


def test_bad_pixel_values_shape(session):
    with pytest.raises(ConfigError, match="pixel_values"):
        session.generate(None, QUESTION, pixel_values=np.zeros((3, 8, 8), np.float32), max_new_tokens=2)
    with pytest.raises(ConfigError, match="needs an image"):
        session.generate(None, QUESTION, max_new_tokens=2)


# ---- prompts ------------------------------------------------------------------------------------------------------
def test_prompt_longer_than_context(session):
    long_question = "red " * (session.context_length + 10)
    with pytest.raises(PromptError, match="context holds"):
        session.generate(make_image(), long_question, max_new_tokens=2)


def test_raw_prompt_without_image_placeholder(session):
    with pytest.raises(PromptError, match="no '<image>' placeholder"):
        session.generate(make_image(), "USER: What color is the circle? ASSISTANT:", raw_prompt=True,
                         max_new_tokens=2)
    # the same text without raw_prompt goes through the template, which adds the placeholder
    assert session.generate(make_image(), "What color is the circle?", max_new_tokens=1).tokens


def test_two_image_placeholders(session):
    with pytest.raises(PromptError, match="2 '<image>' placeholders"):
        session.generate(make_image(), "<image> and <image>", max_new_tokens=2)


def test_stream_raises_the_same_errors(session):
    with pytest.raises(PromptError):
        list(session.stream(make_image(), "no image here", raw_prompt=True, max_new_tokens=2))
    # the session stays usable after an error (its lock was released)
    assert session.generate(make_image(), QUESTION, max_new_tokens=1).tokens


# ---- generation parameters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": 1.0, "top_k": -2}, "top_k"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
])
def test_bad_generation_parameters(session, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        session.generate(make_image(), QUESTION, **kwargs)


# ---- bundles and backends -----------------------------------------------------------------------------------------
def _copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_bundle_is_refused(tmp_path_factory, tmp_path):
    src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    b = _copy_bundle(src, tmp_path / "b")
    data = bytearray((b / "embed_tokens.npy").read_bytes())
    data[-1] ^= 0xFF
    (b / "embed_tokens.npy").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Session.from_bundle(b, hash_stamps=None)


def test_unknown_kv_mode_is_refused(tmp_path_factory, tmp_path):
    from edgevlm.bundle import update_manifest

    src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    b = _copy_bundle(src, tmp_path / "b")

    def set_mode(m):
        m["components"]["decoder"]["kv_cache"]["mode"] = "paged"
    update_manifest(b, set_mode)
    with pytest.raises(BundleError, match="mode 'paged'"):
        Session.from_bundle(b, hash_stamps=None)


def test_manifest_io_names_must_match_graph(tmp_path_factory, tmp_path):
    from edgevlm.bundle import update_manifest

    src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    b = _copy_bundle(src, tmp_path / "b")

    def rename(m):
        m["components"]["vision"]["outputs"][0]["name"] = "features"
    update_manifest(b, rename)
    with pytest.raises(BundleError, match="does not describe this graph"):
        Session.from_bundle(b, hash_stamps=None)


def test_unavailable_provider(tmp_path_factory):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT EP is installed here")
    with pytest.raises(RuntimeBackendError, match="not available"):
        Session.from_bundle(path, providers=["tensorrt"], hash_stamps=None)


def test_bad_thread_count(tmp_path_factory):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    with pytest.raises(RuntimeBackendError, match="threads"):
        Session.from_bundle(path, threads=0, hash_stamps=None)


# ---- the CLI ------------------------------------------------------------------------------------------------------
def test_cli_reports_typed_errors(tmp_path_factory, tmp_path, capsys, monkeypatch):
    from edgevlm.cli import main

    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    rc = main(["run", str(path), "--image", str(bad), "--prompt", QUESTION, "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "cannot be decoded" in err and "Traceback" not in err
    good = write_png(tmp_path / "good.png")
    rc = main(["run", str(path), "--image", str(good), "--prompt", "no placeholder", "--raw-prompt", "--no-cache"])
    err = capsys.readouterr().err
    assert rc == 2 and "placeholder" in err
    rc = main(["run", str(path), "--image", str(good), "--prompt", QUESTION, "--no-cache", "--json-output",
               "--max-new-tokens", "3"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and len(out["tokens"]) <= 3 and out["timings"]["total_ms"] > 0


def test_hash_stamps_skip_unchanged_files_and_catch_later_tampering(tmp_path_factory, tmp_path):
    src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    b = _copy_bundle(src, tmp_path / "b")
    cache = tmp_path / "cache"
    first = Session.from_bundle(b, hash_stamps=cache)
    n = len(first.bundle.files)
    assert first.verification == f"stamps ({n} of {n} files hashed)"
    assert Session.from_bundle(b, hash_stamps=cache).verification == f"stamps (0 of {n} files hashed)"
    data = bytearray((b / "embed_tokens.npy").read_bytes())
    data[-1] ^= 0xFF
    (b / "embed_tokens.npy").write_bytes(bytes(data))                     # same size, new content
    with pytest.raises(BundleError, match="sha256"):
        Session.from_bundle(b, hash_stamps=cache)
    assert Session.from_bundle(b, hash_stamps=cache, verify_hashes=False).verification == "off"
    assert Session.from_bundle(b, hash_stamps=None, verify_hashes=False).verification == "off"
