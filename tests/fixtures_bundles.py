"""Tiny fp32 bundles for the runtime tests, exported once per test process and shared by every test module.

``tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")`` returns ``(bundle_dir, model)``: the bundle exported with
``export_bundle(..., model=model, tokenizer_dir=...)`` from the in-memory random-init model, so a test has both the
PyTorch reference and the bundle. The tokenizer is trained (``edgevlm.train.tokenizer``) on a few rendered prompts.
The memo lives in this module (imported once per process), so several test files share one export per preset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_PRESETS = ("tiny-ldpnet", "tiny-ldpnetv2", "tiny-mlp2x_gelu")
QUESTION = "What color is the circle?"

_BUNDLES: dict[str, tuple[Path, object]] = {}
_ROOT: list[Path] = []


def _root(tmp_path_factory) -> Path:
    if not _ROOT:
        _ROOT.append(tmp_path_factory.mktemp("runtime_bundles"))
    return _ROOT[0]


def tokenizer_dir(tmp_path_factory) -> Path:
    """A small BPE (<= 384 tokens, LLaMA special ids) trained on a few rendered Vicuna prompts."""
    out = _root(tmp_path_factory) / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from edgevlm.prompt import build_conversation
    from edgevlm.train.tokenizer import save_tokenizer, train_tokenizer

    turns = [("<image>\nWhat color is the circle?", "red"), ("How many squares are there?", "3"),
             ("Where is the star?", "top left"), ("What shape is it?", "a small blue triangle")]
    texts = []
    for q, a in turns:
        text, _ = build_conversation([(q, a)])
        texts += [c.replace("</s>", "") for c in text.split("<image>") if c]
    tok = train_tokenizer(texts * 4, vocab_size=320, min_frequency=1)
    return save_tokenizer(tok, out)


def tiny_bundle(tmp_path_factory, name: str = "tiny-ldpnetv2", decoder_graph: str = "auto"):
    """``(bundle_dir, model)`` for a tiny preset (random init, seed 0), exported once per process and decoder graph
    (``auto``: the GroupQueryAttention graph where onnxruntime-genai is installed; ``portable``: Optimum concat)."""
    key = name if decoder_graph == "auto" else f"{name}@{decoder_graph}"
    if key not in _BUNDLES:
        from edgevlm.config import get_model_config
        from edgevlm.model.vlm import build_model
        from edgevlm.pipeline import export_bundle

        model = build_model(get_model_config(name), seed=0).eval()
        out = export_bundle(name, _root(tmp_path_factory) / key, model=model, random_init=True,
                            tokenizer_dir=tokenizer_dir(tmp_path_factory), parity=False, seed=0,
                            decoder_graph=decoder_graph)
        _BUNDLES[key] = (Path(out), model)
    return _BUNDLES[key]


def make_image(seed: int = 0, size: tuple[int, int] = (40, 60)) -> np.ndarray:
    """A non-square random RGB image (uint8 ``[H, W, 3]``): exercises the pad-to-square path."""
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def write_png(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    Image.fromarray(make_image(seed)).save(path)
    return path
