"""Preprocessing (PIL + numpy) equals transformers' CLIP image processor with MobileVLM's pad-to-square."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgevlm.config import CLIP_MEAN, CLIP_STD
from edgevlm.errors import ImageError
from edgevlm.preprocess import PreprocessConfig, expand2square, load_image, preprocess, preprocess_batch


def _clip_processor(size):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


@pytest.mark.parametrize("wh", [(336, 336), (640, 480), (200, 500), (37, 1000), (1001, 3)])
@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_matches_clip_image_processor(wh, aspect):
    rng = np.random.default_rng(sum(wh))
    img = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    cfg = PreprocessConfig(image_size=336, aspect_ratio=aspect)
    ref_in = expand2square(img, (122, 116, 104)) if aspect == "pad" else img
    ref = _clip_processor(336)(images=ref_in, return_tensors="np")["pixel_values"][0]
    ours = preprocess(img, cfg)
    assert ours.shape == (3, 336, 336) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-5


def test_pad_colour_is_the_mean_colour():
    assert PreprocessConfig().pad_color == (122, 116, 104)
    img = Image.new("RGB", (10, 2), (255, 0, 0))
    sq = expand2square(img, (122, 116, 104))
    assert sq.size == (10, 10) and sq.getpixel((0, 0)) == (122, 116, 104) and sq.getpixel((5, 4)) == (255, 0, 0)


def test_grayscale_rgba_and_batch():
    cfg = PreprocessConfig(image_size=56)
    out = preprocess_batch([Image.new("L", (30, 40), 128), Image.new("RGBA", (64, 64), (1, 2, 3, 4))], cfg)
    assert out.shape == (2, 3, 56, 56)


def test_bad_images_raise_typed_errors(tmp_path):
    cfg = PreprocessConfig(image_size=56)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="cannot be decoded"):
        preprocess(bad, cfg)
    with pytest.raises(ImageError, match="does not exist"):
        preprocess(tmp_path / "missing.jpg", cfg)
    with pytest.raises(ImageError, match="0x0"):
        preprocess(Image.new("RGB", (0, 0)), cfg)
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="decompression bomb|MP limit"):
        load_image(buf.getvalue(), max_pixels=1_000_000)
