"""The synthetic dataset: determinism, answers that follow from the pixels, balance, disjoint splits, atomic writes."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, deque

import numpy as np
import pytest

from edgevlm.errors import ConfigError, DataError
from edgevlm.train import synthetic as syn
from edgevlm.train.llava_data import load_dataset


def _digest(img) -> str:
    return hashlib.sha1(np.asarray(img).tobytes()).hexdigest()


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (y, x)."""
    seen = np.zeros_like(mask)
    comps = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, pix = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            pix.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(np.array(pix))
    return comps


def _shape_from_pixels(pix: np.ndarray) -> str:
    """Classify a component by how much of its bounding box it fills (square 1.0, circle .79, triangle .5,
    star .38)."""
    h = pix[:, 0].max() - pix[:, 0].min() + 1
    w = pix[:, 1].max() - pix[:, 1].min() + 1
    fill = len(pix) / (h * w)
    ideal = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "star": 0.384}
    return min(ideal, key=lambda k: abs(ideal[k] - fill))


def test_deterministic_by_seed_and_independent_of_count():
    a = syn.generate_samples(12, "train", seed=7)
    b = syn.generate_samples(12, "train", seed=7)
    assert [_digest(s.image) for s in a] == [_digest(s.image) for s in b]
    assert [(s.question, s.answer, s.caption) for s in a] == [(s.question, s.answer, s.caption) for s in b]
    c = syn.generate_samples(12, "train", seed=8)
    assert [_digest(s.image) for s in a] != [_digest(s.image) for s in c]
    # a sample depends on its index, not on how many are drawn
    d = syn.generate_samples(4, "train", seed=7, start=8)
    assert [_digest(s.image) for s in d] == [_digest(s.image) for s in a[8:]]
    assert a[0].image.mode == "RGB" and a[0].image.size == (112, 112)


@pytest.mark.parametrize("grid", [2, 3])
def test_answers_follow_from_pixels(grid):
    size = 112
    cell = size / grid
    checked = Counter()
    for s in syn.generate_samples(60, "test", seed=1, grid=grid):
        arr = np.asarray(s.image).astype(int)                                  # [S, S, 3]
        shapes = s.scene.shapes
        assert shapes, s
        rgb = syn.COLORS[shapes[0].color]
        for sh in shapes:                                                     # exact colour at every centre
            assert tuple(arr[int(round(sh.cy)), int(round(sh.cx))]) == syn.COLORS[sh.color]
        mask = (arr == np.array(rgb)).all(-1)
        comps = _components(mask)
        assert len(comps) == len(shapes)                                      # no overlaps, nothing else drawn
        qt, answer = s.question_type, s.answer
        checked[qt] += 1
        if qt == "count":
            assert int(answer) == len(comps) == len(shapes)
            assert s.scene.kind == "count"
            continue
        assert len(comps) == 1
        pix = comps[0]
        cy, cx = pix[:, 0].mean(), pix[:, 1].mean()
        if qt == "color":
            assert tuple(arr[int(round(shapes[0].cy)), int(round(shapes[0].cx))]) == syn.COLORS[answer]
        elif qt == "position":               # named independently of the generator's table
            rows = ["top", "bottom"] if grid == 2 else ["top", "middle", "bottom"]
            cols = ["left", "right"] if grid == 2 else ["left", "center", "right"]
            expected = f"{rows[int(cy // cell)]} {cols[int(cx // cell)]}".replace("middle center", "center")
            assert expected == answer
        elif qt == "size":
            extent = max(np.ptp(pix[:, 0]), np.ptp(pix[:, 1])) + 1   # small: ~half a cell wide, large: ~0.9
            assert (extent < 0.6 * cell) if answer == "small" else (extent > 0.72 * cell), (answer, extent / cell)
        elif qt == "shape":
            assert _shape_from_pixels(pix) == answer
    assert set(checked) == set(syn.QUESTION_TYPES)


def test_color_names_match_their_hue():
    import colorsys

    hue = {"red": 0, "orange": 28, "yellow": 55, "green": 128, "blue": 228, "purple": 283}
    assert set(hue) == set(syn.COLORS)
    for name, rgb in syn.COLORS.items():
        h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
        assert s > 0.7 and v > 0.6
        assert min(abs(h * 360 - hue[name]), 360 - abs(h * 360 - hue[name])) < 15, name


def test_background_is_far_from_every_shape_color():
    for s in syn.generate_samples(20, "val", seed=2):
        arr = np.asarray(s.image).astype(int).reshape(-1, 3)
        palette = np.array(list(syn.COLORS.values()))
        dist = np.sqrt(((arr[:, None, :] - palette[None]) ** 2).sum(-1)).min(1)     # per pixel, nearest colour
        is_shape = dist == 0
        assert dist[~is_shape].min() > 100


def test_question_types_balanced_and_answers_in_vocabulary():
    samples = syn.generate_samples(100, "train", seed=0)
    counts = Counter(s.question_type for s in samples)
    assert counts == {t: 20 for t in syn.QUESTION_TYPES}
    vocab = syn.answer_vocabulary()
    for t, answers in vocab.items():          # answers of each type balanced too
        per = Counter(s.answer for s in samples if s.question_type == t)
        assert set(per) == set(answers) and max(per.values()) - min(per.values()) <= 1, (t, per)
    for s in samples:
        assert s.answer in vocab[s.question_type]
        assert s.answer == s.answer.lower().strip()
        assert s.answer not in s.question.lower().split() or s.question_type == "size"  # size questions offer both
        assert s.turns[0][0].startswith("<image>\n")
    # every answer shows up
    seen = {(s.question_type, s.answer) for s in syn.generate_samples(600, "train", seed=0)}
    assert seen == {(t, a) for t, answers in vocab.items() for a in answers}


def test_glyphs_and_multi_turn():
    glyph = [s for s in syn.generate_samples(12, "train", seed=0, glyphs=True) if s.question_type == "letter"]
    assert len(glyph) == 2
    for s in glyph:
        g = s.scene.glyph
        assert s.answer == g.letter.lower() and s.answer in syn.answer_vocabulary(glyphs=True)["letter"]
        left, top, right, bottom = g.box
        ink = (np.asarray(s.image)[top:bottom, left:right] == syn.COLORS[g.color]).all(-1).sum()
        assert ink > 20
    multi = syn.generate_samples(10, "train", seed=0, multi_turn=True, glyphs=True)
    for s in multi:
        answers = syn.scene_answers(s.scene)
        assert len(s.qa) == len(answers) >= 2
        assert {q.question_type: q.answer for q in s.qa} == answers
        answered = set()
        for q in s.qa:       # no question names a shape or colour that a turn (this one or a later one) asks for
            assert "{" not in q.question
            for t in ("shape", "color"):
                if t in answers and t not in answered:
                    assert answers[t] not in q.question, (q, s.turns)
            answered.add(q.question_type)
        assert s.turns[0][0].startswith("<image>\n") and all("<image>" not in q for q, _ in s.turns[1:])
        rec = s.to_llava("images/x.png")
        assert rec["question_type"] == "multi" and len(rec["conversations"]) == 2 * len(s.qa)


def test_splits_disjoint_and_bad_parameters():
    digests = {split: {_digest(s.image) for s in syn.generate_samples(30, split, seed=0)}
               for split in ("train", "val", "test")}
    assert all(len(d) == 30 for d in digests.values())
    assert not (digests["train"] & digests["val"] or digests["train"] & digests["test"]
                or digests["val"] & digests["test"])
    with pytest.raises(ConfigError, match="image_size"):
        syn.make_sample(0, image_size=16)
    with pytest.raises(ConfigError, match="grid"):
        syn.make_sample(0, grid=5)


def test_write_dataset_roundtrip(tmp_path):
    out = tmp_path / "synth"
    syn.write_dataset(out, train=15, val=5, test=5, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]         # no temp dir left beside it
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["seed"] == 3 and info["splits"] == {"train": 15, "val": 5, "test": 5}
    assert info["question_types"] == list(syn.QUESTION_TYPES)
    assert info["answer_vocabulary"]["position"] == list(syn.POSITIONS)
    assert len(list((out / "images").iterdir())) == 25
    raw = json.loads((out / "train.json").read_text())
    assert raw[0]["image"] == "images/train_000000.png"
    assert raw[0]["conversations"][0]["value"].startswith("<image>\n")
    records = {split: load_dataset(out / f"{split}.json") for split in ("train", "val", "test")}
    ids = [r.id for rs in records.values() for r in rs]
    assert len(ids) == len(set(ids)) == 25
    mem = syn.generate_samples(15, "train", seed=3)
    for rec, s in zip(records["train"], mem):
        from PIL import Image

        with Image.open(rec.image_path) as im:
            assert _digest(im.convert("RGB")) == _digest(s.image)              # PNG is lossless
        assert rec.turns == s.turns and rec.question_type == s.question_type and rec.caption == s.caption


def test_write_dataset_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "synth"
    calls = {"n": 0}
    real = syn.Sample.to_llava

    def boom(self, image):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("disk full")
        return real(self, image)

    monkeypatch.setattr(syn.Sample, "to_llava", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        syn.write_dataset(out, train=10, val=0, test=0)
    assert list(tmp_path.iterdir()) == []                                       # nothing left behind
    monkeypatch.setattr(syn.Sample, "to_llava", real)

    syn.write_dataset(out, train=4, val=0, test=2)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(DataError, match="already holds a synthetic dataset; pass --overwrite"):
        syn.write_dataset(out, train=3, val=0, test=0)
    assert sorted(p.name for p in out.rglob("*")) == before                    # untouched
    syn.write_dataset(out, train=3, val=0, test=0, overwrite=True)
    assert not (out / "test.json").exists() and len(json.loads((out / "train.json").read_text())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]
    with pytest.raises(ConfigError, match="empty"):
        syn.write_dataset(tmp_path / "none", train=0, val=0, test=0)
    assert not (tmp_path / "none").exists()


def test_cli_synth(tmp_path, capsys):
    from edgevlm.cli import main

    out = tmp_path / "d"
    rc = main(["synth", "--out", str(out), "--train", "8", "--val", "2", "--test", "2", "--seed", "1",
               "--multi-turn", "--tokenizer-vocab", "384"])
    assert rc == 0
    assert "wrote 12 samples" in capsys.readouterr().out
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["multi_turn_train"] is True and info["tokenizer"]["vocab_size"] <= 384
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert all(r.question_type == "multi" for r in load_dataset(out / "train.json"))
    assert all(len(r.turns) == 1 for r in load_dataset(out / "test.json"))
    assert main(["synth", "--out", str(out), "--train", "2"]) == 2                # exists: typed error, exit 2
