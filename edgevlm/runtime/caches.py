"""The Session's two request caches: image embeddings by content, and the KV cache's prompt prefix.

* ``ImageEmbeddingCache``: ``image_key(pixel_values)`` (sha256 of the preprocessed ``[1, 3, S, S]`` float32 pixels,
  their shape and dtype) -> the vision encoder's output ``[1, V, D]``; least recently used entries are evicted once
  the stored arrays exceed ``max_bytes``. A hit skips the vision encode. Hashing the *preprocessed* pixels makes the
  key independent of how the image arrived (path, bytes, PIL image, array, a re-encoded PNG of the same pixels) and
  of the preprocessing being changed under a bundle (it is part of the pixels).
* Prompt-prefix KV reuse: every token in the decoder's KV cache has an identity, ``spliced_identity(ids, key, V)``:
  the text token id, or ``(image key, j)`` for the j-th visual token of an image. The Session remembers the identity
  of what its decoder holds after a request (prompt + the generated tokens fed back), and the next request keeps the
  longest common prefix (``common_prefix``) of the cache (``Decoder.rewind``) and prefills only the rest
  (``Decoder.extend``): at least the template's system prompt before the image; the image too when the same image
  comes back; the whole previous exchange in a multi-turn chat whose history is re-sent.

A decoder that cannot run a prefill after a cached past (a TensorRT engine whose prefill profile has past = 0) raises
``KVReuseUnsupported`` from ``rewind`` / ``extend``; the Session then prefills the whole prompt.

numpy + stdlib only; never torch.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Hashable, Sequence

import numpy as np

from edgevlm.errors import RuntimeBackendError

__all__ = ["RequestCaches", "ImageEmbeddingCache", "image_key", "spliced_identity", "common_prefix", "KVReuseUnsupported",
           "DEFAULT_IMAGE_CACHE_MIB"]

#: ``Session.from_bundle(image_cache_mib=...)`` default; ``edgevlm serve --image-cache-mib``.
DEFAULT_IMAGE_CACHE_MIB = 256.0


class KVReuseUnsupported(RuntimeBackendError):
    """This decoder cannot keep part of its KV cache and prefill after it (``rewind`` / ``extend``); prefill the whole
    prompt instead (the Session does so by itself)."""


def image_key(pixel_values: np.ndarray) -> str:
    """Content hash of a preprocessed image: sha256 over dtype, shape and the pixel bytes (hex digest)."""
    a = np.ascontiguousarray(pixel_values)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class ImageEmbeddingCache:
    """LRU map image key -> image embeddings ``[1, V, D]``, bounded by the bytes of the stored arrays.

    Stored arrays are read-only copies (a caller cannot change a cached entry). ``max_bytes <= 0`` stores nothing.
    Thread-safe (one lock), though a Session serializes its requests anyway.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @classmethod
    def from_mib(cls, mib: float) -> "ImageEmbeddingCache":
        return cls(int(float(mib) * 2**20))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> np.ndarray | None:
        """The cached embeddings (read-only) or None; counts a hit or a miss."""
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key: str, embeds: np.ndarray) -> None:
        """Store a copy of ``embeds`` (evicting the least recently used entries to stay within ``max_bytes``); an
        array larger than the whole budget is not stored."""
        arr = np.array(embeds, copy=True)
        if arr.nbytes > self.max_bytes:
            return
        arr.flags.writeable = False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            while self._items and self.bytes + arr.nbytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= dropped.nbytes
                self.evictions += 1
            self._items[key] = arr
            self.bytes += arr.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions}


def spliced_identity(ids: Sequence[int], image: str | None | Sequence[str | None], visual_tokens: int,
                     image_token_index: int = -200) -> list[Hashable]:
    """One identity per position of the spliced prompt: the text token ids, with ``(image, j)`` for ``j`` in
    ``range(visual_tokens)`` in place of each image placeholder ``image_token_index``. ``image``: one key for every
    placeholder, or a list with one key per placeholder, in order (several images per prompt). A key ``None``
    (unknown content) gives positions that equal nothing, not even themselves in another request."""
    keys = list(image) if isinstance(image, (list, tuple)) else None
    out: list[Hashable] = []
    k = 0
    for t in ids:
        if t == image_token_index:
            key = image if keys is None else (keys[k] if k < len(keys) else None)
            k += 1
            tag: Hashable = key if key is not None else object()
            out.extend((tag, j) for j in range(visual_tokens))
        else:
            out.append(int(t))
    return out


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common prefix of two identity lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class RequestCaches:
    """A Session's caches and their bookkeeping: the image-embedding LRU, whether prefix reuse is on, the identity of
    what the decoder's KV cache holds, and counters. ``Session`` calls ``embeddings`` (vision, with the cache),
    ``plan_reuse`` (before the prefill) and ``remember`` / ``count`` (after it). The Session's lock serializes use."""

    def __init__(self, image_cache_mib: float = 0.0, prefix: bool = False) -> None:
        self.image = ImageEmbeddingCache(0)
        self.prefix = False
        self.kv_ident: list[Any] | None = None        # identity of each token in the decoder's KV cache
        self.prefix_stats = {"requests": 0, "reused": 0, "cached_tokens": 0, "prompt_tokens": 0}
        self.configure(image_cache_mib=image_cache_mib, prefix=prefix)

    def configure(self, *, image_cache_mib: float | None = None, prefix: bool | None = None) -> None:
        """``None``: leave as is. Resizing drops the image entries (counters stay); turning prefix reuse off forgets
        the KV identity."""
        from edgevlm.errors import ConfigError

        if image_cache_mib is not None:
            if float(image_cache_mib) < 0:
                raise ConfigError(f"image_cache_mib must be >= 0 (0 = off), got {image_cache_mib}")
            old = self.image
            self.image = ImageEmbeddingCache.from_mib(image_cache_mib)
            self.image.hits, self.image.misses, self.image.evictions = old.hits, old.misses, old.evictions
        if prefix is not None:
            self.prefix = bool(prefix)
            if not self.prefix:
                self.kv_ident = None

    def clear(self) -> None:
        self.image.clear()
        self.kv_ident = None

    def stats(self) -> dict[str, Any]:
        return {"image": self.image.stats(), "prefix": {"enabled": self.prefix, **self.prefix_stats}}

    def embeddings(self, pixel_values: np.ndarray, encode: Any) -> tuple[np.ndarray, str | None, bool]:
        """``(image embeddings [1, V, D], image key or None, cache hit)``; ``encode(pixel_values)`` on a miss."""
        key = image_key(pixel_values) if (self.image.enabled or self.prefix) else None
        cached = self.image.get(key) if (key and self.image.enabled) else None
        if cached is not None:
            return cached, key, True
        embeds = encode(pixel_values)
        if key and self.image.enabled:
            self.image.put(key, embeds)
        return embeds, key, False

    def plan_reuse(self, ids: Sequence[int], key: str | None | Sequence[str | None], visual_tokens: int,
                   image_token: int, decoder: Any) -> tuple[list[Any] | None, int]:
        """``(identity of the new spliced prompt or None, KV rows to keep)``; ``key``: the image key, or one per
        placeholder in order (``spliced_identity``). Resets ``decoder`` when none are kept
        (so a prefill that fails before running leaves it empty). The remembered identity is dropped until
        ``remember`` (an error leaves it unknown)."""
        ident = spliced_identity(ids, key, visual_tokens, image_token) if self.prefix else None
        reuse = 0
        if ident is not None and self.kv_ident is not None:
            reuse = min(common_prefix(self.kv_ident, ident), len(ident) - 1, int(decoder.length))
        self.kv_ident = None
        if ident is not None and reuse == 0:
            decoder.reset()
        return ident, reuse

    def remember(self, ident: list[Any] | None, fed: Sequence[int], decoder_length: int) -> None:
        """After the loop (also when the consumer closed the stream early): what the decoder holds now."""
        if ident is not None and len(ident) + len(fed) == int(decoder_length):
            self.kv_ident = ident + list(fed)

    def count(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prefix_stats["requests"] += 1
        self.prefix_stats["prompt_tokens"] += int(prompt_tokens)
        if cached_tokens:
            self.prefix_stats["reused"] += 1
            self.prefix_stats["cached_tokens"] += int(cached_tokens)
