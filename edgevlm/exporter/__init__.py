"""Export to ONNX bundles: component specs, torch->ONNX, parity validation, TensorRT compatibility, build plans and engines."""
