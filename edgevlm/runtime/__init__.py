"""The device-side runtime: run a bundle with numpy + ONNX Runtime (+ PIL, tokenizers). Never imports torch,
transformers or onnx (``tests/test_torch_free.py`` checks it).

    >>> from edgevlm.runtime import Session
    >>> s = Session.from_bundle("out/tiny-bundle", threads=2)
    >>> r = s.generate("cat.jpg", "What is in the picture?", max_new_tokens=64)
    >>> print(r.text); print(r.timings.decode_tok_s, r.timings.ttft_ms)

Backends (``Session.from_bundle(path, backend=...)``, ``edgevlm run --backend``): ``"auto"`` (TensorRT engines built
for this GPU, else the native kernel where it runs, else ONNX Runtime), ``"ort"``, ``"native"``, ``"tensorrt"``;
every one is a ``Decoder`` (``decoders``) driven by the one loop in ``generation``.

Command line: ``edgevlm run BUNDLE --image IMG --prompt TEXT [--backend B] [--json-output] [--stream] [--threads N]``.

Modules: ``session`` (Session), ``decoders`` (the Decoder / VisionEncoder interface, OrtDecoder, NativeStepDecoder,
open_decoder), ``vision`` (OrtVisionEncoder, open_vision), ``generation`` (the generation loop, Result, Stream),
``bundle_io`` (verified bundle reads, manifest I/O tables), ``backends`` (ORT providers + session options +
optimized-graph cache), ``kv_cache`` (KV binding per manifest mode), ``sampling`` (numpy greedy / temperature /
top-k / top-p), ``timings`` (per-request record, Eq. 4 decomposition, peak RSS). Design notes and measurements:
docs/runtime.md.
"""

from edgevlm.runtime.backends import BackendOptions, physical_cores
from edgevlm.runtime.decoders import Decoder, NativeStepDecoder, OrtDecoder, VisionEncoder, open_decoder
from edgevlm.runtime.generation import Generation, generate_stream
from edgevlm.runtime.sampling import Sampler, SamplingParams, select_token
from edgevlm.runtime.session import Result, Session, Stream
from edgevlm.runtime.vision import OrtVisionEncoder, open_vision
from edgevlm.runtime.timings import RequestTimings, eq4_terms, format_eq4_table, peak_rss_bytes

__all__ = ["Decoder", "VisionEncoder", "OrtDecoder", "NativeStepDecoder", "open_decoder",
           "open_vision", "OrtVisionEncoder", "generate_stream", "Generation", "Session", "Result", "Stream",
           "BackendOptions", "SamplingParams", "Sampler", "select_token",
           "RequestTimings", "eq4_terms", "format_eq4_table", "peak_rss_bytes", "physical_cores"]
