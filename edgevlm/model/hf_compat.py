"""transformers names that changed within 5.x, resolved once against the installed version.

The KV cache keyword of the LLaMA forward was renamed ``past_key_values`` -> ``cache`` (the old name warns with a
FutureWarning and goes away in 5.40); model outputs carry it as ``.cache`` where the new name exists. Every call
site that passes or reads a cache goes through here, so users never see the deprecation and both old and new 5.x
releases work:

    out = llm(inputs_embeds=x, **with_cache(cache), use_cache=True)
    cache = cache_of(out)
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import LlamaModel

__all__ = ["CACHE_KW", "with_cache", "cache_of"]

#: The keyword the installed transformers' LLaMA forward takes for the KV cache.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def with_cache(cache: Any) -> dict[str, Any]:
    """``{CACHE_KW: cache}``, to splat into a forward call."""
    return {CACHE_KW: cache}


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache``, or ``output.past_key_values`` on older 5.x)."""
    return getattr(output, CACHE_KW)
