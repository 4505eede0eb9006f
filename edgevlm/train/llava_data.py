"""Reader for LLaVA-format conversation data (the synthetic set's JSON and the user's own).

Accepts a JSON list or JSON Lines of records such as::

    {"id": "000001", "image": "images/000001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat shape is shown?"},
                       {"from": "gpt", "value": "circle"}],
     "question_type": "shape", "caption": "a large red circle ..."}          # the last two are optional

Image paths are relative to ``image_folder`` (default: the JSON file's directory). Everything is validated before
anything is returned, and every problem raises ``DataError`` naming the file, the record and the fix: malformed
JSON (with line and column), a record without ``conversations`` or ``image``, an image file that does not exist,
a first human turn without ``<image>``, roles that do not alternate human/gpt, an empty dataset. Reading never
writes anything.

As in LLaVA's ``preprocess_multimodal``, the ``<image>`` placeholder is moved to the front of the first question
(``"<image>\\n" + question``) so ``edgevlm.prompt.build_conversation`` renders what MobileVLM trains on.

    >>> from edgevlm.train.llava_data import load_dataset
    >>> records = load_dataset("data/synth/train.json")
    >>> records[0].turns
    [('<image>\\nWhat shape is shown?', 'circle')]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevlm.errors import DataError
from edgevlm.prompt import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")


@dataclass
class LlavaRecord:
    """One image with its question/answer turns (``<image>`` kept at the start of the first question)."""

    id: str
    image_path: Path
    turns: list[tuple[str, str]]
    question_type: str | None = None
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)     # any other keys of the source record

    @property
    def question(self) -> str:
        """The first question without the ``<image>`` placeholder."""
        return self.turns[0][0].replace(IMAGE_PLACEHOLDER, "").strip()

    @property
    def answer(self) -> str:
        return self.turns[0][1]


def _read_entries(path: Path) -> tuple[list[tuple[int, Any]], bool]:
    """(line number or list index, entry) pairs from a JSON list or JSON Lines file, and whether it was lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the dataset as UTF-8 JSON") from exc
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty; expected a JSON list of LLaVA records or JSON Lines")
    if path.suffix.lower() == ".json" or (path.suffix.lower() != ".jsonl" and stripped[0] == "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); fix the "
                            f"file there (a JSON list of records, or one record per line as .jsonl)") from exc
        if not isinstance(data, list):
            raise DataError(f"{path}: the top level is a JSON {type(data).__name__}, expected a list of records; "
                            f"wrap the records in [...] (or write JSON Lines, one record per line, as .jsonl)")
        return list(enumerate(data)), False
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON Lines at line {lineno}, column {exc.colno} ({exc.msg}); each "
                            f"line must be one complete JSON record") from exc
    return entries, True


def _where(path: Path, pos: int, is_lines: bool, rid: str | None) -> str:
    loc = f"line {pos}" if is_lines else f"record [{pos}]"
    return f"{path} {loc}" + (f" (id '{rid}')" if rid is not None else "")


def _parse_turns(conv: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{\"from\", \"value\"}} turns")
    if len(conv) % 2:
        raise DataError(f"{where}: {len(conv)} turns; conversations alternate human/gpt and end with a gpt answer, "
                        f"so the count must be even")
    values: list[str] = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: turn {k} must be an object with 'from' and 'value'")
        role, value = str(turn["from"]).lower(), turn["value"]
        expected = HUMAN_ROLES if k % 2 == 0 else GPT_ROLES
        if role not in expected:
            raise DataError(f"{where}: turn {k} is from '{turn['from']}' but roles must alternate human, gpt, "
                            f"human, gpt ... starting with human; expected '{expected[0]}'")
        if not isinstance(value, str):
            raise DataError(f"{where}: turn {k} 'value' must be a string, got {type(value).__name__}")
        values.append(value)
    turns = list(zip(values[0::2], values[1::2]))
    first_q = turns[0][0]
    if IMAGE_PLACEHOLDER not in first_q:
        raise DataError(f"{where}: the first human turn has no '{IMAGE_PLACEHOLDER}' placeholder; put "
                        f"'{IMAGE_PLACEHOLDER}\\n' before the first question (or drop text-only records)")
    n_img = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in turns)
    if n_img != 1:
        raise DataError(f"{where}: {n_img} '{IMAGE_PLACEHOLDER}' placeholders; exactly one (in the first human "
                        f"turn) is supported")
    # LLaVA preprocess_multimodal: move the placeholder to the front of the first question.
    turns[0] = (IMAGE_PLACEHOLDER + "\n" + first_q.replace(IMAGE_PLACEHOLDER, "").strip(), turns[0][1])
    return turns


def load_dataset(path: str | Path, image_folder: str | Path | None = None, max_samples: int | None = None,
                 check_images: bool = True, skip_text_only: bool = False) -> list[LlavaRecord]:
    """Read and validate a LLaVA-format JSON / JSONL file.

    Args:
        path: the ``.json`` (list) or ``.jsonl`` file.
        image_folder: directory the ``image`` paths are relative to (default: the file's directory).
        max_samples: keep only the first N records (only those are validated).
        check_images: check that every image file exists.
        skip_text_only: skip records without an ``image`` key (LLaVA mixes hold text-only chats) instead of
            raising.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist; pass a LLaVA-format .json/.jsonl file "
                        f"(`edgevlm synth --out DIR` writes DIR/train.json)")
    if max_samples is not None and max_samples <= 0:
        raise DataError(f"max_samples must be positive, got {max_samples}")
    folder = Path(image_folder) if image_folder is not None else path.parent
    if check_images and not folder.is_dir():
        raise DataError(f"image folder '{folder}' does not exist; pass the directory the 'image' paths in "
                        f"{path.name} are relative to (--image-folder)")
    entries, is_lines = _read_entries(path)
    records: list[LlavaRecord] = []
    skipped = 0
    for pos, entry in entries:
        if max_samples is not None and len(records) >= max_samples:
            break
        if not isinstance(entry, dict):
            raise DataError(f"{_where(path, pos, is_lines, None)}: a record must be a JSON object, got "
                            f"{type(entry).__name__}")
        rid = str(entry["id"]) if "id" in entry else None
        where = _where(path, pos, is_lines, rid)
        if "conversations" not in entry:
            raise DataError(f"{where}: missing 'conversations' (a list of human/gpt turns); every LLaVA record "
                            f"needs one")
        if "image" not in entry or not entry["image"]:
            if skip_text_only:
                skipped += 1
                continue
            raise DataError(f"{where}: missing 'image' (the image path relative to the image folder); add it, or "
                            f"pass skip_text_only=True to skip text-only records")
        if not isinstance(entry["image"], str):
            raise DataError(f"{where}: 'image' must be one path string, got {type(entry['image']).__name__}; "
                            f"one image per record is supported")
        turns = _parse_turns(entry["conversations"], where)
        image_path = folder / entry["image"]
        if check_images and not image_path.is_file():
            raise DataError(f"{where}: image file '{image_path}' does not exist; check the record's 'image' "
                            f"path or pass the right image folder (--image-folder, now '{folder}')")
        extra = {k: v for k, v in entry.items()
                 if k not in ("id", "image", "conversations", "question_type", "caption")}
        qt, cap = entry.get("question_type"), entry.get("caption")
        records.append(LlavaRecord(id=rid if rid is not None else str(pos), image_path=image_path, turns=turns,
                                   question_type=str(qt) if qt is not None else None,
                                   caption=str(cap) if cap is not None else None, extra=extra))
    if skipped:
        log.info("%s: skipped %d text-only records", path, skipped)
    if not records:
        raise DataError(f"{path}: the dataset is empty (no usable records"
                        f"{f'; {skipped} text-only skipped' if skipped else ''}); add records or point at "
                        f"another file")
    return records


__all__ = ["LlavaRecord", "load_dataset"]
