"""KV-cache handling for the decoder graph, behind one small interface so cache layouts slot in by manifest mode.

The decoder component's ``kv_cache`` block (manifest) says how past/present tensors are named and shaped::

    {"num_layers": L, "num_kv_heads": H, "head_dim": d, "layout": "batch,heads,seq,head_dim", "dtype": "float32",
     "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
     "present_key": "present.{i}.key", "present_value": "present.{i}.value",
     "mode": "concat"}                        # optional; "concat" when absent

Modes:

* ``concat`` (Optimum convention, the default): the graph concatenates past + new keys/values into ``present``
  of length ``past + seq``. Presents are bound as ORT-allocated outputs (on the EP's device) and the very same
  ``OrtValue`` objects are re-bound as the next step's past inputs: no host copy, no numpy concatenation; the only
  per-step allocation is ORT's own present buffer. Prefill binds zero-length pasts.
* ``shared_buffer`` (ORT ``GroupQueryAttention`` with ``past_present_share_buffer``): one preallocated
  ``[B, H, max_len, d]`` buffer per tensor, bound as both past input and present output, written in place by the
  attention op; nothing is allocated per step.

Usage (by ``Session``): ``kv.reset()``, ``kv.bind_inputs()`` + ``kv.bind_outputs(offset)`` before a run,
``kv.commit(new_length)`` after it.

Every caller that runs a decoder (``Session``, verify, export parity, calibration, the quantization report) does so
through ``edgevlm.runtime.decoders`` (``OrtDecoder`` holds one of these caches; ``kv_arrays()`` gives host copies).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from edgevlm.errors import BundleError

__all__ = ["KVSpec", "KVCache", "ConcatKVCache", "SharedBufferKVCache", "KV_MODES", "make_kv_cache",
           "mode_from_inputs"]

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None}


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    layout: tuple[str, ...]
    mode: str
    past_key: str
    past_value: str
    present_key: str
    present_value: str

    @classmethod
    def from_manifest(cls, kv: Any, where: str = "components.decoder.kv_cache") -> "KVSpec":
        if not isinstance(kv, dict):
            raise BundleError(f"manifest {where} is missing or not an object; the runtime needs the KV-cache names "
                              f"and dims from it: re-export the bundle")
        missing = [k for k in ("num_layers", "num_kv_heads", "head_dim", "past_key", "past_value", "present_key",
                               "present_value") if k not in kv]
        if missing:
            raise BundleError(f"manifest {where} lacks {', '.join(missing)}; re-export the bundle")
        layout = tuple(s.strip() for s in str(kv.get("layout", "batch,heads,seq,head_dim")).split(","))
        if sorted(layout) != sorted(("batch", "heads", "seq", "head_dim")):
            raise BundleError(f"manifest {where}.layout {kv.get('layout')!r} must name the four axes batch, heads, "
                              f"seq, head_dim; re-export the bundle")
        dtype = str(kv.get("dtype", "float32"))
        if dtype not in _DTYPES or _DTYPES[dtype] is None:
            raise BundleError(f"manifest {where}.dtype '{dtype}' is not supported by the runtime (supported: "
                              f"float32, float16)")
        mode = str(kv.get("mode", "concat"))
        if mode not in KV_MODES:
            raise BundleError(f"manifest {where}.mode '{mode}' is not supported by this runtime (supported: "
                              f"{', '.join(KV_MODES)}); upgrade edgevlm or re-export the bundle")
        for key in ("past_key", "past_value", "present_key", "present_value"):
            if "{i}" not in str(kv[key]):
                raise BundleError(f"manifest {where}.{key} {kv[key]!r} has no '{{i}}' layer placeholder")
        return cls(int(kv["num_layers"]), int(kv["num_kv_heads"]), int(kv["head_dim"]), dtype, layout, mode,
                   str(kv["past_key"]), str(kv["past_value"]), str(kv["present_key"]), str(kv["present_value"]))

    @classmethod
    def from_graph_inputs(cls, inputs: Mapping[str, Sequence[Any]], *, dtype: Any = np.float32) -> "KVSpec":
        """The spec of a graph known only by its inputs (``name -> shape``), Optimum/builder naming
        (``past_key_values.{i}.key``): heads and head_dim from the past shapes, the mode from ``mode_from_inputs``;
        ``dtype``: the past tensors' numpy dtype (float32 or float16)."""
        past = sorted((n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")),
                      key=lambda n: int(n.split(".")[1]))
        if not past:
            raise BundleError("the decoder graph has no past_key_values.{i}.key inputs; it is not a KV-cached "
                              "decoder this toolkit can drive")
        shape = list(inputs[past[0]])
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise BundleError(f"decoder input '{past[0]}' has shape {shape}; expected [batch, heads, seq, head_dim] "
                              f"with static heads and head_dim")
        return cls(len(past), int(shape[1]), int(shape[3]), np.dtype(dtype).name, ("batch", "heads", "seq", "head_dim"),
                   mode_from_inputs(inputs), "past_key_values.{i}.key", "past_key_values.{i}.value",
                   "present.{i}.key", "present.{i}.value")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.dtype])

    def past_names(self) -> list[str]:
        """``[past key 0, past value 0, past key 1, ...]``."""
        return [n for i in range(self.num_layers) for n in (self.past_key.format(i=i), self.past_value.format(i=i))]

    def present_names(self) -> list[str]:
        return [n for i in range(self.num_layers)
                for n in (self.present_key.format(i=i), self.present_value.format(i=i))]

    def shape(self, seq: int, batch: int = 1) -> list[int]:
        dims = {"batch": batch, "heads": self.num_kv_heads, "seq": seq, "head_dim": self.head_dim}
        return [dims[a] for a in self.layout]

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.np_dtype.itemsize


class KVCache(ABC):
    """Binds past inputs / present outputs on an ORT ``IOBinding`` and carries presents over to the next step."""

    mode = ""

    def __init__(self, spec: KVSpec, binding: Any, *, device_type: str = "cpu", device_id: int = 0,
                 max_len: int) -> None:
        self.spec, self.binding = spec, binding
        self.device_type, self.device_id = device_type, device_id
        self.max_len = max_len
        self.length = 0
        self._past = spec.past_names()
        self._present = spec.present_names()

    def reset(self) -> None:
        """Forget the cached context (a new request)."""
        self.length = 0

    @abstractmethod
    def bind_inputs(self) -> None:
        """Bind the past tensors for the next run."""

    @abstractmethod
    def bind_outputs(self, offset: int) -> None:
        """Bind the presents; ``offset`` = outputs bound before them (their index in ``get_outputs()``)."""

    @abstractmethod
    def commit(self, new_length: int) -> None:
        """After a run: the presents become the past of the next run."""


class ConcatKVCache(KVCache):
    """Optimum-style graph: ``present = concat(past, new)``; presents re-bound as the next pasts (OrtValues)."""

    mode = "concat"

    def __init__(self, spec: KVSpec, binding: Any, **kw: Any) -> None:
        super().__init__(spec, binding, **kw)
        import onnxruntime as ort

        empty = np.zeros(spec.shape(0), dtype=spec.np_dtype)
        self._empty = ort.OrtValue.ortvalue_from_numpy(empty, self.device_type, self.device_id)
        self._values: list[Any] = []
        self._offset = 0

    def reset(self) -> None:
        super().reset()
        self._values = []                                   # drop the previous request's presents

    def bind_inputs(self) -> None:
        if self.length == 0:
            for name in self._past:
                self.binding.bind_ortvalue_input(name, self._empty)
        else:
            for name, value in zip(self._past, self._values):
                self.binding.bind_ortvalue_input(name, value)

    def bind_outputs(self, offset: int) -> None:
        self._offset = offset
        for name in self._present:
            self.binding.bind_output(name, self.device_type, self.device_id)

    def commit(self, new_length: int) -> None:
        outs = self.binding.get_outputs()
        self._values = list(outs[self._offset:self._offset + len(self._present)])
        self.length = new_length


class SharedBufferKVCache(KVCache):
    """One ``[B, H, max_len, d]`` buffer per tensor, bound as both past and present (written in place)."""

    mode = "shared_buffer"

    def __init__(self, spec: KVSpec, binding: Any, **kw: Any) -> None:
        super().__init__(spec, binding, **kw)
        import onnxruntime as ort

        shape = spec.shape(self.max_len)
        self._buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, spec.np_dtype, self.device_type,
                                                                   self.device_id)
                         for _ in self._past]

    def bind_inputs(self) -> None:
        for name, value in zip(self._past, self._buffers):
            self.binding.bind_ortvalue_input(name, value)

    def bind_outputs(self, offset: int) -> None:
        for name, value in zip(self._present, self._buffers):
            self.binding.bind_ortvalue_output(name, value)

    def commit(self, new_length: int) -> None:
        self.length = new_length

    def pointers(self) -> list[int]:
        """Host addresses of the buffers, ``[past key 0, past value 0, ...]`` (CPU device only): the native
        decode kernel reads and writes them in place."""
        if self.device_type != "cpu":
            raise ValueError("KV buffers live on the device; their host pointers are not addressable")
        return [v.data_ptr() for v in self._buffers]


KV_MODES: dict[str, type[KVCache]] = {"concat": ConcatKVCache, "shared_buffer": SharedBufferKVCache}


def make_kv_cache(spec: KVSpec, binding: Any, *, device_type: str = "cpu", device_id: int = 0,
                  max_len: int) -> KVCache:
    return KV_MODES[spec.mode](spec, binding, device_type=device_type, device_id=device_id, max_len=max_len)


def mode_from_inputs(inputs: Mapping[str, Any]) -> str:
    """KV mode of a decoder graph known only by its input names (no manifest at hand): the toolkit's graphs with a
    ``position_ids`` input are Optimum-style ``concat`` graphs; the GroupQueryAttention graphs derive positions from
    the attention mask and share one past/present buffer (``edgevlm.exporter.ort_decoder``)."""
    return "concat" if "position_ids" in inputs else "shared_buffer"
