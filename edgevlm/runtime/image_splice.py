"""Several images per request (``Session``'s helpers; numpy + PIL, never torch).

MobileVLM, like LLaVA, answers about several images by splicing each image's visual tokens at its own ``<image>``
placeholder: image k's embeddings ``[1, V, D]`` replace the k-th ``IMAGE_TOKEN_INDEX`` (-200) of the prompt ids, in
order. One image is the case of a list of one (the same embeddings, the same tokens as before).

* ``pixels_list(image, pixel_values, config, max_pixels)``: one image, or a list/tuple of them, or ``pixel_values``
  ``[3, S, S]`` / ``[N, 3, S, S]`` -> a list of ``[1, 3, S, S]`` float32 arrays, one per image.
* ``splice_images(ids, embeds, embed, hidden_size, dtype)``: the text embeddings with each image's embeddings at its
  placeholder.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from edgevlm.errors import ConfigError, PromptError
from edgevlm.preprocess import preprocess
from edgevlm.prompt import IMAGE_TOKEN_INDEX

__all__ = ["pixels_list", "splice_images", "as_embeds_list", "count_images"]


def count_images(image: Any, pixel_values: np.ndarray | None) -> int:
    """How many images a request carries (before any decoding): ``pixel_values``' N, else the list's length."""
    if pixel_values is not None:
        shape = np.shape(pixel_values)
        return int(shape[0]) if len(shape) == 4 else 1
    return len(image) if isinstance(image, (list, tuple)) else 1


def pixels_list(image: Any, pixel_values: np.ndarray | None, config: Any, max_pixels: int) -> list[np.ndarray]:
    """The preprocessed pixels of every image of a request, in order: ``[[1, 3, S, S], ...]``."""
    s = config.image_size
    if pixel_values is not None:
        pv = np.asarray(pixel_values, dtype=np.float32)
        pv = pv[None] if pv.ndim == 3 else pv
        if pv.ndim != 4 or pv.shape[1:] != (3, s, s) or pv.shape[0] < 1:
            raise ConfigError(f"pixel_values must be [3, {s}, {s}] or [N, 3, {s}, {s}] (N images), got {pv.shape}")
        return [pv[i:i + 1] for i in range(pv.shape[0])]
    if image is None:
        raise ConfigError("generate needs an image (or pixel_values)")
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ConfigError("generate needs at least one image (an empty list was given)")
    if any(im is None for im in images):
        raise ConfigError("an image of the list is None")
    return [preprocess(im, config, max_pixels)[None] for im in images]          # [1, 3, S, S] each


def as_embeds_list(image_embeds: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """``[1, V, D]`` (one image), ``[N, V, D]``, or a list of ``[1, V, D]`` / ``[V, D]`` -> a list of ``[V, D]``."""
    if isinstance(image_embeds, np.ndarray):
        return [image_embeds[i] for i in range(image_embeds.shape[0])] if image_embeds.ndim == 3 else [image_embeds]
    return [e[0] if e.ndim == 3 else e for e in (np.asarray(x) for x in image_embeds)]


def splice_images(ids: Sequence[int], image_embeds: np.ndarray | Sequence[np.ndarray],
                  embed: Callable[[Sequence[int]], np.ndarray], hidden_size: int, dtype: Any) -> np.ndarray:
    """Text embeddings (``embed(ids)``) with image k's embeddings in place of the k-th -200:
    ``[1, T - N + sum(V_k), D]``."""
    ids = list(ids)
    blocks = as_embeds_list(image_embeds)
    places = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    if len(places) != len(blocks):
        raise PromptError(f"the prompt has {len(places)} '<image>' placeholders but {len(blocks)} image(s) were "
                          f"given; put one '<image>' per image (spliced in order)")
    total = len(ids) - len(places) + sum(b.shape[0] for b in blocks)
    out = np.empty((1, total, hidden_size), dtype=dtype)
    src = dst = 0
    for p, block in zip(places + [len(ids)], blocks + [None]):
        if p > src:                                             # the text before this placeholder
            out[0, dst:dst + p - src] = embed(ids[src:p])
            dst += p - src
        if block is not None:
            out[0, dst:dst + block.shape[0]] = block
            dst += block.shape[0]
        src = p + 1
    return out
