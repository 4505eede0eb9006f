"""Declarative export specs: per component the I/O names, dtypes, symbolic dims, example inputs and parity tolerances.

Optimum-style: the exporter (``onnx_export``), the parity check (``parity``) and the manifest writer
(``bundle_export``) all read the names and dims from here, so they cannot drift apart. Torch-free at import time
(example inputs import torch inside the function).

Components of a bundle::

    vision   pixel_values  float32 [batch, 3, S, S]  ->  image_embeds float32 [batch, V, D]      (tower + projector)
    embed    embed_tokens.npy  [vocab, D]  (a table the runtime gathers from with numpy; no graph)
    decoder  inputs_embeds  float32 [batch, seq, D]
             attention_mask int64   [batch, past_seq + seq]
             position_ids   int64   [batch, seq]
             past_key_values.{i}.key / .value  float32 [batch, kv_heads, past_seq, head_dim]
         ->  logits         float32 [batch, 1, vocab]           (last position only)
             present.{i}.key / .value  float32 [batch, kv_heads, past_seq + seq, head_dim]

    >>> from edgevlm.graphs.spec import decoder_spec, tolerances_for
    >>> decoder_spec(cfg).input_names[:3]
    ['inputs_embeds', 'attention_mask', 'position_ids']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgevlm.config import ModelConfig
from edgevlm.errors import ConfigError

DEFAULT_OPSET = 20
#: Models at least this large (parameters) get the bounded checks of both stages: the export's parity checks one
#: sequence, the quantization report a smaller held-out set (calibration/embedded.toml ``heldout_samples_large``),
#: random init is built in fp16. A float32 graph stores 4 bytes per parameter.
LARGE_MODEL_PARAMS = 1_000_000_000
#: Highest opset the exporter accepts. 21 only for blocked INT4 DequantizeLinear (quantization recipes).
MAX_OPSET = 21
MIN_OPSET = 18                       # torchlib implementations start at 18 (lower would be version-converted)

VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_embeds"
PAST_KEY = "past_key_values.{i}.key"
PAST_VALUE = "past_key_values.{i}.value"
PRESENT_KEY = "present.{i}.key"
PRESENT_VALUE = "present.{i}.value"
KV_LAYOUT = "batch,heads,seq,head_dim"

DIM_BATCH = "batch"
DIM_SEQ = "seq"
DIM_PAST = "past_seq"
DIM_TOTAL = "past_seq + seq"

#: Example sizes for tracing. Every dynamic dim must be >= 2 (torch.export specializes 0/1), and the dims must
#: differ from each other and from every static dim so that no two get unified by accident.
EXAMPLE_BATCH = 2
EXAMPLE_SEQ = 3
EXAMPLE_PAST = 5

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, ONNX dtype name (numpy spelling) and dims (int = static, str = symbolic)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def data_file(self) -> str:
        """The external-data file written beside the graph."""
        return self.file + ".data"


def vision_spec(cfg: ModelConfig) -> ComponentSpec:
    s, v, d = cfg.vision.image_size, cfg.visual_tokens, cfg.llm.hidden_size
    return ComponentSpec("vision", "vision.onnx",
                         (TensorSpec(VISION_INPUT, "float32", (DIM_BATCH, 3, s, s)),),
                         (TensorSpec(VISION_OUTPUT, "float32", (DIM_BATCH, v, d)),))


def past_names(num_layers: int) -> list[str]:
    return [n.format(i=i) for i in range(num_layers) for n in (PAST_KEY, PAST_VALUE)]


def present_names(num_layers: int) -> list[str]:
    return [n.format(i=i) for i in range(num_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]


def decoder_spec(cfg: ModelConfig, kv_dtype: str = "float32") -> ComponentSpec:
    c = cfg.llm
    h, hd = c.num_kv_heads, c.head_dim
    inputs = [TensorSpec("inputs_embeds", "float32", (DIM_BATCH, DIM_SEQ, c.hidden_size)),
              TensorSpec("attention_mask", "int64", (DIM_BATCH, DIM_TOTAL)),
              TensorSpec("position_ids", "int64", (DIM_BATCH, DIM_SEQ))]
    inputs += [TensorSpec(n, kv_dtype, (DIM_BATCH, h, DIM_PAST, hd)) for n in past_names(c.num_layers)]
    outputs = [TensorSpec("logits", "float32", (DIM_BATCH, 1, c.vocab_size))]
    outputs += [TensorSpec(n, kv_dtype, (DIM_BATCH, h, DIM_TOTAL, hd)) for n in present_names(c.num_layers)]
    return ComponentSpec("decoder", "decoder.onnx", tuple(inputs), tuple(outputs))


def kv_cache_entry(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The decoder's ``kv_cache`` manifest block."""
    c = cfg.llm
    return {"num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads, "num_heads": c.num_heads,
            "head_dim": c.head_dim, "layout": KV_LAYOUT, "dtype": dtype,
            "past_key": PAST_KEY, "past_value": PAST_VALUE, "present_key": PRESENT_KEY,
            "present_value": PRESENT_VALUE, "zero_length_past": True,
            "max_positions": cfg.context_length}


def embed_entry(cfg: ModelConfig, dtype: str = "float32", file: str = "embed_tokens.npy") -> dict[str, Any]:
    """The ``embed`` component entry: a ``[vocab, D]`` table gathered with numpy (memory-mapped)."""
    return {"file": file, "kind": "table", "dtype": dtype, "shape": [cfg.llm.vocab_size, cfg.llm.hidden_size],
            "precision": {"float32": "fp32", "float16": "fp16"}.get(dtype, dtype),
            "input": "token ids (int64, any shape)", "output": "inputs_embeds rows [..., D]"}


# ---- example inputs for tracing ---------------------------------------------------------------------------------
def vision_example_inputs(cfg: ModelConfig, batch: int = EXAMPLE_BATCH):
    import torch

    s = cfg.vision.image_size
    return (torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0)),)


def vision_dynamic_shapes() -> tuple[dict[int, str]]:
    return ({0: DIM_BATCH},)


def decoder_example_inputs(cfg: ModelConfig, batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ,
                           past: int = EXAMPLE_PAST, dtype=None) -> dict[str, Any]:
    """Keyword inputs of ``onnx_export.DecoderWithPast`` (past as a list of (key, value) pairs)."""
    import torch

    c = cfg.llm
    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    shape_kv = (batch, c.num_kv_heads, past, c.head_dim)
    return {
        "inputs_embeds": torch.randn(batch, seq, c.hidden_size, generator=g).to(dtype),
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.long),
        "position_ids": torch.arange(past, past + seq, dtype=torch.long).expand(batch, seq).contiguous(),
        "past_key_values": [(torch.randn(*shape_kv, generator=g).to(dtype), torch.randn(*shape_kv, generator=g).to(dtype))
                            for _ in range(c.num_layers)],
    }


def decoder_dynamic_shapes(num_layers: int) -> dict[str, Any]:
    kv = {0: DIM_BATCH, 2: DIM_PAST}
    return {"inputs_embeds": {0: DIM_BATCH, 1: DIM_SEQ},
            "attention_mask": {0: DIM_BATCH, 1: "total_seq"},
            "position_ids": {0: DIM_BATCH, 1: DIM_SEQ},
            "past_key_values": [(dict(kv), dict(kv)) for _ in range(num_layers)]}


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET}; "
                          f"TensorRT 10.x / JetPack 6 parses <= 20, 21 is only for INT4 blocked DequantizeLinear; "
                          f">= 23 would emit Attention/RMSNormalization ops TensorRT 10.3 cannot parse)")
    return opset


# ---- parity tolerances ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """A parity criterion: ``max |ort - torch| <= limit`` and (optionally) ``cosine >= min_cosine``.

    ``limit = max_abs`` or, with ``relative``, ``max_abs * max(1, max |torch|)`` (scale-aware: activations of a
    random-init vision tower or KV tensors are O(10), logits of a random decoder O(1)).
    """

    max_abs: float
    relative: bool = False
    min_cosine: float | None = None

    def limit(self, reference_absmax: float) -> float:
        return self.max_abs * (max(1.0, float(reference_absmax)) if self.relative else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ParityTolerances:
    """Tolerances per kind of check. ``kv = None`` records the KV difference without enforcing it."""

    vision: Tolerance
    logits: Tolerance
    kv: Tolerance | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"vision": self.vision.to_dict(), "logits": self.logits.to_dict(),
                "kv": self.kv.to_dict() if self.kv else None}

    def looser(self, factor: float) -> "ParityTolerances":
        def f(t: Tolerance | None) -> Tolerance | None:
            if t is None:
                return None
            cos = None if t.min_cosine is None else 1.0 - (1.0 - t.min_cosine) * factor
            return replace(t, max_abs=t.max_abs * factor, min_cosine=cos)
        return ParityTolerances(f(self.vision), f(self.logits), f(self.kv))  # type: ignore[arg-type]


#: fp32 graphs differ from PyTorch only by kernel summation order: observed 1e-7..1e-6 on tiny presets and a few
#: 1e-6 on the 1.4B decoder. 1e-4 absolute on logits (the brief's contract), 1e-4 relative to scale elsewhere.
FP32_TOLERANCES = ParityTolerances(
    vision=Tolerance(1e-4, relative=True, min_cosine=0.99999),
    logits=Tolerance(1e-4, relative=False, min_cosine=0.99999),
    kv=Tolerance(1e-4, relative=True, min_cosine=0.99999))

#: fp16 weights/activations (keep_io_types): ~1e-3 relative per layer, compounding over depth; cosine is the
#: meaningful criterion, max-abs is a loose guard against NaN/overflow.
FP16_TOLERANCES = ParityTolerances(
    vision=Tolerance(5e-2, relative=True, min_cosine=0.999),
    logits=Tolerance(1e-1, relative=True, min_cosine=0.999),
    kv=Tolerance(5e-2, relative=True, min_cosine=0.999))

def tolerances_for(precision: str) -> ParityTolerances:
    """Default tolerances for a uniform precision (``edgevlm.precisions.TOLERANCES``); recipes pass their own."""
    from edgevlm.precisions import TOLERANCES

    if precision not in TOLERANCES:
        raise ConfigError(f"no default parity tolerances for precision '{precision}'; known: "
                          f"{', '.join(TOLERANCES)} (pass a ParityTolerances explicitly)")
    return TOLERANCES[precision]


def cosine(a, b) -> float:
    """Cosine similarity of two arrays (flattened, float64). 1.0 when both are all-zero."""
    import numpy as np

    x = np.asarray(a, np.float64).ravel()
    y = np.asarray(b, np.float64).ravel()
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0 or not math.isfinite(nx) or not math.isfinite(ny):
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


__all__ = ["TensorSpec", "ComponentSpec", "Tolerance", "ParityTolerances", "vision_spec", "decoder_spec",
           "kv_cache_entry", "embed_entry", "past_names", "present_names", "vision_example_inputs",
           "decoder_example_inputs", "vision_dynamic_shapes", "decoder_dynamic_shapes", "tolerances_for",
           "check_opset", "cosine", "FP32_TOLERANCES", "FP16_TOLERANCES", "DEFAULT_OPSET", "MAX_OPSET",
           "VISION_INPUT", "VISION_OUTPUT", "PAST_KEY", "PAST_VALUE", "PRESENT_KEY", "PRESENT_VALUE", "KV_LAYOUT",
           "DIM_BATCH", "DIM_SEQ", "DIM_PAST", "DIM_TOTAL"]
