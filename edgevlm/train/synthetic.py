"""The embedded synthetic dataset: procedurally drawn shapes with questions whose answers follow from the pixels.

Every image is drawn from a seeded numpy ``Generator`` with PIL (no downloads, no fonts beyond Pillow's own), so
the dataset is reproducible bit for bit and small models can be trained, calibrated and evaluated on it anywhere.

Scenes (one per image):

* **single** - one shape (circle, square, triangle, star) of one of six far-apart colours, small or large, in one
  cell of a 2x2 grid (``grid=3``: 3x3), on a light background with faint grain. Asked about its shape, colour,
  position or size.
* **count** - 1 to 4 small shapes of the same kind and colour, each in its own grid cell (never overlapping).
  Asked how many there are.
* **glyph** (only with ``glyphs=True``) - one capital letter drawn with Pillow's default font. Asked which letter.

Answers are lower-case words or short phrases (``circle``, ``red``, ``3``, ``top left``, ``small``, ``k``). By default
each image has one question; question types are exactly balanced over every block of consecutive samples, and so
are the answers of each type (the other attributes are uniform). With ``multi_turn=True`` an image asks every question its scene answers, as one conversation (more
supervision per image for training; a question names the shape or colour only once that turn has been answered,
so it never gives an answer away). Each sample also has a caption (``a large red circle in the top left on a cream
background``) for stage-1 ("plain") training.

Learnability notes (the ``demo`` preset trained from scratch): colour and size are learned first, then shape and
position; counting comes last. Train on fresh samples (``iter_samples`` is faster than training) rather than
repeating a small set, and prefer ``multi_turn`` for the train split.

    >>> from edgevlm.train.synthetic import generate_samples, write_dataset
    >>> samples = generate_samples(8, split="train", seed=0)       # in memory: PIL images + QA + scene record
    >>> samples[0].question, samples[0].answer
    >>> write_dataset("data/synth", train=4000, val=200, test=500)  # LLaVA JSON + PNGs, written atomically

Command line: ``edgevlm synth --out data/synth [--train N --val N --test N --seed S --grid 2|3 --glyphs
--multi-turn --tokenizer-vocab 512]``.
A sample depends only on its split, index, seed and the knobs, never on how many samples are drawn.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edgevlm.errors import ConfigError, DataError
from edgevlm.outputs import check_destination, mark, replace_dir, temp_dir_beside
from edgevlm.prompt import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
DEFAULT_IMAGE_SIZE = 112          # the ``demo`` preset's vision image_size
DEFAULT_SPLITS = {"train": 4000, "val": 200, "test": 500}

SHAPES = ("circle", "square", "triangle", "star")
#: Saturated colours, pairwise > 90 apart in RGB and > 190 from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (235, 220, 25),
    "purple": (145, 45, 190),
    "orange": (250, 130, 15),
}
#: Light, low-saturation backgrounds (every channel >= 222; the nearest shape colour is > 190 away).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 248),
    "light gray": (228, 228, 228),
    "cream": (247, 241, 222),
    "light blue": (226, 236, 248),
    "light pink": (248, 230, 236),
    "mint": (228, 246, 234),
}
SIZES = ("small", "large")
#: Grid cells, row-major, per grid side; the answer to a position question.
GRID_POSITIONS: dict[int, tuple[str, ...]] = {
    2: ("top left", "top right", "bottom left", "bottom right"),
    3: ("top left", "top center", "top right", "middle left", "center", "middle right",
        "bottom left", "bottom center", "bottom right"),
}
DEFAULT_GRID = 2                  # quadrants: larger shapes, easier for tiny models trained from scratch
POSITIONS = GRID_POSITIONS[DEFAULT_GRID]
COUNTS = ("1", "2", "3", "4")
#: Capital letters that stay distinct at ~45 px (glyph scenes only); answers are their lower-case forms.
LETTERS = ("A", "B", "C", "E", "H", "K", "M", "S", "T", "X")

QUESTION_TYPES = ("shape", "color", "count", "position", "size")
GLYPH_QUESTION_TYPES = QUESTION_TYPES + ("letter",)

#: Shape radius (half the bounding box) as a fraction of the grid cell's side.
_RADIUS = {"small": 0.255, "large": 0.45}
_NOISE_STD = (2.0, 6.0)           # background noise, uniform in this range per image (never 0: images stay unique)

#: Question templates per scene kind and question type; ``{kind}`` / ``{color}`` are filled from the scene.
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "single": {
        "shape": ("What shape is in the image?", "What shape is shown?", "Which shape is drawn here?",
                  "What kind of shape do you see?"),
        "color": ("What color is the shape?", "What is the color of the {kind}?", "Which color is the {kind}?",
                  "What color is the object in the image?"),
        "position": ("Where is the shape?", "Where is the {kind} located?",
                     "In which part of the image is the {color} {kind}?"),
        "size": ("Is the shape small or large?", "Is the {color} {kind} small or large?",
                 "What size is the {kind}? Answer small or large."),
    },
    "count": {
        "count": ("How many shapes are there?", "How many {kind}s are in the image?", "Count the {kind}s.",
                  "How many {color} {kind}s can you see?"),
        # multi-turn only (all shapes of a count scene share kind and colour; they are all small):
        "shape": ("What shape are the objects?", "Which shape is repeated in the image?"),
        "color": ("What color are the shapes?", "What color are the {kind}s?"),
    },
    "glyph": {
        "letter": ("What letter is written?", "Which letter is shown in the image?", "What letter do you see?"),
        "color": ("What color is the letter?",),                                   # multi-turn only
    },
}
#: The scene kind that single-question samples of each question type are drawn from.
SCENE_OF = {"shape": "single", "color": "single", "position": "single", "size": "single", "count": "count",
            "letter": "glyph"}


# ---- records ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape. ``(cx, cy)`` is its centre in pixels; the pixel there has exactly ``COLORS[color]``."""

    kind: str
    color: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class GlyphSpec:
    """One drawn capital letter; ``box`` is its ink bounding box (left, top, right, bottom) in pixels."""

    letter: str
    color: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """Everything drawn in one image: enough to re-derive every answer without looking at pixels."""

    kind: str                                     # "single" | "count" | "glyph"
    image_size: int
    background: str
    noise_std: float
    shapes: tuple[ShapeSpec, ...] = ()
    glyph: GlyphSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QA:
    """One question about a scene and its answer."""

    question_type: str
    question: str
    answer: str


@dataclass
class Sample:
    """One synthetic example: the PIL image, its question/answer pairs, caption and scene record.

    Single-question samples (the default, and always val/test) hold one ``QA``; multi-turn samples ask every
    question the scene answers. ``question`` / ``answer`` / ``question_type`` are those of the first pair.
    """

    id: str
    split: str
    index: int
    image: Image.Image
    qa: list[QA]
    caption: str
    scene: Scene

    @property
    def question(self) -> str:
        return self.qa[0].question

    @property
    def answer(self) -> str:
        return self.qa[0].answer

    @property
    def question_type(self) -> str:
        return self.qa[0].question_type

    @property
    def turns(self) -> list[tuple[str, str]]:
        """``[(question, answer), ...]`` as ``prompt.build_conversation`` takes them; ``<image>`` opens the first."""
        return [(f"{IMAGE_PLACEHOLDER}\n{q.question}" if i == 0 else q.question, q.answer)
                for i, q in enumerate(self.qa)]

    @property
    def image_name(self) -> str:
        return f"{self.split}_{self.index:06d}.png"

    def to_llava(self, image: str) -> dict[str, Any]:
        """The LLaVA-format record (``image`` is the path relative to the image folder)."""
        conv = []
        for question, answer in self.turns:
            conv += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        rec: dict[str, Any] = {"id": self.id, "image": image, "conversations": conv,
                               "question_type": self.question_type if len(self.qa) == 1 else "multi",
                               "caption": self.caption}
        if len(self.qa) > 1:
            rec["question_types"] = [q.question_type for q in self.qa]
        return rec


# ---- vocabulary -------------------------------------------------------------------------------------------------
def question_types(glyphs: bool = False) -> tuple[str, ...]:
    return GLYPH_QUESTION_TYPES if glyphs else QUESTION_TYPES


def positions(grid: int = DEFAULT_GRID) -> tuple[str, ...]:
    if grid not in GRID_POSITIONS:
        raise ConfigError(f"grid {grid} unsupported; choose one of {', '.join(map(str, GRID_POSITIONS))} "
                          f"(cells per side)")
    return GRID_POSITIONS[grid]


def answer_vocabulary(glyphs: bool = False, grid: int = DEFAULT_GRID) -> dict[str, list[str]]:
    """Every possible answer, per question type."""
    vocab = {"shape": list(SHAPES), "color": list(COLORS), "count": list(COUNTS),
             "position": list(positions(grid)), "size": list(SIZES)}
    if glyphs:
        vocab["letter"] = [c.lower() for c in LETTERS]
    return vocab


# ---- drawing ----------------------------------------------------------------------------------------------------
def _cell_center(position: str, size: int, grid: int) -> tuple[float, float]:
    row, col = divmod(positions(grid).index(position), grid)
    cell = size / grid
    return (col + 0.5) * cell, (row + 0.5) * cell


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":             # equilateral, pointing up, bounding box centred on (cx, cy), 2r wide
        rt = 1.15 * r                  # circumradius: a triangle inscribed in radius r would look much smaller
        gy = cy + rt / 4               # centroid sits below the box centre
        return [(cx + rt * np.cos(a), gy - rt * np.sin(a)) for a in np.deg2rad([90, 210, 330])]
    if kind == "star":                 # five points, inner radius 0.45 r
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = np.deg2rad(90 + 36 * k)
            pts.append((cx + rad * np.cos(a), cy - rad * np.sin(a)))
        return pts
    raise ConfigError(f"unknown shape '{kind}'; known: {', '.join(SHAPES)}")


def _draw_shape(draw: ImageDraw.ImageDraw, s: ShapeSpec) -> None:
    rgb = COLORS[s.color]
    if s.kind == "circle":
        draw.ellipse([s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius], fill=rgb)
    else:
        draw.polygon(_polygon(s.kind, s.cx, s.cy, s.radius), fill=rgb)


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _background(rng: np.random.Generator, size: int) -> tuple[str, float, Image.Image]:
    name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    std = float(rng.uniform(*_NOISE_STD))
    base = np.asarray(BACKGROUNDS[name], np.float32)
    half = (size + 1) // 2                                                      # 2x2-pixel grey grain: hue stays
    noise = rng.normal(0.0, std, (half, half, 1)).astype(np.float32)           # put and PNGs stay small (~5 KB)
    # Coloured at grain resolution, then each grain cell repeated 2x2 (the same pixels as repeating the noise
    # first, with a quarter of the float work).
    cell = np.clip(base + noise, 0, 255).astype(np.uint8)                      # [S/2, S/2, 3]
    arr = np.broadcast_to(cell[:, None, :, None], (half, 2, half, 2, 3)).reshape(2 * half, 2 * half, 3)
    return name, std, Image.fromarray(np.ascontiguousarray(arr[:size, :size]), "RGB")   # [S, S, 3]


def _place(rng: np.random.Generator, kind: str, color: str, size_name: str, position: str,
           image_size: int, grid: int) -> ShapeSpec:
    """A shape inside its grid cell, jittered but never crossing the cell border (so shapes never overlap)."""
    cell = image_size / grid
    r = _RADIUS[size_name] * cell
    cx, cy = _cell_center(position, image_size, grid)
    room = max(0.0, cell / 2 - r - 1.0)                                         # half cell minus radius minus 1px
    jx, jy = rng.uniform(-0.7 * room, 0.7 * room, 2) if room > 0 else (0.0, 0.0)
    return ShapeSpec(kind, color, size_name, position, round(float(cx + jx), 2), round(float(cy + jy), 2),
                     round(float(r), 2))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode())


def _balanced(seed: int, split: str, index: int, options: Sequence[str], salt: int) -> str:
    """Exactly balanced in every block of ``len(options)`` consecutive indices, shuffled within the block."""
    k = len(options)
    perm = np.random.default_rng([seed, _split_code(split), salt, index // k]).permutation(k)
    return options[int(perm[index % k])]


def _draw_scene(rng: np.random.Generator, kind: str, image_size: int, grid: int,
                force: dict[str, str] | None = None) -> tuple[Scene, Image.Image]:
    """Draw a scene of ``kind`` ("single", "count" or "glyph"); attributes are uniform unless ``force`` fixes one
    (question type -> answer, e.g. ``{"position": "top left"}``)."""
    force = force or {}
    bg, std, img = _background(rng, image_size)
    draw = ImageDraw.Draw(img)
    if kind == "glyph":
        letter, color = _pick(rng, LETTERS), _pick(rng, list(COLORS))
        letter, color = force.get("letter", letter).upper(), force.get("color", color)
        font = _font(max(8, int(0.42 * image_size)))
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        w, h = right - left, bottom - top
        x = int(rng.integers(2, max(3, image_size - w - 2))) - left
        y = int(rng.integers(2, max(3, image_size - h - 2))) - top
        draw.text((x, y), letter, fill=COLORS[color], font=font)
        box = draw.textbbox((x, y), letter, font=font)
        return Scene("glyph", image_size, bg, round(std, 3), glyph=GlyphSpec(letter, color, tuple(box))), img
    shape_kind, color = _pick(rng, SHAPES), _pick(rng, list(COLORS))
    shape_kind, color = force.get("shape", shape_kind), force.get("color", color)
    size_name = _pick(rng, SIZES) if kind == "single" else "small"   # counted shapes are all small: the
    size_name = force.get("size", size_name)                          # count is then ~ the amount of colour
    if kind == "count":
        n = int(force.get("count", rng.integers(1, len(COUNTS) + 1)))
        cells = sorted(int(c) for c in rng.choice(grid * grid, size=n, replace=False))
    else:
        cell = int(rng.integers(grid * grid))
        cells = [positions(grid).index(force["position"]) if "position" in force else cell]
    shapes = tuple(_place(rng, shape_kind, color, size_name, positions(grid)[c], image_size, grid) for c in cells)
    for sh in shapes:
        _draw_shape(draw, sh)
    return Scene(kind, image_size, bg, round(std, 3), shapes=shapes), img


def scene_answers(scene: Scene) -> dict[str, str]:
    """Every question type the scene answers unambiguously, with its answer (derived from the scene record)."""
    if scene.kind == "glyph":
        assert scene.glyph is not None
        return {"letter": scene.glyph.letter.lower(), "color": scene.glyph.color}
    first = scene.shapes[0]
    answers = {"shape": first.kind, "color": first.color}
    if scene.kind == "count":
        answers["count"] = str(len(scene.shapes))
    else:
        answers["position"] = first.position
        answers["size"] = first.size
    return answers


def scene_caption(scene: Scene) -> str:
    if scene.kind == "glyph":
        assert scene.glyph is not None
        return f"the letter {scene.glyph.letter} written in {scene.glyph.color} on a {scene.background} background"
    s, n = scene.shapes[0], len(scene.shapes)
    if scene.kind == "count":
        noun = s.kind if n == 1 else s.kind + "s"
        where = f" in the {s.position}" if n == 1 else ""
        return f"{n} {s.size} {s.color} {noun}{where} on a {scene.background} background"
    return f"a {s.size} {s.color} {s.kind} in the {s.position} on a {scene.background} background"


def make_sample(index: int, split: str = "train", seed: int = 0, *, image_size: int = DEFAULT_IMAGE_SIZE,
                grid: int = DEFAULT_GRID, glyphs: bool = False, multi_turn: bool = False) -> Sample:
    """Draw sample ``index`` of ``split``: a pure function of its arguments.

    Single-question samples balance the question type over every block of consecutive indices (and each type's
    answers over that type's occurrences); multi-turn samples balance the scene kind and ask every question the
    scene answers, in random order.
    """
    if image_size < 32:
        raise ConfigError(f"image_size {image_size} is too small for the synthetic shapes; use 32 px or more "
                          f"(the demo preset uses {DEFAULT_IMAGE_SIZE})")
    positions(grid)
    if multi_turn:
        kinds = ("single", "count", "glyph") if glyphs else ("single", "count")
        qtype, kind, force = None, _balanced(seed, split, index, kinds, 0x5C), None
    else:
        types = question_types(glyphs)
        qtype = _balanced(seed, split, index, types, 0x51)
        kind = SCENE_OF[qtype]
        # The k-th question of this type (one per block of len(types) samples) gets a balanced answer too.
        answers_t = answer_vocabulary(glyphs, grid)[qtype]
        force = {qtype: _balanced(seed, split, index // len(types), answers_t, zlib.crc32(qtype.encode()))}
    rng = np.random.default_rng([seed, _split_code(split), index])
    scene, img = _draw_scene(rng, kind, image_size, grid, force)
    answers = scene_answers(scene)
    qtypes = [qtype] if qtype else [t for t in question_types(glyphs) if t in answers]
    if multi_turn:
        qtypes = [qtypes[int(i)] for i in rng.permutation(len(qtypes))]
    fmt = {"kind": scene.shapes[0].kind, "color": scene.shapes[0].color} if scene.shapes else {}
    # A template naming the shape ({kind}) or colour ({color}) may only be used once that turn was answered:
    # otherwise the question would give a later answer away.
    hidden = {"{kind}": "shape", "{color}": "color"}
    qa, answered = [], set()
    for t in qtypes:
        options = tuple(o for o in TEMPLATES[kind][t]
                        if all(ph not in o or q not in qtypes or q in answered for ph, q in hidden.items()))
        qa.append(QA(t, _pick(rng, options).format(**fmt), answers[t]))
        answered.add(t)
    return Sample(id=f"{split}_{index:06d}", split=split, index=index, image=img, qa=qa,
                  caption=scene_caption(scene), scene=scene)


def iter_samples(n: int, split: str = "train", seed: int = 0, *, start: int = 0, image_size: int = DEFAULT_IMAGE_SIZE,
                 grid: int = DEFAULT_GRID, glyphs: bool = False, multi_turn: bool = False) -> Iterator[Sample]:
    """Samples ``start .. start+n-1`` of ``split``, lazily (no disk)."""
    if n < 0:
        raise ConfigError(f"the number of samples must be >= 0, got {n}")
    for i in range(start, start + n):
        yield make_sample(i, split, seed, image_size=image_size, grid=grid, glyphs=glyphs, multi_turn=multi_turn)


def generate_samples(n: int, split: str = "train", seed: int = 0, *, start: int = 0,
                     image_size: int = DEFAULT_IMAGE_SIZE, grid: int = DEFAULT_GRID, glyphs: bool = False,
                     multi_turn: bool = False) -> list[Sample]:
    """``n`` samples of ``split`` in memory (PIL images + QA + caption + scene record)."""
    return list(iter_samples(n, split, seed, start=start, image_size=image_size, grid=grid, glyphs=glyphs,
                             multi_turn=multi_turn))


# ---- writing ----------------------------------------------------------------------------------------------------
def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Processes that draw and encode images: the usable cores up to 8, or 1 (this process) below 4 cores, where
    starting processes gains little and loses to any other load (measured on a shared 2-core machine)."""
    cores = usable_cores()
    return min(8, cores) if cores >= 4 else 1


#: Fewer samples than this are drawn in this process (starting worker processes costs ~0.5 s).
MIN_PARALLEL = 256


def _draw_and_save_range(start: int, stop: int, split: str, seed: int, folder: str, knobs: dict[str, Any]
                         ) -> list[Sample]:
    """Samples ``start .. stop-1``, each saved as ``folder/<image_name>`` (PNG, lossless), ``image = None``."""
    out = []
    for i in range(start, stop):
        sample = make_sample(i, split, seed, **knobs)
        sample.image.save(Path(folder) / sample.image_name, format="PNG", compress_level=1)
        sample.image = None  # type: ignore[assignment]   # saved: keep the text, drop the pixels
        out.append(sample)
    return out


def _draw_and_save(n: int, split: str, seed: int, folder: Path, workers: int, **knobs: Any) -> Iterator[Sample]:
    """Samples ``0 .. n-1`` of ``split`` in index order, saved and returned with ``image = None`` (see
    ``_draw_and_save_range``). With ``workers`` > 1 and enough samples, a pool of spawned processes draws and
    encodes chunks ahead (Pillow's PNG encoder holds the GIL, so threads would not run in parallel), at most
    ``2 * workers`` chunks in flight; closing the generator waits for the running ones."""
    chunk = max(8, min(64, n // (4 * max(workers, 1))))
    if workers <= 1 or n < max(MIN_PARALLEL, 2 * chunk):
        yield from _draw_and_save_range(0, n, split, seed, str(folder), knobs)
        return
    import multiprocessing

    # spawn, not fork: the caller may hold threads (torch's) that a forked child would inherit in a broken state.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        starts = iter(range(0, n, chunk))
        try:
            for s in starts:
                pending.append(pool.submit(_draw_and_save_range, s, min(s + chunk, n), split, seed, str(folder),
                                           knobs))
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def _check_sizes(splits: dict[str, int]) -> None:
    for name, n in splits.items():
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"split '{name}' size must be an integer >= 0, got {n!r}")
    if sum(splits.values()) == 0:
        raise ConfigError("every split is empty; ask for at least one sample (e.g. --train 4000)")


def write_dataset(out: str | Path, train: int = DEFAULT_SPLITS["train"], val: int = DEFAULT_SPLITS["val"],
                  test: int = DEFAULT_SPLITS["test"], seed: int = 0, *, image_size: int = DEFAULT_IMAGE_SIZE,
                  grid: int = DEFAULT_GRID, glyphs: bool = False, multi_turn: bool = False,
                  tokenizer_vocab: int | None = None, overwrite: bool = False, progress: bool | None = None,
                  workers: int | None = None) -> Path:
    """Write the dataset in LLaVA format, atomically.

    Layout: ``out/images/{split}_{i:06d}.png``, ``out/{split}.json`` (one list per split, empty splits skipped),
    ``out/dataset_info.json`` and, with ``tokenizer_vocab``, a BPE tokenizer trained on the conversations in
    ``out/tokenizer/``. ``multi_turn`` applies to the train split only (val/test always hold one question per
    image, so exact match is reported per question type). Everything is built in a temporary directory beside
    ``out`` and renamed into place at the end; on any error nothing is left behind. An existing ``out`` is replaced
    (with ``overwrite``) only if it is a dataset this function wrote (``edgevlm.outputs``). Returns ``out``.

    Images are drawn and PNG-encoded by ``workers`` processes (default: ``default_workers()``; splits under
    ``MIN_PARALLEL`` samples are drawn in this process); samples are pure functions of their index, so the output
    does not depend on ``workers``.
    """
    out = Path(out)
    workers = default_workers() if workers is None else max(1, int(workers))
    splits = {"train": train, "val": val, "test": test}
    _check_sizes(splits)
    if image_size < 32:
        raise ConfigError(f"image_size {image_size} is too small; use 32 px or more")
    positions(grid)
    check_destination(out, "dataset", overwrite=overwrite, error=DataError)   # never replaces what we did not write
    tmp = temp_dir_beside(out)
    total = sum(splits.values())
    t0 = time.perf_counter()
    knobs = {"image_size": image_size, "grid": grid, "glyphs": glyphs}
    try:
        from tqdm.auto import tqdm

        (tmp / "images").mkdir()
        answers: dict[str, dict[str, dict[str, int]]] = {}
        text_only: list[Sample] = []                       # the train conversations, for the tokenizer
        with tqdm(total=total, desc="synthesizing images", unit="img",
                  disable=(total < 1000) if progress is None else not progress) as bar:
            for split, n in splits.items():
                if n == 0:
                    continue
                records, counts = [], Counter()
                drawn = _draw_and_save(n, split, seed, tmp / "images", workers,
                                       multi_turn=multi_turn and split == "train", **knobs)
                with contextlib.closing(drawn):           # on an error, pending writes end before the cleanup
                    for sample in drawn:                  # in index order; sample.image is None (saved)
                        records.append(sample.to_llava(f"images/{sample.image_name}"))
                        counts.update((q.question_type, q.answer) for q in sample.qa)
                        if split == "train" and tokenizer_vocab:
                            text_only.append(sample)
                        bar.update(1)
                (tmp / f"{split}.json").write_text(json.dumps(records, indent=1))
                per_type: dict[str, dict[str, int]] = {}
                for (qt, ans), c in sorted(counts.items()):
                    per_type.setdefault(qt, {})[ans] = c
                answers[split] = per_type
        info = {
            "name": "edgevlm-synthetic-shapes", "format": "llava", "generator": __name__,
            "generator_version": GENERATOR_VERSION, "seed": seed, **knobs, "multi_turn_train": multi_turn,
            "splits": {k: v for k, v in splits.items() if v}, "question_types": list(question_types(glyphs)),
            "answer_vocabulary": answer_vocabulary(glyphs, grid), "answer_counts": answers,
            "colors": {k: list(v) for k, v in COLORS.items()},
            "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
        }
        if tokenizer_vocab:
            from edgevlm.train.tokenizer import save_tokenizer, train_tokenizer_on_samples

            # Single-question samples of a split of their own cover every template (multi-turn uses a subset).
            extra = generate_samples(0 if train and not multi_turn else 1000, "tokenizer", seed, **knobs)
            tok = train_tokenizer_on_samples(text_only + extra, tokenizer_vocab)
            save_tokenizer(tok, tmp / "tokenizer")
            info["tokenizer"] = {"dir": "tokenizer", "vocab_size": tok.get_vocab_size(),
                                 "requested_vocab_size": tokenizer_vocab}
        (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2))
        mark(tmp, "dataset")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote %d synthetic samples to %s in %.1f s", total, out, time.perf_counter() - t0)
    return out


__all__ = ["ShapeSpec", "GlyphSpec", "Scene", "QA", "Sample", "make_sample", "iter_samples", "generate_samples",
           "write_dataset", "scene_answers", "scene_caption", "answer_vocabulary", "question_types", "positions",
           "SHAPES", "COLORS", "BACKGROUNDS", "SIZES", "POSITIONS", "GRID_POSITIONS", "COUNTS", "LETTERS",
           "QUESTION_TYPES", "GLYPH_QUESTION_TYPES", "TEMPLATES", "SCENE_OF", "GENERATOR_VERSION",
           "DEFAULT_IMAGE_SIZE", "DEFAULT_GRID", "DEFAULT_SPLITS"]
