"""Image preprocessing with PIL + numpy (torch-free; the runtime and the PyTorch model share it).

MobileVLM's ``process_images`` with ``image_aspect_ratio == "pad"``: pad to a square canvas filled with the mean
colour (image centred), resize the shortest side to ``image_size`` (bicubic), centre-crop, rescale by 1/255 and
normalize with the CLIP mean/std. Output ``[3, S, S]`` float32 (``preprocess``) or ``[B, 3, S, S]`` (``preprocess_batch``).

    >>> from edgevlm.preprocess import PreprocessConfig, preprocess
    >>> pixel_values = preprocess("cat.jpg", PreprocessConfig(image_size=336))
"""

from __future__ import annotations

import io
import itertools
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgevlm.config import CLIP_MEAN, CLIP_STD
from edgevlm.errors import ImageError

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

#: Images with more pixels than this are refused before decoding (decompression bombs); override per call.
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    aspect_ratio: str = "pad"          # "pad" (MobileVLM inference/stage 2) or "square" (resize + crop only)
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pad_color"] = list(self.pad_color)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessConfig":
        return cls(image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   aspect_ratio=d.get("aspect_ratio", "pad"), resample=d.get("resample", "bicubic"),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)))


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def check_image_path(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it names an existing regular file; else ``ImageError`` saying what it is instead
    (missing, a directory, not a regular file) and what to pass. Cheap: run it before loading a model."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        example = next((c for c in itertools.islice(p.iterdir(), 1000)
                        if c.suffix.lower() in _IMAGE_SUFFIXES and c.is_file()), p / "photo.jpg")
        raise ImageError(f"image path '{p}' is a directory, not an image file; pass an image file, e.g. "
                         f"'{example}' (one image per request)")
    if p.exists():
        raise ImageError(f"image path '{p}' is not a regular file; pass an image file (PNG, JPEG, ...)")
    raise ImageError(f"image file '{p}' does not exist; check the path")


def load_image(image: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and validate an image; returns an RGB PIL image. Raises ``ImageError`` naming the problem (a path
    that is missing or a directory: ``check_image_path``)."""
    name = "image"
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.size == 0:
            raise ImageError(f"image array has shape {image.shape}; expected [H, W] or [H, W, 3] with H, W > 0")
        img = Image.fromarray(image.astype(np.uint8))
    else:
        if isinstance(image, (bytes, bytearray)):
            src: Any = io.BytesIO(image)
        else:
            name = str(image)
            check_image_path(image)
            src = name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(src)
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(f"{name} is {w}x{h} = {w * h / 1e6:.1f} MP, above the {max_pixels / 1e6:.0f} MP "
                                     f"limit (a decompression bomb or a needlessly huge image); resize it first or "
                                     f"raise max_pixels")
                img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name} was refused as a decompression bomb ({exc}); resize it first") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"{name} cannot be decoded as an image ({type(exc).__name__}: {exc}); "
                             f"is the file corrupt or not an image?") from exc
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"{name} is {w}x{h}: an image needs at least one pixel in each direction")
    if w * h > max_pixels:
        raise ImageError(f"{name} is {w}x{h}, above the {max_pixels / 1e6:.0f} MP limit; resize it first")
    return img.convert("RGB") if img.mode != "RGB" else img


def expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad to a square canvas with the image centred (MobileVLM ``expand2square``)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _resize_shortest(img: Image.Image, size: int, resample: str) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)          # transformers get_resize_output_image_size (default_to_square=False)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _RESAMPLE[resample])


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return arr[top:top + size, left:left + size]


def preprocess(image: ImageInput, cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image -> ``[3, S, S]`` float32 pixel values."""
    img = load_image(image, max_pixels=max_pixels)
    if cfg.aspect_ratio == "pad":
        img = expand2square(img, cfg.pad_color)
    img = _resize_shortest(img, cfg.image_size, cfg.resample)
    arr = _center_crop(np.asarray(img), cfg.image_size)             # [S, S, 3] uint8
    x = arr.astype(np.float32) * np.float32(cfg.rescale_factor)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))              # [3, S, S]


def preprocess_batch(images: Sequence[ImageInput], cfg: PreprocessConfig,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Several images -> ``[B, 3, S, S]`` float32."""
    return np.stack([preprocess(im, cfg, max_pixels) for im in images])
