"""Shared fixtures: tiny configs, small threads so the suite stays fast on 2 cores, GPU/TensorRT skips."""

from __future__ import annotations

import os

import pytest

import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep the runtime's hash stamps / graph caches out of the user's ~/.cache during tests.
os.environ.setdefault("EDGEVLM_CACHE", tempfile.mkdtemp(prefix="edgevlm-test-cache-"))


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:  # the device-side install has no torch; torch tests import it themselves
        pass


def pytest_collection_modifyitems(config, items):
    has_gpu = False
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not (has_trt and has_gpu):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a GPU"))
