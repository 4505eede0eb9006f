"""The TensorRT runners: ``TrtVisionRunner`` (``pixel_values -> image_embeds`` on the vision engine) and
``TrtDecoderRunner`` (the decoder engine with every buffer preallocated and the KV cache on the device). Both
implement the runtime's interfaces (``edgevlm.runtime.decoders``: ``VisionEncoder`` / ``Decoder``):
``backend == "tensorrt"``, ``encode`` / ``prefill`` / ``step`` / ``reset`` / ``length`` / ``kv_arrays`` / ``info`` /
``close``, and both are context managers.

    >>> dec = TrtDecoderRunner(engine, kv_spec, stream=stream, cudart=cudart)
    >>> logits = dec.prefill(embeds)                     # [1, T, D] or [T, D] -> [vocab] (pinned host view)
    >>> logits = dec.step(embed_row)                     # [D] -> [vocab]; PromptError when the cache is full
    >>> pasts = dec.kv_arrays()                          # host copies, [1, H, length, hd] float32 each

Decoder buffers, allocated once: ``inputs_embeds`` (longest prompt), ``attention_mask`` (ones, max context; each
step binds its ``[1, past + seq]`` prefix), ``position_ids``, ``logits [1, 1, vocab]`` (+ a pinned host copy the
sampler reads in place), and two max-context buffers per past tensor (layer x key/value), used ping-pong
(``KVPingPong``): step t binds ``past`` = buffer A viewed as ``[1, H, past, hd]`` and ``present`` = buffer B viewed
as ``[1, H, past + seq, hd]`` (the Optimum graph writes ``concat(past, new)`` into it); step t + 1 swaps A and B. No
KV byte crosses to the host on the hot path and nothing is allocated per token.

No torch, no onnx. Re-exported by ``edgevlm.runtime.trt_backend``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgevlm.errors import BundleError, PromptError, RuntimeBackendError
from edgevlm.runtime.caches import KVReuseUnsupported
from edgevlm.runtime.trt_cuda import DeviceBuffer, PinnedBuffer, _check, _Closing, free_all
from edgevlm.runtime.trt_engine import KVPingPong, KVStep, TensorInfo, TrtEngine, _volume

log = logging.getLogger(__name__)

__all__ = ["TrtVisionRunner", "TrtDecoderRunner"]


class TrtVisionRunner(_Closing):
    """``pixel_values [B, 3, S, S] -> image_embeds [B, V, D]`` on the vision engine (buffers for the profile's max
    batch, allocated once). A ``VisionEncoder``: ``encode`` (also ``runner(pixel_values)``), ``info``, ``close``."""

    backend = "tensorrt"

    def __init__(self, engine: TrtEngine, *, input_name: str, output_name: str, stream: Any, cudart: Any) -> None:
        self.engine, self.stream, self.cudart = engine, stream, cudart
        self.input_name, self.output_name = input_name, output_name
        tin, tout = engine.tensor(input_name), engine.tensor(output_name)
        self._in_dtype, self._out_dtype = tin.dtype, tout.dtype
        max_in = max((p.shapes[input_name][2] for p in engine.profiles), key=_volume, default=tin.shape)
        if any(d < 0 for d in max_in):
            raise BundleError(f"{engine.name}: input '{input_name}' has no profile range")
        self.max_batch = int(max_in[0])
        out_shape = tuple(self.max_batch if (i == 0 and d < 0) else d for i, d in enumerate(tout.shape))
        if any(d < 0 for d in out_shape):
            raise BundleError(f"{engine.name}: output '{output_name}' {list(tout.shape)} has dynamic dims besides "
                              f"the batch; the runtime expects [batch, visual tokens, hidden]")
        self._out_row = out_shape[1:]
        self.d_in = self.d_out = self.h_in = self.h_out = None
        try:                                    # a failed allocation frees the ones before it
            self.d_in = DeviceBuffer(_volume(max_in) * tin.itemsize, cudart=cudart,
                                     name=f"{engine.name}.{input_name}")
            self.d_out = DeviceBuffer(_volume(out_shape) * tout.itemsize, cudart=cudart,
                                      name=f"{engine.name}.{output_name}")
            self.h_in = PinnedBuffer(self.d_in.nbytes, cudart=cudart, name=f"{engine.name}.{input_name}.host")
            self.h_out = PinnedBuffer(self.d_out.nbytes, cudart=cudart, name=f"{engine.name}.{output_name}.host")
        except BaseException:
            self._free_quietly()
            raise

    @property
    def device_bytes(self) -> int:
        return self.d_in.nbytes + self.d_out.nbytes

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """Run the engine: ``[B, 3, S, S]`` (B <= ``max_batch``) -> a new float32 array ``[B, V, D]``."""
        if self.d_in is None or not self.d_in.ptr:
            raise RuntimeBackendError(f"{self.engine.name}: the vision runner is closed")
        x = np.asarray(pixel_values)
        b = int(x.shape[0])
        if b > self.max_batch:
            raise RuntimeBackendError(f"{self.engine.name}: batch {b} > the engine's max batch {self.max_batch}")
        staged = self.h_in.array(x.shape, self._in_dtype)
        np.copyto(staged, x, casting="same_kind")
        self.d_in.copy_from_host(staged, self.stream)
        self.engine.run({self.input_name: x.shape},
                        {self.input_name: self.d_in.ptr, self.output_name: self.d_out.ptr}, self.stream)
        out_shape = self.engine.output_shape(self.output_name)
        if tuple(out_shape) != (b, *self._out_row):
            raise RuntimeBackendError(f"{self.engine.name}: output shape {list(out_shape)}, expected "
                                      f"{[b, *self._out_row]}")
        host = self.h_out.array(out_shape, self._out_dtype)
        self.d_out.copy_to_host(host, self.stream)
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return np.array(host, dtype=np.float32)

    __call__ = encode

    def info(self) -> dict[str, Any]:
        """What runs the vision encoder: backend, engine, max batch, I/O names, device bytes, profiles."""
        return {"backend": self.backend, "engine": self.engine.name, "max_batch": self.max_batch,
                "input": self.input_name, "output": self.output_name,
                "device_bytes": self.device_bytes if self.d_in is not None else 0,
                "profiles": [p.name for p in self.engine.profiles]}

    def _free_quietly(self) -> None:
        try:
            self.close()
        except RuntimeBackendError as exc:       # the allocation error is the one to report
            log.warning("%s", exc)

    def close(self) -> None:
        """Free every buffer (all of them, even if one free fails; idempotent)."""
        free_all([self.d_in, self.d_out, self.h_in, self.h_out], f"{self.engine.name} vision buffers")


class TrtDecoderRunner(_Closing):
    """The decoder engine with every buffer preallocated and the KV cache on the device (ping-pong, see the
    module docstring). A ``Decoder`` (``edgevlm.runtime.decoders``):

    * ``reset()``: forget the context (a new request); ``length``: tokens in the KV cache;
    * ``prefill(embeds [1, T, D] | [T, D], positions [T] | [1, T] | None) -> logits [vocab]`` (starts a new sequence;
      ``PromptError`` beyond ``max_prompt`` / ``max_context``);
    * ``extend(embeds, positions)``: like prefill but after the cached context (chunked prompts, prompt-prefix
      reuse; needs a profile accepting T tokens after a past > 0, else ``caches.KVReuseUnsupported``);
    * ``rewind(n)``: keep the first ``n`` cached tokens (repacked into the other ping-pong buffer: a past is a
      contiguous ``[1, H, length, hd]`` tensor);
    * ``step(embed [D] | [1, 1, D], position | None) -> logits [vocab]`` (``decode`` is the same method;
      ``PromptError`` when the cache is full);
    * ``kv_arrays()``: host copies of the current past buffers (verify / parity, not the hot path);
    * ``info()``: backend, KV dtype / mode / device / bytes, limits, profiles.

    The returned logits row is a float32 view of pinned host memory, overwritten by the next step (copy it to keep
    it).

    Args:
        engine: the decoder ``TrtEngine``.
        kv: the manifest's ``KVSpec`` (names, heads, head_dim, layout; the dtype comes from the engine).
        stream: a CUDA stream (``cudaStreamCreate``).
        cudart: the cuda-python runtime module (``import_cudart()``).
        max_context: KV tokens to allocate (default: the largest ``attention_mask`` length the profiles accept).
        max_prompt: longest prefill (default: the largest ``inputs_embeds`` length the profiles accept).
        logits_name: the logits output (default: the one output that is not a present).
    """

    backend = "tensorrt"

    def __init__(self, engine: TrtEngine, kv: Any, *, stream: Any, cudart: Any, max_context: int | None = None,
                 max_prompt: int | None = None, logits_name: str | None = None, embeds_name: str = "inputs_embeds",
                 mask_name: str = "attention_mask", positions_name: str | None = "position_ids") -> None:
        self.engine, self.kv_spec, self.stream, self.cudart = engine, kv, stream, cudart
        self.past_names, self.present_names = kv.past_names(), kv.present_names()
        for n in (embeds_name, mask_name, *self.past_names):
            if not engine.tensor(n).is_input:
                raise BundleError(f"{engine.name}: '{n}' is not an input of the engine")
        for n in self.present_names:
            if engine.tensor(n).is_input:
                raise BundleError(f"{engine.name}: '{n}' is not an output of the engine")
        if positions_name is not None and positions_name not in engine.io:
            positions_name = None                              # graphs that derive positions themselves
        others = [n for n in engine.outputs if n not in set(self.present_names)]
        if logits_name is None:
            if len(others) != 1:
                raise BundleError(f"{engine.name}: expected one logits output besides the presents, got {others}")
            logits_name = others[0]
        self.embeds_name, self.mask_name, self.positions_name, self.logits_name = (embeds_name, mask_name,
                                                                                   positions_name, logits_name)
        t_emb, t_mask, t_logits = engine.tensor(embeds_name), engine.tensor(mask_name), engine.tensor(logits_name)
        self.hidden_size = int(t_emb.shape[-1])
        self.vocab_size = int(t_logits.shape[-1])
        if self.hidden_size < 1 or self.vocab_size < 1:
            raise BundleError(f"{engine.name}: hidden size / vocab must be static dims "
                              f"({list(t_emb.shape)}, {list(t_logits.shape)})")
        # logits [1, 1, vocab] (last position only) or [1, seq, vocab]
        self.logits_last_only = len(t_logits.shape) == 3 and t_logits.shape[1] == 1

        prof_max = lambda name, axis: max((p.shapes[name][2][axis] for p in engine.profiles  # noqa: E731
                                           if name in p.shapes), default=0)
        self.max_prompt = int(max_prompt or prof_max(embeds_name, 1))
        self.max_context = int(max_context or prof_max(mask_name, 1))
        if self.max_prompt < 1 or self.max_context < 1:
            raise BundleError(f"{engine.name}: cannot tell the prompt / context limits from the profiles; pass "
                              f"max_prompt / max_context")
        self.max_prompt = min(self.max_prompt, self.max_context)
        self.kv = KVPingPong(self.max_context)

        d, p = self.hidden_size, self.max_prompt
        self._emb_dtype, self._mask_dtype, self._logits_dtype = t_emb.dtype, t_mask.dtype, t_logits.dtype
        t_kv = engine.tensor(self.past_names[0])
        self._kv_itemsize, self._kv_dtype = t_kv.itemsize, t_kv.dtype
        self.d_embeds = self.d_mask = self.d_logits = self.d_positions = None
        self.h_embeds = self.h_positions = self.h_logits = None
        self.d_kv: list[list[DeviceBuffer]] = []
        try:                                    # a failed allocation frees the ones before it
            self._allocate(engine, cudart, stream, t_emb, t_mask, t_logits, d, p)
        except BaseException:
            try:
                self.close()
            except RuntimeBackendError as exc:   # the allocation error is the one to report
                log.warning("%s", exc)
            raise
        self.steps = 0
        self.last_profile: int | None = None

    def _allocate(self, engine: TrtEngine, cudart: Any, stream: Any, t_emb: TensorInfo, t_mask: TensorInfo,
                  t_logits: TensorInfo, d: int, p: int) -> None:
        """Every device / pinned buffer of the run, once (see the class docstring)."""
        kv = self.kv_spec
        embeds_name, mask_name, logits_name = self.embeds_name, self.mask_name, self.logits_name
        positions_name = self.positions_name
        mk = lambda n, name: DeviceBuffer(n, cudart=cudart, name=f"{engine.name}.{name}")  # noqa: E731
        self.d_embeds = mk(p * d * t_emb.itemsize, embeds_name)
        self.d_mask = mk(self.max_context * t_mask.itemsize, mask_name)
        rows = 1 if self.logits_last_only else p
        self.d_logits = mk(rows * self.vocab_size * t_logits.itemsize, logits_name)
        self.d_positions = None
        if positions_name is not None:
            t_pos = engine.tensor(positions_name)
            self._pos_dtype = t_pos.dtype
            self.d_positions = mk(p * t_pos.itemsize, positions_name)
        kv_bytes = _volume(kv.shape(self.max_context)) * self._kv_itemsize
        # [tensor j][buffer 0/1]; tensor j = past key 0, past value 0, past key 1, ...
        for j in range(len(self.past_names)):
            self.d_kv.append([])
            for ab in "AB":
                self.d_kv[j].append(mk(kv_bytes, f"kv{j}.{ab}"))

        self.h_embeds = PinnedBuffer(p * d * t_emb.itemsize, cudart=cudart, name="embeds.host")
        self.h_positions = PinnedBuffer(p * 8, cudart=cudart, name="positions.host")
        self.h_logits = PinnedBuffer(self.vocab_size * t_logits.itemsize, cudart=cudart, name="logits.host")
        self.logits = self.h_logits.array((self.vocab_size,), self._logits_dtype)
        # fp16 logits engines: the float32 row the interface promises (a host array reused every step)
        self._logits32 = self.logits if self.logits.dtype == np.float32 else np.empty(self.vocab_size, np.float32)
        ones = np.ones(self.max_context, dtype=self._mask_dtype)
        self.d_mask.copy_from_host(ones, stream)             # the mask is all ones: uploaded once, prefixes bound
        _check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    # -- state
    @property
    def length(self) -> int:
        """Tokens in the KV cache."""
        return self.kv.length

    @property
    def device_bytes(self) -> int:
        """Device memory held by this runner (the KV cache is most of it)."""
        bufs = [self.d_embeds, self.d_mask, self.d_logits, *(b for pair in self.d_kv for b in pair)]
        if self.d_positions is not None:
            bufs.append(self.d_positions)
        return sum(b.nbytes for b in bufs)

    def reset(self) -> None:
        self.kv.reset()

    # -- steps
    def prefill(self, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """A new sequence: ``embeds [1, T, D]`` (or ``[T, D]``) -> last-position logits ``[vocab]``."""
        self.reset()
        return self.extend(embeds, positions)

    def rewind(self, n: int) -> None:
        """Keep the first ``n`` cached tokens (``0 <= n <= length``). A past of ``L`` tokens is bound as a contiguous
        ``[1, H, L, hd]`` tensor, so its first ``n`` rows are not a ``[1, H, n, hd]`` tensor: they are repacked into
        the other ping-pong buffer (through host memory: ``2 * n`` rows per tensor cross the bus, a few
        MB for a system prompt; done once per request, not per step)."""
        self._alive()
        n, length = int(n), self.kv.length
        if not 0 <= n <= length:
            raise RuntimeBackendError(f"rewind({n}): the KV cache holds {length} tokens")
        if n == length:
            return
        if n == 0:
            self.kv.reset()
            return
        axis = self.kv_spec.layout.index("seq")
        shape = tuple(int(d) for d in self.kv_spec.shape(length))
        cur = self.kv.current
        kept = []
        for pair in self.d_kv:
            host = np.empty(shape, self._kv_dtype)
            pair[cur].copy_to_host(host, self.stream)
            kept.append(host)
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        idx = [slice(None)] * len(shape)
        idx[axis] = slice(0, n)
        packed = [np.ascontiguousarray(h[tuple(idx)]) for h in kept]
        for pair, a in zip(self.d_kv, packed):
            pair[1 - cur].copy_from_host(a, self.stream)
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.kv.current, self.kv.length = 1 - cur, n

    def accepts(self, seq: int, past: int) -> bool:
        """Whether a profile of the engine accepts ``seq`` new tokens after ``past`` cached ones."""
        shapes = self.step_shapes(KVStep(int(past), int(seq), int(past) + int(seq), 0, 1))
        return any(p.fits(shapes) for p in self.engine.profiles)

    def extend(self, embeds: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """``T`` more tokens after the cached context -> last-position logits ``[vocab]`` (``KVReuseUnsupported``
        when no profile takes T tokens after the cached past)."""
        self._alive()
        if self.kv.length > 0:
            t = int(np.shape(embeds)[-2]) if np.ndim(embeds) >= 2 else 1
            if not self.accepts(t, self.kv.length):
                raise KVReuseUnsupported(f"{self.engine.name}: no optimization profile takes {t} tokens after "
                                         f"{self.kv.length} cached ones; prefill the whole prompt")
        e = np.asarray(embeds)
        if e.ndim == 3:
            if e.shape[0] != 1:
                raise RuntimeBackendError(f"the TensorRT decoder runs batch 1, got embeds {list(e.shape)}")
            e = e[0]
        if e.ndim != 2 or e.shape[1] != self.hidden_size:
            raise RuntimeBackendError(f"embeds must be [1, T, {self.hidden_size}], got {list(np.shape(embeds))}")
        t = int(e.shape[0])
        if t > self.max_prompt:
            raise PromptError(f"a prompt of {t} tokens is longer than the engine's prefill profile "
                              f"({self.max_prompt}): shorten it or re-export with a larger prompt budget")
        staged = self.h_embeds.array((t, self.hidden_size), self._emb_dtype)
        np.copyto(staged, e, casting="same_kind")
        pos = None
        if self.d_positions is not None:
            pos = self.h_positions.array((t,), self._pos_dtype)
            if positions is None:
                pos[...] = np.arange(self.length, self.length + t)
            else:
                np.copyto(pos, np.asarray(positions).reshape(-1), casting="same_kind")
        return self._step(t, staged, pos)

    def step(self, embed: np.ndarray, position: int | None = None) -> np.ndarray:
        """One token (``embed [D]`` / ``[1, 1, D]``) at ``position`` (default: the cache length) -> logits
        ``[vocab]`` (``PromptError`` when the cache already holds ``max_context`` tokens)."""
        self._alive()
        e = np.asarray(embed).reshape(-1)
        if e.shape[0] != self.hidden_size:
            raise RuntimeBackendError(f"embed must have {self.hidden_size} values, got {e.shape[0]}")
        staged = self.h_embeds.array((1, self.hidden_size), self._emb_dtype)
        np.copyto(staged[0], e, casting="same_kind")
        pos = None
        if self.d_positions is not None:
            pos = self.h_positions.array((1,), self._pos_dtype)
            pos[0] = self.length if position is None else int(position)
        return self._step(1, staged, pos)

    decode = step

    # -- KV facts (verify / parity / calibration; not the hot path)
    @property
    def kv_bytes(self) -> int:
        """Device bytes of the KV cache (both ping-pong buffers of every past tensor)."""
        return sum(b.nbytes for pair in self.d_kv for b in pair)

    def kv_arrays(self) -> list[np.ndarray]:
        """Host copies of the cache: the buffer holding the current past of each tensor, in ``KVSpec.past_names()``
        order, each ``[1, kv_heads, length, head_dim]`` float32 (device -> host, synchronized)."""
        self._alive()
        shape = tuple(int(d) for d in self.kv_spec.shape(self.length))      # [1, H, length, hd]
        out = []
        for pair in self.d_kv:
            host = np.empty(shape, self._kv_dtype)
            pair[self.kv.current].copy_to_host(host, self.stream)          # the first length rows of [1, H, *, hd]
            out.append(host)
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return [a.astype(np.float32, copy=False) for a in out]

    def info(self) -> dict[str, Any]:
        """``{"backend", "kv_dtype", "kv_mode", "kv_device", "kv_bytes", "max_context", "max_prompt", "profiles",
        ...}``."""
        return {"backend": self.backend, "kv_dtype": np.dtype(self._kv_dtype).name, "kv_mode": "ping-pong",
                "kv_device": "cuda", "kv_bytes": self.kv_bytes, "max_context": self.max_context,
                "max_prompt": self.max_prompt, "profiles": [p.name for p in self.engine.profiles],
                "engine": self.engine.name, "device_bytes": self.device_bytes if self.d_embeds is not None else 0,
                "logits_dtype": np.dtype(self._logits_dtype).name, "steps": self.steps}

    def _alive(self) -> None:
        if self.d_embeds is None or not self.d_embeds.ptr:
            raise RuntimeBackendError(f"{self.engine.name}: the decoder runner is closed")

    def step_shapes(self, step: KVStep) -> dict[str, tuple[int, ...]]:
        """Input shapes of one step (batch 1)."""
        shapes: dict[str, tuple[int, ...]] = {self.embeds_name: (1, step.seq, self.hidden_size),
                                              self.mask_name: (1, step.total)}
        if self.positions_name is not None:
            shapes[self.positions_name] = (1, step.seq)
        past_shape = tuple(self.kv_spec.shape(step.past))
        for n in self.past_names:
            shapes[n] = past_shape
        return shapes

    def step_addresses(self, step: KVStep) -> dict[str, int]:
        """Tensor addresses of one step: past = buffer ``step.past_buffer``, present = the other one."""
        addr = {self.embeds_name: self.d_embeds.ptr, self.mask_name: self.d_mask.ptr,
                self.logits_name: self.d_logits.ptr}
        if self.positions_name is not None and self.d_positions is not None:
            addr[self.positions_name] = self.d_positions.ptr
        for j, (past, present) in enumerate(zip(self.past_names, self.present_names)):
            addr[past] = self.d_kv[j][step.past_buffer].ptr
            addr[present] = self.d_kv[j][step.present_buffer].ptr
        return addr

    def _step(self, seq: int, embeds: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
        self._alive()
        step = self.kv.plan(seq)
        self.d_embeds.copy_from_host(embeds, self.stream)
        if positions is not None and self.d_positions is not None:
            self.d_positions.copy_from_host(positions, self.stream)
        phase = "decode" if seq == 1 and step.past > 0 else "prefill"
        self.last_profile = self.engine.run(self.step_shapes(step), self.step_addresses(step), self.stream,
                                            prefer=phase)
        # the last position's logits row -> pinned host memory
        row = 0 if self.logits_last_only else seq - 1
        self.d_logits.copy_to_host(self.logits, self.stream, offset=row * self.logits.nbytes)
        _check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.kv.commit(step)
        self.steps += 1
        if self._logits32 is not self.logits:
            np.copyto(self._logits32, self.logits)
        return self._logits32

    def close(self) -> None:
        """Free every buffer (all of them, even if one free fails; idempotent)."""
        free_all([self.d_embeds, self.d_mask, self.d_logits, self.d_positions, self.h_embeds, self.h_positions,
                  self.h_logits, *(b for pair in self.d_kv for b in pair)], f"{self.engine.name} buffers")

