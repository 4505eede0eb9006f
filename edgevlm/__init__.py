"""edgevlm: compact vision-language models from a brief training run to quantized ONNX / TensorRT bundles.

Torch-free at import. Heavy parts live in sub-packages: ``edgevlm.model`` / ``edgevlm.train`` /
``edgevlm.exporter`` (torch, transformers) and ``edgevlm.runtime`` (numpy + onnxruntime, the device side).
"""

__version__ = "0.1.0"
