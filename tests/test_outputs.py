"""Output folders: a verb replaces only what it wrote itself (marker files), and its files follow the umask."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest

from edgevlm.errors import CheckpointError, ConfigError, DataError, OutputError
from edgevlm.outputs import MARKER, check_destination, kind_of, mark, share_tree


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """``relative path -> permission bits`` of every file and folder under ``root`` (``root`` itself is '.')."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        if not p.is_symlink():
            out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def assert_umask_modes(root: Path, mask: int) -> None:
    """Folders 0o777 & ~mask; files 0o666 & ~mask, or 0o777 & ~mask when executable."""
    wrong = {}
    for rel, mode in modes(root).items():
        p = root / rel
        want = 0o777 & ~mask if p.is_dir() or mode & 0o111 else 0o666 & ~mask
        if mode != want:
            wrong[rel] = f"{mode:o} (want {want:o})"
    assert not wrong, wrong


def _precious(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "precious.txt").write_text("x")
    return folder / "precious.txt"


# ---- the rule ---------------------------------------------------------------------------------------------------
def test_check_destination_accepts_only_absent_empty_or_own(tmp_path):
    assert check_destination(tmp_path / "absent", "demo", overwrite=False) is False
    (tmp_path / "empty").mkdir()
    assert check_destination(tmp_path / "empty", "demo", overwrite=False) is False
    precious = _precious(tmp_path / "mine")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is not a demo output folder .not written by edgevlm.; refusing"):
            check_destination(tmp_path / "mine", "demo", overwrite=overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_destination(tmp_path / "file", "demo", overwrite=True)
    own = tmp_path / "own"
    own.mkdir()
    mark(own, "demo")
    (own / "old.txt").write_text("x")
    assert kind_of(own) == "demo"
    with pytest.raises(OutputError, match="already holds a demo output folder; pass --overwrite"):
        check_destination(own, "demo", overwrite=False)
    assert check_destination(own, "demo", overwrite=True) is True
    with pytest.raises(OutputError, match="is not a training run folder .a demo output folder."):
        check_destination(own, "train", overwrite=True)
    (own / MARKER).write_text("not json")                  # a damaged marker proves nothing
    with pytest.raises(OutputError, match="not written by edgevlm"):
        check_destination(own, "demo", overwrite=True)
    assert precious.read_text() == "x"
    assert isinstance(OutputError("x"), ConfigError)       # callers catching ConfigError keep working


def test_demo_never_deletes_a_folder_it_did_not_write(tmp_path, monkeypatch, capsys):
    from edgevlm.cli import main
    from edgevlm.demo import run_demo

    precious = _precious(tmp_path / "d")
    with pytest.raises(OutputError, match="refusing to replace it"):
        run_demo(tmp_path / "d", fast=True)                # overwrite defaults to True in the CLI; still refused
    assert main(["demo", "--out", str(tmp_path / "d"), "--fast"]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "d")                      # `edgevlm demo --out .` in a folder of the user's
    assert main(["demo", "--out", ".", "--fast"]) == 2
    assert precious.read_text() == "x" and sorted(p.name for p in (tmp_path / "d").iterdir()) == ["precious.txt"]


def test_synth_overwrite_replaces_only_its_own_dataset(tmp_path):
    from edgevlm.train.synthetic import write_dataset

    precious = _precious(tmp_path / "d")
    with pytest.raises(DataError, match="refusing to replace it"):
        write_dataset(tmp_path / "d", train=2, val=0, test=0, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["precious.txt"] and precious.read_text() == "x"
    ds = write_dataset(tmp_path / "ds", train=2, val=0, test=0)
    assert kind_of(ds) == "dataset"
    with pytest.raises(DataError, match="pass --overwrite"):
        write_dataset(ds, train=3, val=0, test=0)
    write_dataset(ds, train=3, val=0, test=0, overwrite=True)
    assert len(json.loads((ds / "train.json").read_text())) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]     # no temp or old folders left


def test_checkpoint_overwrite_replaces_only_a_checkpoint_it_wrote(tmp_path):
    from edgevlm.config import get_model_config
    from edgevlm.model import build_model, save_checkpoint

    model = build_model(get_model_config("tiny-ldpnet"))
    precious = _precious(tmp_path / "c")
    with pytest.raises(CheckpointError, match="refusing to replace it"):
        save_checkpoint(model, tmp_path / "c", overwrite=True)
    assert precious.read_text() == "x"
    out = save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="pass overwrite=True"):
        save_checkpoint(model, out)
    save_checkpoint(model, out, overwrite=True)
    assert kind_of(out) == "checkpoint" and (out / "model.safetensors").is_file()


def test_train_refuses_a_foreign_folder_before_any_work(tmp_path, capsys):
    from edgevlm.cli import main

    precious = _precious(tmp_path / "run")
    cfg = Path(__file__).resolve().parents[1] / "configs" / "train" / "demo.toml"
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--overwrite"]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["precious.txt"] and precious.read_text() == "x"


# ---- file modes -------------------------------------------------------------------------------------------------
def test_share_tree_follows_the_umask(tmp_path):
    root = tmp_path / "t"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o700)
    os.chmod(root / "a.txt", 0o600)
    os.chmod(root / "sub", 0o700)
    with umask(0o027):
        share_tree(root)
        assert_umask_modes(root, 0o027)
    assert stat.S_IMODE((root / "run.sh").stat().st_mode) == 0o750


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_synth_checkpoint_and_quantized_bundle_follow_the_umask(tmp_path_factory, mask):
    """tempfile makes 0700 folders and 0600 files; what a verb leaves behind has the umask's modes instead."""
    pytest.importorskip("onnx")
    from edgevlm.config import get_model_config
    from edgevlm.model import build_model, save_checkpoint
    from edgevlm.quant.apply import quantize_bundle
    from edgevlm.train.synthetic import write_dataset
    from tests.fixtures_bundles import tiny_bundle

    src, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    tmp = tmp_path_factory.mktemp("umask")
    with umask(mask):
        ds = write_dataset(tmp / "ds", train=2, val=0, test=1, tokenizer_vocab=300)
        ck = save_checkpoint(build_model(get_model_config("tiny-ldpnet")), tmp / "ck", tokenizer_src=ds / "tokenizer")
        q = quantize_bundle(src, tmp / "q", "int4", target="cpu", show=False, calibration_samples=2,
                            heldout_samples=1, decode_steps=1)
    for root in (ds, ck, Path(q)):
        assert_umask_modes(root, mask)
    assert any(p.suffix == ".data" for p in Path(q).iterdir())    # the external weights of the quantized graphs
