"""ONNX graph knowledge shared by the export stage (``edgevlm.exporter``) and the quantization stage
(``edgevlm.quant``), which never import each other (``edgevlm.pipeline`` composes them):

- ``spec``: component I/O specs, dynamic dims, parity tolerances;
- ``files``: graph I/O, op histograms, external data files, the manifest entry of a graph;
- ``sessions``: ONNX Runtime sessions and the decoder interface on bare graph files;
- ``precision_islands``: the ops kept fp32 in fp16 graphs;
- ``native_plan``: the native decode kernel's plan of a quantized decoder graph;
- ``trt_compat`` / ``trt_plan``: TensorRT's rules for graphs and the engine build plan.

No torch anywhere in this package.
"""
