"""LLaVA-format reader: valid JSON / JSONL, and a typed ``DataError`` naming the problem for each kind of bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from edgevlm.errors import DataError
from edgevlm.prompt import build_conversation
from edgevlm.train.llava_data import LlavaRecord, load_dataset


def _conv(q: str = "<image>\nWhat shape is shown?", a: str = "circle") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "images" / name)
    return tmp_path


def _snapshot(root: Path) -> list[tuple[str, float]]:
    return sorted((str(p), p.stat().st_mtime) for p in root.rglob("*"))


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=1))
    return path


def test_reads_json_list_and_jsonl(folder):
    records = [
        {"id": "x1", "image": "images/a.png", "conversations": _conv(), "question_type": "shape",
         "caption": "a red circle", "source": "unit"},
        {"id": 2, "image": "images/b.png",   # placeholder at the end, two turns, 'user'/'assistant' aliases
         "conversations": [{"from": "human", "value": "What color is it?\n<image>"}, {"from": "gpt", "value": "red"},
                           {"from": "user", "value": "And the shape?"}, {"from": "assistant", "value": "circle"}]},
    ]
    js = load_dataset(_write(folder / "d.json", records))
    jl_path = folder / "d.jsonl"
    jl_path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    jl = load_dataset(jl_path)
    for got in (js, jl):
        assert [type(r) for r in got] == [LlavaRecord, LlavaRecord]
        a, b = got
        assert a.id == "x1" and a.image_path == folder / "images" / "a.png"
        assert a.turns == [("<image>\nWhat shape is shown?", "circle")]
        assert a.question == "What shape is shown?" and a.answer == "circle"
        assert a.question_type == "shape" and a.caption == "a red circle" and a.extra == {"source": "unit"}
        assert b.id == "2" and b.question_type is None and b.caption is None
        assert b.turns == [("<image>\nWhat color is it?", "red"), ("And the shape?", "circle")]  # placeholder moved
        text, spans = build_conversation(b.turns)
        assert text.count("<image>") == 1 and len(spans) == 2
    assert len(load_dataset(folder / "d.json", max_samples=1)) == 1


def test_image_folder_and_skip_text_only(folder, tmp_path):
    sub = tmp_path / "meta"
    sub.mkdir()
    path = _write(sub / "d.json", [{"id": "t", "conversations": _conv("hi", "hello")},
                                   {"id": "i", "image": "a.png", "conversations": _conv()}])
    with pytest.raises(DataError, match="missing 'image'"):
        load_dataset(path, image_folder=folder / "images")
    recs = load_dataset(path, image_folder=folder / "images", skip_text_only=True)
    assert [r.id for r in recs] == ["i"] and recs[0].image_path == folder / "images" / "a.png"


BAD_CASES = {
    "bad_json": ('[{"id": "1", "image": "images/a.png",\n "conversations": [}]', r"invalid JSON at line 2, column \d+"),
    "bad_jsonl": ('{"id": "1", "image": "images/a.png", "conversations": []}\n{"id": 2,\n',
                  r"invalid JSON Lines at line 2"),
    "empty_list": ([], "dataset is empty"),
    "empty_file": ("", "file is empty"),
    "not_a_list": ({"data": []}, "expected a list"),
    "no_conversations": ([{"id": "n1", "image": "images/a.png"}], r"id 'n1'.*missing 'conversations'"),
    "missing_image": ([{"id": "m1", "image": "images/nope.png", "conversations": _conv()}],
                      r"id 'm1'.*images/nope\.png' does not exist"),
    "no_placeholder": ([{"id": "p1", "image": "images/a.png", "conversations": _conv("What shape?")}],
                       r"id 'p1'.*no '<image>' placeholder"),
    "two_placeholders": ([{"id": "p2", "image": "images/a.png",
                           "conversations": _conv() + _conv("<image>\nagain?", "yes")}], "2 '<image>' placeholders"),
    "roles": ([{"id": "r1", "image": "images/a.png",
                "conversations": [{"from": "gpt", "value": "<image>\nhi"}, {"from": "human", "value": "x"}]}],
              r"id 'r1'.*turn 0 is from 'gpt'.*alternate"),
    "odd_turns": ([{"id": "o1", "image": "images/a.png", "conversations": _conv()[:1]}], "count must be even"),
    "turn_shape": ([{"id": "s1", "image": "images/a.png", "conversations": [{"from": "human"}, {"x": 1}]}],
                   "'from' and 'value'"),
    "record_type": ([["not", "a", "dict"]], "must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_raises_dataerror_and_writes_nothing(folder, case):
    data, pattern = BAD_CASES[case]
    path = _write(folder / ("d.jsonl" if case == "bad_jsonl" else "d.json"), data)
    before = _snapshot(folder)
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset(path)
    assert str(path) in str(info.value)                     # the message names the file
    assert _snapshot(folder) == before                      # reading writes nothing


def test_missing_file_and_folder(folder):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(folder / "nope.json")
    path = _write(folder / "d.json", [{"id": "1", "image": "a.png", "conversations": _conv()}])
    with pytest.raises(DataError, match="image folder .* does not exist"):
        load_dataset(path, image_folder=folder / "missing")
    with pytest.raises(DataError, match="a.png' does not exist.*--image-folder"):
        load_dataset(path)                                  # default folder is the JSON's directory
    assert load_dataset(path, check_images=False)[0].image_path == folder / "a.png"
