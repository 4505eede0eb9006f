"""Calibration data: real images and prompts turned into the exact graph inputs ONNX Runtime's calibrators read.

Sources (``--calibration``, ``calibration_items``):

* ``None`` / ``"embedded"``: the embedded set defined in ``calibration/embedded.toml`` (synthetic images + questions +
  answers from ``edgevlm.train.synthetic``; its own split name and seed, disjoint from train/val/test).
* a folder of images (``.png .jpg .jpeg .bmp .webp .gif .tif .tiff``, sorted by name, not recursive): each image is
  asked one of the spec's ``prompts`` in turn; decode steps follow the fp32 model's own greedy tokens.
* a LLaVA-format ``.json`` / ``.jsonl`` file (``edgevlm.train.llava_data``): first question + answer of each record.

``num_samples`` caps the count; an empty or missing source raises ``DataError``. The held-out set the report uses
comes from the same user source (the records after the calibration ones) or, for the embedded set and for user
sources too small to split, from the embedded held-out split (another split name, another seed).

Readers (``onnxruntime.quantization.CalibrationDataReader``):

* ``VisionCalibrationReader``: ``{pixel_values: [B, 3, S, S]}`` preprocessed with the bundle's ``PreprocessConfig``.
* ``DecoderCalibrationReader``: per image one prefill sample (``inputs_embeds`` = the spliced embeddings of
  ``build_prompt(question)`` with the fp32 vision graph's image embeddings, ``attention_mask`` ones, ``position_ids``
  0..T-1, every ``past_key_values.*`` of length 0) and up to ``decode_steps`` decode samples (one token, past length
  T, T+1, ...; the past KV is produced by running the fp32 decoder through the decoder interface, ``graph_decoder``
  -> ``edgevlm.runtime.decoders.OrtDecoder``: ``prefill`` / ``step``, pasts from ``kv_arrays``; the token is the
  reference answer's next token). Samples are built lazily (a full-size decoder's KV is tens of MB per sample).

Names, dtypes and static dims are read from the graph itself, so what the readers feed is what the graph declares.

    >>> items = calibration_items("data/my_images", 64)
    >>> ctx = BundleContext.from_manifest(bundle_dir, manifest)
    >>> reader = DecoderCalibrationReader(ctx, items, "fp32/vision.onnx", "fp32/decoder.onnx", decode_steps=4)
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edgevlm.errors import BundleError, ConfigError, DataError
from edgevlm.graphs.sessions import _GraphAsBundle, graph_decoder, ort_session  # noqa: F401 (re-exported)
from edgevlm.resources import data_dir

log = logging.getLogger(__name__)

EMBEDDED_SPEC = data_dir("calibration") / "embedded.toml"      # wheel: edgevlm/_data/calibration (edgevlm.resources)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
_SPEC_KEYS = ("name", "generator", "generator_version", "split", "seed", "num_samples", "heldout_split",
              "heldout_seed", "heldout_samples", "heldout_samples_large", "decode_steps", "image_size", "prompts")


# ---- the embedded set's definition ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSpec:
    """``calibration/embedded.toml``: how the embedded calibration and held-out sets are generated."""

    split: str = "calibration"
    seed: int = 1234
    num_samples: int = 32
    heldout_split: str = "calibration-heldout"
    heldout_seed: int = 4321
    heldout_samples: int = 16
    heldout_samples_large: int = 4
    decode_steps: int = 4
    image_size: int = 0
    prompts: tuple[str, ...] = ("What shape is shown?", "Describe the image.")
    name: str = "edgevlm-synthetic-calibration"
    generator: str = "edgevlm.train.synthetic"
    generator_version: int = 1
    source: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "CalibrationSpec":
        p = Path(path) if path is not None else EMBEDDED_SPEC
        if not p.is_file():
            raise ConfigError(f"calibration spec '{p}' not found (it ships with the edgevlm source tree: "
                              f"calibration/embedded.toml)")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"calibration spec {p}: invalid TOML: {exc}") from None
        unknown = sorted(set(data) - set(_SPEC_KEYS))
        if unknown:
            raise ConfigError(f"calibration spec {p}: unknown key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(_SPEC_KEYS)}")
        if data.get("split") in ("train", "val", "test") or data.get("heldout_split") in ("train", "val", "test"):
            raise ConfigError(f"calibration spec {p}: the calibration splits must not be train/val/test (they would "
                              f"overlap the data the model is trained and evaluated on)")
        if data.get("split") == data.get("heldout_split") and data.get("seed") == data.get("heldout_seed"):
            raise ConfigError(f"calibration spec {p}: the held-out set needs another split name or seed")
        for key in ("num_samples", "heldout_samples", "heldout_samples_large", "decode_steps"):
            if key in data and (not isinstance(data[key], int) or data[key] < (0 if key == "decode_steps" else 1)):
                raise ConfigError(f"calibration spec {p}: {key} must be a positive integer, got {data[key]!r}")
        if "prompts" in data:
            if not data["prompts"] or not all(isinstance(q, str) and q.strip() for q in data["prompts"]):
                raise ConfigError(f"calibration spec {p}: prompts must be a non-empty list of questions")
            data["prompts"] = tuple(data["prompts"])
        return cls(source=str(p), **data)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# ---- items ------------------------------------------------------------------------------------------------------
@dataclass
class CalibrationItem:
    """One image and one question (``answer`` None when the source has none)."""

    id: str
    image: Any                      # PIL image or a path
    question: str                   # without the <image> placeholder
    answer: str | None = None
    question_type: str | None = None


@dataclass
class CalibrationSet:
    """Calibration items, held-out items and where they came from (recorded in the manifest)."""

    items: list[CalibrationItem]
    heldout: list[CalibrationItem]
    info: dict[str, Any] = field(default_factory=dict)


def _source_kind(source: Any) -> str:
    if source is None or (isinstance(source, str) and source in ("", "embedded")):
        return "embedded"
    if isinstance(source, (list, tuple)):
        return "items"
    p = Path(source)
    if not p.exists():
        raise DataError(f"calibration source '{p}' does not exist; pass a folder of images, a LLaVA-format "
                        f".json/.jsonl file, or 'embedded' (the synthetic set of calibration/embedded.toml)")
    if p.is_dir():
        return "folder"
    if p.suffix.lower() in (".json", ".jsonl"):
        return "llava"
    raise DataError(f"calibration source '{p}' is a file but not a LLaVA .json/.jsonl; pass a folder of images or "
                    f"a LLaVA-format JSON file (--calibration DIR|FILE.json)")


def embedded_items(n: int | None = None, *, heldout: bool = False, spec: CalibrationSpec | None = None,
                   image_size: int | None = None, start: int = 0) -> list[CalibrationItem]:
    """``n`` samples of the embedded calibration (or held-out) split, generated in memory."""
    from edgevlm.train.synthetic import generate_samples

    spec = spec or CalibrationSpec.load()
    n = (spec.heldout_samples if heldout else spec.num_samples) if n is None else int(n)
    if n <= 0:
        raise DataError(f"the calibration set needs at least one sample, got {n}")
    size = max(32, int(spec.image_size or image_size or 112))
    split, seed = (spec.heldout_split, spec.heldout_seed) if heldout else (spec.split, spec.seed)
    return [CalibrationItem(s.id, s.image, s.question, s.answer, s.question_type)
            for s in generate_samples(n, split=split, seed=seed, start=start, image_size=size)]


def folder_items(folder: str | os.PathLike, n: int | None = None, prompts: Sequence[str] | None = None,
                 *, skip: int = 0) -> list[CalibrationItem]:
    """Images of a folder (sorted by name), each asked one of ``prompts`` in turn."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"calibration folder '{folder}' does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"calibration folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)}); put a few "
                        f"dozen representative images there, or pass a LLaVA .json file or 'embedded'")
    prompts = list(prompts or CalibrationSpec.load().prompts)
    files = files[skip:]
    if n is not None:
        files = files[:n]
    return [CalibrationItem(p.stem, p, prompts[(skip + i) % len(prompts)]) for i, p in enumerate(files)]


def llava_items(path: str | os.PathLike, n: int | None = None, *, image_folder: str | os.PathLike | None = None,
                skip: int = 0) -> list[CalibrationItem]:
    """First question and answer of each record of a LLaVA-format file (images must exist)."""
    from edgevlm.train.llava_data import load_dataset

    limit = None if n is None else skip + n
    records = load_dataset(path, image_folder=image_folder, max_samples=limit, skip_text_only=True)
    return [CalibrationItem(r.id, r.image_path, r.question, r.answer, r.question_type) for r in records[skip:]]


def calibration_items(source: Any = None, num_samples: int | None = None, *, spec: CalibrationSpec | None = None,
                      image_size: int | None = None, heldout: bool = False) -> list[CalibrationItem]:
    """Items of a calibration source (see the module docstring); ``DataError`` when it is missing or empty."""
    spec = spec or CalibrationSpec.load()
    if num_samples is not None and int(num_samples) <= 0:
        raise DataError(f"--calibration-samples must be >= 1, got {num_samples}")
    kind = _source_kind(source)
    if kind == "embedded":
        return embedded_items(num_samples, heldout=heldout, spec=spec, image_size=image_size)
    if kind == "items":
        items = list(source)[:num_samples] if num_samples else list(source)
    elif kind == "folder":
        items = folder_items(source, num_samples, spec.prompts)
    else:
        items = llava_items(source, num_samples)
    if not items:
        raise DataError(f"calibration source '{source}' is empty; it needs at least one image")
    return items


def calibration_set(source: Any = None, num_samples: int | None = None, *, heldout_samples: int | None = None,
                    spec: CalibrationSpec | None = None, image_size: int | None = None) -> CalibrationSet:
    """Calibration items plus a disjoint held-out set for the report."""
    spec = spec or CalibrationSpec.load()
    n = int(num_samples or spec.num_samples)
    m = int(heldout_samples or spec.heldout_samples)
    kind = _source_kind(source)
    items = calibration_items(source, n, spec=spec, image_size=image_size)
    heldout: list[CalibrationItem] = []
    held_desc: dict[str, Any]
    if kind == "folder":
        heldout = folder_items(source, m, spec.prompts, skip=len(items)) if _count_images(source) > len(items) else []
    elif kind == "llava":
        try:
            heldout = llava_items(source, m, skip=len(items))
        except DataError:
            heldout = []
    if heldout:
        held_desc = {"kind": kind, "source": str(Path(source).resolve()), "num_samples": len(heldout),
                     "skip": len(items)}
    else:
        heldout = embedded_items(m, heldout=True, spec=spec, image_size=image_size)
        held_desc = {"kind": "embedded", "split": spec.heldout_split, "seed": spec.heldout_seed,
                     "num_samples": len(heldout)}
        if kind not in ("embedded", "items"):
            held_desc["note"] = "the calibration source had no images left over for a held-out set"
    calib_desc: dict[str, Any] = {"kind": kind, "num_samples": len(items)}
    if kind == "embedded":
        calib_desc.update({"split": spec.split, "seed": spec.seed, "generator": spec.generator,
                           "generator_version": spec.generator_version, "spec": "calibration/embedded.toml"})
    elif kind in ("folder", "llava"):
        calib_desc["source"] = str(Path(source).resolve())
    return CalibrationSet(items, heldout, {"calibration": calib_desc, "heldout": held_desc,
                                           "decode_steps": spec.decode_steps})


def _count_images(folder: Any) -> int:
    return sum(1 for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# ---- bundle facts the readers need ------------------------------------------------------------------------------
@dataclass
class GraphInput:
    name: str
    dtype: Any          # numpy dtype
    shape: list[Any]


def graph_inputs(path: str | os.PathLike) -> dict[str, GraphInput]:
    """The graph's declared inputs (names, numpy dtypes, dims), read from the ONNX file (no weights loaded)."""
    from edgevlm.graphs.files import graph_io

    out = {}
    for e in graph_io(path)[0]:
        if e["dtype"] not in _NP:
            raise BundleError(f"graph {path}: input '{e['name']}' has dtype {e['dtype']}, which calibration does not "
                              f"feed ({', '.join(_NP)})")
        out[e["name"]] = GraphInput(e["name"], np.dtype(_NP[e["dtype"]]), list(e["shape"]))
    return out


@dataclass
class BundleContext:
    """What turns an image + question into decoder inputs: preprocessing, prompt template, tokenizer, embeddings."""

    preprocess: Any                 # edgevlm.preprocess.PreprocessConfig
    template: str
    system: str | None
    bos_id: int | None
    eos_id: int | None
    tokenizer: Any                  # tokenizers.Tokenizer
    embed_table: np.ndarray         # [vocab, D] (float32 or float16)
    visual_tokens: int
    context_length: int

    @classmethod
    def from_manifest(cls, root: str | os.PathLike, manifest: Mapping[str, Any]) -> "BundleContext":
        """Read from a bundle directory (finished, or still being written) and its (possibly partial) manifest."""
        from tokenizers import Tokenizer

        from edgevlm.config import ModelConfig
        from edgevlm.preprocess import PreprocessConfig

        root = Path(root)
        from edgevlm.bundle import MODEL_EXTRA_KEYS

        model = {k: v for k, v in (manifest.get("model") or {}).items() if k not in MODEL_EXTRA_KEYS}
        cfg = ModelConfig.from_dict(model) if model else None
        if "preprocess" in manifest:
            pre = PreprocessConfig.from_dict(manifest["preprocess"])
        elif cfg is not None:
            pre = PreprocessConfig(image_size=cfg.vision.image_size, mean=tuple(cfg.image_mean),
                                   std=tuple(cfg.image_std), aspect_ratio=cfg.image_aspect_ratio)
        else:
            raise BundleError("the manifest has neither 'preprocess' nor 'model': calibration cannot preprocess "
                              "images; pass the manifest built so far (with 'model' or 'preprocess')")
        prompt = manifest.get("prompt") or {}
        tok_file = root / (manifest.get("tokenizer") or {}).get("file", "tokenizer/tokenizer.json")
        if not tok_file.is_file():
            raise BundleError(f"tokenizer '{tok_file}' not found: write the tokenizer before quantizing (calibration "
                              f"tokenizes real prompts)")
        embed = ((manifest.get("components") or {}).get("embed") or {}).get("file", "embed_tokens.npy")
        table_path = root / embed
        if not table_path.is_file():
            raise BundleError(f"embedding table '{table_path}' not found: write it before quantizing")
        table = np.load(table_path, mmap_mode="r", allow_pickle=False)
        visual = int(manifest.get("visual_tokens") or (cfg.visual_tokens if cfg else 0))
        ctx_len = int(cfg.context_length) if cfg is not None else 2048
        bos = prompt.get("bos_token_id", cfg.llm.bos_token_id if cfg else 1)
        eos = prompt.get("eos_token_id", cfg.llm.eos_token_id if cfg else 2)
        return cls(pre, str(prompt.get("template", "vicuna_v1")), prompt.get("system"), bos, eos,
                   Tokenizer.from_file(str(tok_file)), table, visual, ctx_len)

    def pixel_values(self, image: Any) -> np.ndarray:
        """``[1, 3, S, S]`` float32."""
        from edgevlm.preprocess import preprocess

        return preprocess(image, self.preprocess)[None]

    def prompt_ids(self, question: str) -> list[int]:
        from edgevlm.prompt import build_prompt, tokenize_prompt

        return tokenize_prompt(build_prompt(question, self.template, system=self.system), self.tokenizer, self.bos_id)

    def continuation_ids(self, question: str, answer: str) -> list[int]:
        """The answer's tokens as training renders them after the prompt (``" answer</s>"``, EOS included)."""
        from edgevlm.prompt import IMAGE_PLACEHOLDER, build_conversation, tokenize_prompt

        prompt = self.prompt_ids(question)
        text, _ = build_conversation([(f"{IMAGE_PLACEHOLDER}\n{question}", answer)], self.template,
                                     system=self.system)
        full = tokenize_prompt(text, self.tokenizer, self.bos_id)
        if full[:len(prompt)] == prompt and len(full) > len(prompt):
            return full[len(prompt):]
        ids = self.tokenizer.encode(" " + answer, add_special_tokens=False).ids      # not prefix-stable: fall back
        return ids + ([self.eos_id] if self.eos_id is not None else [])

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """``[len(ids), D]`` float32 rows (fp16 tables are upcast, as the runtime does)."""
        return np.asarray(self.embed_table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def splice(self, ids: Sequence[int], image_embeds: np.ndarray) -> np.ndarray:
        """Prompt ids with one ``IMAGE_TOKEN_INDEX`` + ``[1, V, D]`` image embeddings -> ``[1, T + V - 1, D]``."""
        from edgevlm.prompt import IMAGE_TOKEN_INDEX

        ids = list(ids)
        p = ids.index(IMAGE_TOKEN_INDEX)
        parts = [self.embed(ids[:p]), np.asarray(image_embeds[0], np.float32), self.embed(ids[p + 1:])]
        return np.concatenate([x for x in parts if x.size], axis=0)[None]


def image_embeddings(vision: Any, pixel_values: np.ndarray) -> np.ndarray:
    """``[1, V, D]`` float32 image embeddings of ``pixel_values [1, 3, S, S]`` from a vision graph's session (the
    pixels cast to its declared input dtype)."""
    vin = vision.get_inputs()[0]
    px = pixel_values.astype(np.float16 if "float16" in vin.type else np.float32)
    return np.asarray(vision.run(None, {vin.name: px})[0], np.float32)


def decoder_feed(spec: Any, inputs: Mapping[str, GraphInput], embeds: np.ndarray, pasts: Sequence[np.ndarray],
                 past_length: int, capacity: int) -> dict[str, np.ndarray]:
    """The feed of one plain run of a decoder graph over ``embeds [1, seq, D]`` after ``past_length`` cached tokens
    (``pasts``: ``Decoder.kv_arrays()``, ``[1, H, past_length, d]`` each; empty for a prefill), cast to the graph's
    declared dtypes: what ORT's calibrators feed the graph being quantized. ``concat`` graphs get the pasts as they
    are, ``shared_buffer`` graphs a zero ``[1, H, capacity, d]`` buffer holding them in rows ``0..past_length-1``."""
    seq = embeds.shape[1]
    total = past_length + seq
    cast = lambda name, x: np.ascontiguousarray(x, dtype=inputs[name].dtype)  # noqa: E731
    feed = {"inputs_embeds": cast("inputs_embeds", embeds),
            "attention_mask": np.ones((1, total), inputs["attention_mask"].dtype)}
    if "position_ids" in inputs:
        feed["position_ids"] = cast("position_ids", np.arange(past_length, total)[None])
    for j, name in enumerate(spec.past_names()):
        if spec.mode == "shared_buffer":
            buf = np.zeros(spec.shape(capacity), inputs[name].dtype)
            if past_length:
                rows = tuple(slice(0, past_length) if a == "seq" else slice(None) for a in spec.layout)
                buf[rows] = pasts[j]
        elif past_length:
            buf = cast(name, pasts[j])
        else:
            buf = np.zeros(spec.shape(0), inputs[name].dtype)
        feed[name] = buf
    return feed


# ---- readers ----------------------------------------------------------------------------------------------------
class VisionCalibrationReader(CalibrationDataReader):
    """``{pixel_values: [B, 3, S, S]}`` batches of real preprocessed images, in the graph's declared dtype."""

    def __init__(self, items: Sequence[CalibrationItem], preprocess_cfg: Any, graph: str | os.PathLike | None = None,
                 *, input_name: str = "pixel_values", dtype: Any = np.float32, batch_size: int = 1) -> None:
        if not items:
            raise DataError("the vision calibration reader got no images")
        if graph is not None:
            (inp,) = graph_inputs(graph).values()
            input_name, dtype = inp.name, inp.dtype
        self.items = list(items)
        self.preprocess_cfg = preprocess_cfg
        self.input_name, self.dtype, self.batch_size = input_name, np.dtype(dtype), max(1, int(batch_size))
        self._cache: dict[int, np.ndarray] = {}
        self._pos = 0

    def _pixels(self, i: int) -> np.ndarray:
        if i not in self._cache:
            from edgevlm.preprocess import preprocess

            self._cache[i] = preprocess(self.items[i].image, self.preprocess_cfg)
        return self._cache[i]

    def __len__(self) -> int:
        return (len(self.items) + self.batch_size - 1) // self.batch_size

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve batches ``start_index .. end_index - 1`` next (ORT's strided calibration)."""
        self._pos = start_index * self.batch_size
        self._end = min(len(self.items), end_index * self.batch_size)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= min(len(self.items), getattr(self, "_end", len(self.items))):
            return None
        idx = range(self._pos, min(self._pos + self.batch_size, len(self.items)))
        self._pos = idx[-1] + 1
        return {self.input_name: np.stack([self._pixels(i) for i in idx]).astype(self.dtype, copy=False)}

    def rewind(self) -> None:
        self._pos = 0
        self._end = len(self.items)


@dataclass
class DecoderSample:
    """One decoder calibration input: ``kind`` prefill | decode, the item it came from and its past length."""

    kind: str
    item: str
    step: int
    past_length: int
    feed: dict[str, np.ndarray]
    token: int | None = None        # decode: the token fed (its embedding is ``inputs_embeds``)


class DecoderCalibrationReader(CalibrationDataReader):
    """Prefill and decode samples with realistic positions and past lengths (see the module docstring).

    Args:
        ctx: the bundle's ``BundleContext``.
        items: calibration items.
        vision_graph: the fp32 vision graph (image embeddings for the splice).
        decoder_graph: the fp32 decoder graph (declares the inputs; produces the past KV of decode samples).
        decode_steps: decode samples per item after its prefill sample (0 = prefill only).
        teacher_forcing: feed the reference answer's tokens (when the item has one) rather than greedy tokens.
        threads: ONNX Runtime intra-op threads for the fp32 runs.
    """

    def __init__(self, ctx: BundleContext, items: Sequence[CalibrationItem], vision_graph: str | os.PathLike,
                 decoder_graph: str | os.PathLike, *, decode_steps: int = 4, teacher_forcing: bool = True,
                 threads: int | None = None) -> None:
        if not items:
            raise DataError("the decoder calibration reader got no items")
        if decode_steps < 0:
            raise ConfigError(f"decode_steps must be >= 0, got {decode_steps}")
        self.ctx, self.items = ctx, list(items)
        self.vision_graph, self.decoder_graph = Path(vision_graph), Path(decoder_graph)
        self.decode_steps, self.teacher_forcing, self.threads = int(decode_steps), teacher_forcing, threads
        self.inputs = graph_inputs(self.decoder_graph)
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        if "inputs_embeds" not in self.inputs or "attention_mask" not in self.inputs:
            raise BundleError(f"decoder graph {self.decoder_graph} lacks inputs_embeds/attention_mask inputs; it is "
                              f"not an edgevlm decoder")
        self._vision = self._decoder = None
        self._embeds_cache: dict[int, np.ndarray] = {}
        self._gen: Iterator[DecoderSample] | None = None
        self._served = 0
        self._budget: int | None = None
        self._len: int | None = None

    # -- fp32 runs
    def _sessions(self):
        """The fp32 vision session and the fp32 decoder (``graph_decoder``: the decoder interface), made once."""
        if self._vision is None:
            spec = self._kv_spec()
            self._vision = ort_session(self.vision_graph, self.threads)
            longest = max(len(self.ctx.prompt_ids(it.question)) - 1 for it in self.items) + self.ctx.visual_tokens
            self._decoder = graph_decoder(self.decoder_graph, self.threads,
                                          max_context=max(1, longest + self.decode_steps + 1))
            self._spec = spec
        return self._vision, self._decoder

    def image_embeds(self, i: int) -> np.ndarray:
        """``[1, V, D]`` fp32 image embeddings of item ``i`` (cached)."""
        if i not in self._embeds_cache:
            vision, _ = self._sessions()
            self._embeds_cache[i] = image_embeddings(vision, self.ctx.pixel_values(self.items[i].image))
        return self._embeds_cache[i]

    def _kv_dims(self, name: str) -> tuple[int, int]:
        shape = self.inputs[name].shape
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise BundleError(f"decoder input '{name}' has shape {shape}; expected [batch, heads, past_seq, head_dim] "
                              f"with static heads and head_dim")
        return shape[1], shape[3]

    def _kv_spec(self):
        """The graph's KV layout and mode (``edgevlm.runtime.kv_cache.KVSpec``), every past checked static."""
        from edgevlm.runtime.kv_cache import KVSpec

        for name in self.past_names:
            self._kv_dims(name)                                                          # static heads/head_dim
        return KVSpec.from_graph_inputs({n: g.shape for n, g in self.inputs.items()},
                                        dtype=self.inputs[self.past_names[0]].dtype)

    def samples(self) -> Iterator[DecoderSample]:
        """Every sample, lazily: per item a prefill then its decode steps. The fp32 decoder runs through the decoder
        interface (``prefill`` / ``step``); each decode sample's pasts are its cache (``kv_arrays``) after the
        previous token, laid out as the graph being calibrated declares them (``decoder_feed``)."""
        _, decoder = self._sessions()
        spec = self._spec
        for i, item in enumerate(self.items):
            ids = self.ctx.prompt_ids(item.question)
            embeds = self.ctx.splice(ids, self.image_embeds(i))                           # [1, T, D]
            t = embeds.shape[1]
            capacity = t + self.decode_steps + 1                                          # shared-buffer pasts
            yield DecoderSample("prefill", item.id, 0, 0, decoder_feed(spec, self.inputs, embeds, [], 0, capacity))
            if not self.decode_steps:
                continue
            teacher = (self.ctx.continuation_ids(item.question, item.answer)
                       if self.teacher_forcing and item.answer is not None else None)
            logits = decoder.prefill(embeds)                                              # [vocab]
            n = t
            for step in range(1, self.decode_steps + 1):
                if n + 1 > self.ctx.context_length:
                    break
                if teacher is not None:
                    if step > len(teacher):
                        break
                    tok = int(teacher[step - 1])
                else:
                    tok = int(np.argmax(logits))
                row = self.ctx.embed([tok])                                               # [1, D]
                feed = decoder_feed(spec, self.inputs, row[None], decoder.kv_arrays(), n, capacity)
                yield DecoderSample("decode", item.id, step, n, feed, tok)
                if step < self.decode_steps:
                    logits = decoder.step(row[0])
                n += 1

    def _decode_count(self, item: CalibrationItem) -> int:
        t = len(self.ctx.prompt_ids(item.question)) - 1 + self.ctx.visual_tokens
        n = min(self.decode_steps, max(0, self.ctx.context_length - t))
        if self.teacher_forcing and item.answer is not None:
            n = min(n, len(self.ctx.continuation_ids(item.question, item.answer)))
        return n

    def __len__(self) -> int:
        """Number of samples (prefills + decode steps), known without running the model."""
        if self._len is None:
            self._len = sum(1 + (self._decode_count(it) if self.decode_steps else 0) for it in self.items)
        return self._len

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve samples ``start_index .. end_index - 1`` next (ORT's strided calibration). Consecutive ranges
        continue the lazy generator; any other start restarts it."""
        if self._gen is None or start_index != self._served:
            self._gen, self._served = self.samples(), 0
            for _ in range(start_index):
                next(self._gen, None)
                self._served += 1
        self._budget = end_index - start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._gen is None:
            self._gen, self._served = self.samples(), 0
        if self._budget is not None:
            if self._budget <= 0:
                return None
            self._budget -= 1
        sample = next(self._gen, None)
        if sample is None:
            return None
        self._served += 1
        return sample.feed

    def rewind(self) -> None:
        self._gen, self._served, self._budget = None, 0, None


__all__ = ["CalibrationSpec", "CalibrationItem", "CalibrationSet", "BundleContext", "GraphInput", "DecoderSample",
           "VisionCalibrationReader", "DecoderCalibrationReader", "calibration_items", "calibration_set",
           "embedded_items", "folder_items", "llava_items", "graph_inputs", "ort_session", "graph_decoder",
           "decoder_feed", "image_embeddings", "EMBEDDED_SPEC",
           "IMAGE_SUFFIXES"]
