"""``NativeDecoder``: decode steps with the native kernel on a bundle's quantized decoder weights, in place.

Inputs: the manifest's ``components.decoder.native_decode`` plan (written by the exporter,
``edgevlm.graphs.native_plan``), the bundle directory (the weights are read in place: the decoder's external data
file is mapped read-only and shared, advised huge pages, and the kernel points at the plan's offsets in it, so the
process holds no second copy of them), and the KV buffers of the ONNX Runtime session
(``SharedBufferKVCache.pointers()``), which the prefill filled. One ``step(embedding, pos)`` runs every layer for one
token and writes the logits row.

The plan's references are checked against the files (bounds, dtypes, shapes) before any pointer reaches C, and the
bundle's sha256 check has already covered the bytes. Never imports torch or onnx.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgevlm.errors import BundleError
from edgevlm.runtime.native.build import NativeUnavailable, load_kernel

__all__ = ["NativeDecoder", "plan_reason", "SUPPORTED_PLAN_VERSION", "KV_DTYPES"]

SUPPORTED_PLAN_VERSION = 1
KV_DTYPES = ("float16", "float32")    # what attention reads: an fp16 copy of the cache (default) or the fp32 one
_P = ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("B", _P), ("scales", _P), ("zp", _P), ("N", ctypes.c_int), ("K", ctypes.c_int),
                ("blk", ctypes.c_int), ("bits", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", _P), ("ln2", _P), ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("up", _Linear),
                ("down", _Linear), ("k_cache", _P), ("v_cache", _P), ("k16", _P), ("v16", _P)]


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("num_layers", "hidden", "num_heads", "kv_heads", "head_dim", "inter",
                                            "vocab", "max_len", "rot_half", "threads")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos_cache", _P), ("sin_cache", _P),
        ("max_pos", ctypes.c_int), ("ln_final", _P), ("head", _Linear), ("layers", ctypes.POINTER(_Layer)),
        ("h", _P), ("xn", _P), ("qkv", _P), ("attn", _P), ("y", _P), ("gu", _P), ("act", _P), ("scores", _P),
        ("xq", _P), ("xs", _P), ("xc", _P), ("xq_stride", ctypes.c_int), ("xs_stride", ctypes.c_int), ("ranges", _P)]


def plan_reason(plan: Any, kv_spec: Any) -> str | None:
    """Why the kernel cannot run this plan (None when it can). ``kv_spec``: the runtime's ``KVSpec``."""
    if not isinstance(plan, dict):
        return "the bundle has no native_decode plan (export it with this edgevlm, quantized to int4/int8)"
    if plan.get("version") != SUPPORTED_PLAN_VERSION:
        return f"native_decode plan version {plan.get('version')} is not supported (this edgevlm reads " \
               f"{SUPPORTED_PLAN_VERSION})"
    if kv_spec.mode != "shared_buffer" or kv_spec.dtype != "float32" or \
            tuple(kv_spec.layout) != ("batch", "heads", "seq", "head_dim"):
        return "the native kernel needs a float32 [batch, heads, seq, head_dim] shared-buffer KV cache"
    if int(plan["head_dim"]) % 16 or int(plan["head_dim"]) != kv_spec.head_dim or \
            int(plan["kv_heads"]) != kv_spec.num_kv_heads or len(plan["layers"]) != kv_spec.num_layers:
        return "the native_decode plan's attention dims disagree with the KV cache (or head_dim % 16 != 0)"
    if int(plan["num_heads"]) % int(plan["kv_heads"]):
        return "num_heads is not a multiple of kv_heads"
    for i, layer in enumerate(plan["layers"]):
        if layer["past_key"] != kv_spec.past_key.format(i=i) or layer["past_value"] != kv_spec.past_value.format(i=i):
            return f"layer {i} of the native_decode plan reads KV inputs {layer['past_key']}/{layer['past_value']}"
    lins = _linears(plan)
    for lin in lins:
        if lin["bits"] not in (4, 8) or lin["block_size"] % (128 if lin["bits"] == 4 else 64):
            return f"{lin['node']}: {lin['bits']}-bit block {lin['block_size']} (the kernel takes 4-bit blocks of " \
                   f"128k, 8-bit blocks of 64k)"
    first = plan["layers"][0]
    if first["gate_up"]["bits"] != (first["up"] or first["gate_up"])["bits"] or \
            first["gate_up"]["block_size"] != (first["up"] or first["gate_up"])["block_size"]:
        return "separate gate/up projections with different quantization"
    return None


def _linears(plan: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every MatMulNBits entry of the plan: the LM head, then each layer's qkv, o, gate_up, up (if separate), down."""
    return [plan["lm_head"]] + [lp[f] for lp in plan["layers"] for f in ("qkv", "o", "gate_up", "up", "down")
                                if lp[f] is not None]


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)   # Linux >= 5.14: fault every page in, read-only


def _mapping_stats(addr: int) -> dict[str, int] | None:
    """``/proc/self/smaps`` counters (bytes) of the mapping that contains ``addr`` (None where unknown)."""
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            inside, out = False, {}
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):
                    if inside:
                        return out
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and line.rstrip().endswith(" kB"):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
            return out if inside else None
    except (OSError, ValueError):
        return None


def _map_file(path: Path, rel: str) -> mmap.mmap:
    """``path`` mapped read-only and shared, advised huge pages, then populated (``MADV_WILLNEED`` before 5.14)."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            raise BundleError(f"native_decode file '{rel}' is empty; re-export the bundle")
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    try:
        mm.madvise(_MADV_POPULATE_READ)
    except (OSError, ValueError):
        if hasattr(mmap, "MADV_WILLNEED"):
            mm.madvise(mmap.MADV_WILLNEED)                 # read ahead; pages fault in on first use
    return mm


def _pmd_bytes(mm: mmap.mmap) -> int | None:
    view = np.frombuffer(mm, dtype=np.uint8, count=1)
    addr = int(view.ctypes.data)
    del view
    return (_mapping_stats(addr) or {}).get("FilePmdMapped")


class _Tensors:
    """Views of the plan's tensor references, in place: each referenced file is mapped once, read-only and shared
    (``MAP_SHARED``, ``PROT_READ``), so the kernel streams the page cache's own pages and the process holds no
    second copy of the weights. The mappings stay as long as the decoder (``close`` drops them).

    The mapping is advised ``MADV_HUGEPAGE`` before its first touch and then populated (``MADV_POPULATE_READ``, else
    ``MADV_WILLNEED``): on a kernel whose file system caches large folios (ext4 / xfs on Linux >= 6.x) the weight
    stream then crosses a TLB entry every 2 MiB, as the anonymous huge-page copy of earlier versions did. Whether it
    got them is ``huge_page_bytes`` (``FilePmdMapped``). Tensors whose file offset is not a multiple of their
    element size (never the weight blobs: the kernel loads those unaligned) are copied, as are inline values."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.maps: dict[str, mmap.mmap] = {}
        self.keep: list[np.ndarray] = []
        self.copied_bytes = 0                              # bytes that could not be used in place (inline, misaligned)

    def close(self) -> None:
        """Drop every view, then unmap (the kernel's pointers are dangling afterwards)."""
        self.keep.clear()
        for mm in self.maps.values():
            try:
                mm.close()
            except BufferError:                            # a view escaped (held by a caller): unmapped when freed
                pass
        self.maps.clear()

    def _map(self, rel: str, path: Path) -> mmap.mmap:
        mm = self.maps.get(rel)
        if mm is None:
            mm = self.maps[rel] = _map_file(path, rel)
            # Pages cached in small folios (a file written moments ago, by the export) map as 4 KiB pages however the
            # mapping is advised. Where the file system demonstrably caches this file in huge folios (some of it is
            # PMD-mapped) but most is not, drop the file's unmapped cached pages and fault them in again: one re-read
            # from disk, after which the page cache holds 2 MiB folios (measured 286 -> 660 MiB of 690 PMD-mapped,
            # 26-29 -> 21-25 ms per 1.7B int4 step). File systems without large folios (0 PMD-mapped) never retry.
            got, size = _pmd_bytes(mm), len(mm)
            if got is not None and 0 < got < size // 2 and hasattr(os, "posix_fadvise"):
                mm.close()
                with open(path, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                mm = self.maps[rel] = _map_file(path, rel)
        return mm

    def mappings(self) -> list[dict[str, Any]]:
        """Each mapped file: its bundle path, address range and ``/proc/self/smaps`` residency (bytes)."""
        out = []
        for rel, mm in self.maps.items():
            view = np.frombuffer(mm, dtype=np.uint8, count=1)
            addr = int(view.ctypes.data)
            del view
            stats = _mapping_stats(addr) or {}
            out.append({"file": rel, "address": addr, "bytes": len(mm), "rss": stats.get("Rss"),
                        "huge_page_bytes": stats.get("FilePmdMapped")})
        return out

    def huge_page_bytes(self) -> int | None:
        """Bytes of the weight mappings backed by huge pages (``FilePmdMapped``; None if unknown)."""
        vals = [m["huge_page_bytes"] for m in self.mappings()]
        return None if not vals or any(v is None for v in vals) else sum(vals)

    def get(self, ref: Mapping[str, Any], dtype: str, shape: Sequence[int] | None = None) -> np.ndarray:
        name = ref.get("name", "?")
        if ref.get("dtype") != dtype:
            raise BundleError(f"native_decode tensor '{name}' is {ref.get('dtype')}, expected {dtype}; re-export")
        count = int(np.prod(ref["shape"], dtype=np.int64))
        if shape is not None and count != int(np.prod(shape, dtype=np.int64)):
            raise BundleError(f"native_decode tensor '{name}' has shape {ref['shape']}, expected {list(shape)}")
        if "inline" in ref:
            arr = np.ascontiguousarray(np.asarray(ref["inline"], dtype=dtype))
            if arr.size != count:
                raise BundleError(f"native_decode tensor '{name}' has {arr.size} inline values for {ref['shape']}")
            self.copied_bytes += arr.nbytes
        else:
            rel = str(ref["file"])
            path = (self.root / rel).resolve()
            if self.root.resolve() not in path.parents:
                raise BundleError(f"native_decode tensor '{name}' points outside the bundle ({rel})")
            size = path.stat().st_size if path.is_file() else -1
            off, length = int(ref["offset"]), int(ref["length"])
            if length != count * np.dtype(dtype).itemsize or off < 0 or off + length > size:
                raise BundleError(f"native_decode tensor '{name}' ({off}+{length} bytes) does not fit '{rel}' "
                                  f"({size} bytes) or its shape; re-export the bundle")
            mm = self._map(rel, path)
            if off % np.dtype(dtype).itemsize:             # a misaligned fp32 table: a small private copy
                arr = np.frombuffer(mm, dtype=np.uint8, count=length, offset=off).copy().view(dtype)
                self.copied_bytes += arr.nbytes
            else:
                arr = np.frombuffer(mm, dtype=dtype, count=count, offset=off)
        self.keep.append(arr)
        return arr


class NativeDecoder:
    """The native decode step over one bundle's weights. ``bind`` it to KV buffers before ``step``.

    ``kv_dtype="float16"`` (default) keeps an fp16 copy of the KV cache that attention reads: half the KV bytes per
    step (the fp32 buffers are still written, so ONNX Runtime's view of the cache stays whole). Call ``sync`` after
    ONNX Runtime wrote rows (the prefill). ``"float32"`` reads the ONNX Runtime buffers directly."""

    def __init__(self, root: str | Path, plan: Mapping[str, Any], kv_spec: Any, *, threads: int,
                 kv_dtype: str = "float16") -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        reason = plan_reason(plan, kv_spec)
        if reason:
            raise NativeUnavailable(reason)
        self.kv_dtype = kv_dtype
        kernel = load_kernel()
        self.lib = kernel.lib
        self.isa = kernel.isa                            # the code path: "avx512-vnni", "avx2" or "neon-dotprod"
        self.build = kernel.build                        # "prebuilt" or "compiled on demand"
        self.library = kernel.path
        self.lib.evlm_decode_step.argtypes = [ctypes.POINTER(_Model), _P, ctypes.c_int, _P]
        self.lib.evlm_decode_step.restype = ctypes.c_int
        self.lib.evlm_kv_sync.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, ctypes.c_int]
        self.lib.evlm_kv_sync.restype = None
        self.plan = plan
        self.closed = False
        self.threads = int(threads)
        t = self._tensors = _Tensors(Path(root))
        d, inter = int(plan["hidden"]), int(plan["intermediate"])
        self.hidden, self.vocab = d, int(plan["vocab"])
        self._layers = (_Layer * len(plan["layers"]))()
        for i, lp in enumerate(plan["layers"]):
            lyr = self._layers[i]
            lyr.ln1 = t.get(lp["input_norm"], "float32", [d]).ctypes.data
            lyr.ln2 = t.get(lp["post_attention_norm"], "float32", [d]).ctypes.data
            for field in ("qkv", "o", "gate_up", "up", "down"):
                if lp[field] is not None:
                    setattr(lyr, field, self._linear(lp[field]))
        half, max_pos = int(plan["rotary_half"]), int(plan["max_positions"])
        m = self._model = _Model()
        m.num_layers, m.hidden, m.num_heads = len(plan["layers"]), d, int(plan["num_heads"])
        m.kv_heads, m.head_dim, m.inter, m.vocab = int(plan["kv_heads"]), int(plan["head_dim"]), inter, self.vocab
        m.rot_half, m.threads, m.max_pos = half, self.threads, max_pos
        m.eps, m.scale = float(plan["epsilon"]), float(plan["scale"])
        m.cos_cache = t.get(plan["cos_cache"], "float32", [max_pos, half]).ctypes.data
        m.sin_cache = t.get(plan["sin_cache"], "float32", [max_pos, half]).ctypes.data
        m.ln_final = t.get(plan["final_norm"], "float32", [d]).ctypes.data
        m.head = self._linear(plan["lm_head"])
        m.layers = self._layers
        self.max_positions = max_pos
        lins = _linears(plan)
        max_k = max(-(-lin["K"] // lin["block_size"]) * lin["block_size"] for lin in lins)
        max_nb = max(-(-lin["K"] // lin["block_size"]) for lin in lins)
        h, hd, kvh, nt = m.num_heads, m.head_dim, m.kv_heads, self.threads
        # per thread: the residual stream, its norm and its quantization (see evlm_decode_step); the row
        # scheduler's runs take 128 bytes per thread plus 64 for alignment
        max_k = -(-max_k // 64) * 64
        max_nb = -(-max_nb // 16) * 16
        self._scratch = {"h": np.zeros(nt * d, np.float32), "xn": np.zeros(nt * d, np.float32),
                         "qkv": np.zeros((h + 2 * kvh) * hd, np.float32), "attn": np.zeros(h * hd, np.float32),
                         "y": np.zeros(d, np.float32), "gu": np.zeros(2 * inter, np.float32),
                         "act": np.zeros(inter, np.float32), "xq": np.zeros(nt * max_k, np.int8),
                         "xs": np.zeros(nt * max_nb, np.float32), "xc": np.zeros(nt * max_nb, np.float32),
                         "ranges": np.zeros(16 * nt + 8, np.uint64)}
        for name, arr in self._scratch.items():
            setattr(m, name, arr.ctypes.data)
        m.xq_stride, m.xs_stride = max_k, max_nb
        self.max_len = 0
        self._kv16: np.ndarray | None = None
        self._x = np.zeros(d, np.float32)
        self.weight_bytes = sum(a.nbytes for a in t.keep)
        self.copied_weight_bytes = t.copied_bytes          # private copies (inline / misaligned tables): KiB
        self.huge_page_bytes = t.huge_page_bytes()

    def close(self) -> None:
        """Unmap the weights and drop the fp16 KV copy (idempotent); ``step`` raises afterwards."""
        self.closed = True
        self.max_len = 0
        self._model.max_len = 0
        self._kv16 = None
        self._kv16_map = None
        self._tensors.close()

    def mappings(self) -> list[dict[str, Any]]:
        """The weight files this decoder maps (bundle path, address, bytes, resident and huge-page bytes)."""
        return self._tensors.mappings()

    def _linear(self, lp: Mapping[str, Any]) -> _Linear:
        n, k, blk, bits = int(lp["N"]), int(lp["K"]), int(lp["block_size"]), int(lp["bits"])
        nb = -(-k // blk)
        t = self._tensors
        lin = _Linear()
        lin.B = t.get(lp["weight"], "uint8", [n, nb, blk * bits // 8]).ctypes.data
        lin.scales = t.get(lp["scales"], "float32", [n, nb]).ctypes.data
        if lp.get("zero_points") is not None:
            zshape = [n, (nb + 1) // 2] if bits == 4 else [n, nb]
            lin.zp = t.get(lp["zero_points"], "uint8", zshape).ctypes.data
        lin.N, lin.K, lin.blk, lin.bits = n, k, blk, bits
        return lin

    def bind(self, kv_pointers: Sequence[int], max_len: int) -> None:
        """Point the layers at the KV buffers (``[past key 0, past value 0, ...]`` data pointers, each
        ``[1, kv_heads, max_len, head_dim]`` float32)."""
        if self.closed:
            raise RuntimeError("NativeDecoder.bind after close()")
        if len(kv_pointers) != 2 * len(self.plan["layers"]):
            raise ValueError(f"expected {2 * len(self.plan['layers'])} KV pointers, got {len(kv_pointers)}")
        m, nl = self._model, len(self.plan["layers"])
        self._kv16 = None
        if self.kv_dtype == "float16":
            # anonymous zero pages, not np.zeros: numpy advises huge pages for large arrays, and one written row
            # per head would then make 2 MiB resident; this way RSS grows with the context actually used
            shape = (nl, 2, m.kv_heads, int(max_len), m.head_dim)
            self._kv16_map = mmap.mmap(-1, int(np.prod(shape)) * 2, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._kv16 = np.frombuffer(self._kv16_map, np.float16).reshape(shape)
        for i in range(nl):
            lyr = self._layers[i]
            lyr.k_cache, lyr.v_cache = kv_pointers[2 * i], kv_pointers[2 * i + 1]
            lyr.k16 = self._kv16[i, 0].ctypes.data if self._kv16 is not None else None
            lyr.v16 = self._kv16[i, 1].ctypes.data if self._kv16 is not None else None
        self.max_len = int(max_len)
        self._model.max_len = self.max_len
        scores = np.zeros(self._model.num_heads * self.max_len, np.float32)
        self._scratch["scores"] = scores
        self._model.scores = scores.ctypes.data

    def sync(self, start: int, end: int) -> None:
        """Copy KV rows ``[start, end)`` that ONNX Runtime wrote (a prefill) into the fp16 cache."""
        if self._kv16 is not None and 0 <= start < end <= self.max_len:
            self.lib.evlm_kv_sync(ctypes.byref(self._model), int(start), int(end))

    def step(self, embedding: np.ndarray, pos: int, logits: np.ndarray) -> None:
        """Run one token (``embedding`` ``[hidden]``) at position ``pos`` (= tokens already cached); writes
        ``logits`` (float32, ``vocab`` contiguous values) and the token's K/V rows."""
        if not self.max_len:
            raise RuntimeError("NativeDecoder.step before bind() (or after close())")
        if logits.dtype != np.float32 or logits.size != self.vocab or not logits.flags.c_contiguous:
            raise ValueError("logits must be a contiguous float32 buffer of vocab values")
        x = embedding if (embedding.dtype == np.float32 and embedding.flags.c_contiguous) else self._x
        if x is self._x:
            np.copyto(self._x, embedding.reshape(-1), casting="unsafe")
        rc = self.lib.evlm_decode_step(ctypes.byref(self._model), x.ctypes.data, int(pos), logits.ctypes.data)
        if rc != 0:
            raise ValueError(f"position {pos} is outside the KV buffer ({self.max_len}) or the rotary table "
                             f"({self.max_positions})")
