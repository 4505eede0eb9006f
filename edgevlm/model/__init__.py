"""MobileVLM in PyTorch (needs the ``export`` extra: torch + transformers).

``MobileVLM`` (vlm.py), projectors (projectors.py), the CLIP tower (vision.py), checkpoint I/O (checkpoint.py).
"""

from edgevlm.model.checkpoint import load_checkpoint, save_checkpoint
from edgevlm.model.vlm import MobileVLM, SamplingConfig, build_model, count_parameters_meta

__all__ = ["MobileVLM", "SamplingConfig", "build_model", "count_parameters_meta", "load_checkpoint",
           "save_checkpoint"]
