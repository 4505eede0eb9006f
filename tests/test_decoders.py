"""The decoder interface (``edgevlm.runtime.decoders``): every backend gives the logits of a plain, cache-free run.

On the concat (Optimum) and the shared-buffer (GroupQueryAttention) graph of a tiny bundle, ``OrtDecoder``'s
prefill + steps equal one prefill over the whole sequence; ``kv_arrays`` has the cache's shape; a full cache and a
too-long prompt raise ``PromptError``; the protocols are satisfied; ``open_decoder`` picks backends as documented.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_bundles import tiny_bundle

pytest.importorskip("onnxruntime")

from edgevlm.bundle import load_embedding_table, read_bundle  # noqa: E402
from edgevlm.errors import ConfigError, PromptError  # noqa: E402
from edgevlm.runtime.backends import BackendOptions  # noqa: E402
from edgevlm.runtime.decoders import Decoder, OrtDecoder, open_decoder  # noqa: E402

GRAPHS = ("portable", "gqa")


def _graph_or_skip(graph: str) -> None:
    if graph == "gqa":
        pytest.importorskip("onnxruntime_genai")


def _bundle(tmp_path_factory, graph: str):
    _graph_or_skip(graph)
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph=graph)
    return read_bundle(path, verify_hashes=False)


@pytest.mark.parametrize("graph", GRAPHS)
def test_ort_decoder_steps_equal_one_prefill(tmp_path_factory, graph):
    b = _bundle(tmp_path_factory, graph)
    table = load_embedding_table(b)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 9, table.shape[1])).astype(np.float32) * 0.1   # [1, T, D]
    toks = [5, 17, 42]
    with OrtDecoder(b, BackendOptions(threads=1)) as dec:
        assert isinstance(dec, Decoder) and dec.backend == "onnxruntime-cpu"
        assert dec.hidden_size == table.shape[1] and dec.max_prompt == dec.max_context
        stepped = [np.array(dec.prefill(embeds))]
        assert dec.length == 9 and stepped[0].shape == (dec.vocab_size,) and stepped[0].dtype == np.float32
        for t in toks:
            stepped.append(np.array(dec.step(table[t])))
        assert dec.length == 12
        kv = dec.kv_arrays()
        assert len(kv) == 2 * dec.spec.num_layers and kv[0].shape == tuple(dec.spec.shape(12))
        full = np.concatenate([embeds[0], table[toks]])                                # [T + 3, D]
        for n, want in zip((9, 10, 11, 12), stepped):
            got = dec.prefill(full[:n])                                                 # a fresh sequence each time
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        # the KV rows of a fresh prefill equal the stepped cache's
        for a, c in zip(kv, dec.kv_arrays()):
            np.testing.assert_allclose(a, c, atol=1e-4, rtol=0)
        info = dec.info()
        assert info["backend"] == "onnxruntime-cpu" and info["kv_mode"] == dec.spec.mode
        assert info["kv_device"] == "cpu" and info["max_context"] == dec.max_context and info["kv_bytes"] > 0


def test_ort_decoder_limits(tmp_path_factory):
    b = _bundle(tmp_path_factory, "portable")
    table = load_embedding_table(b)
    dec = OrtDecoder(b, BackendOptions(threads=1), max_context=6)
    assert dec.max_context == 6
    with pytest.raises(PromptError, match="does not fit"):
        dec.prefill(np.zeros((7, table.shape[1]), np.float32))
    dec.prefill(np.zeros((5, table.shape[1]), np.float16))                 # any float dtype
    dec.step(table[1])
    with pytest.raises(PromptError, match="full"):
        dec.step(table[2])
    with pytest.raises(ConfigError, match="batch 1"):
        dec.prefill(np.zeros((2, 3, table.shape[1]), np.float32))
    dec.close()
    dec.close()                                                             # idempotent


def test_open_decoder_backends(tmp_path_factory):
    b = _bundle(tmp_path_factory, "portable")
    dec = open_decoder(b, "ort", BackendOptions(threads=1))
    assert isinstance(dec, OrtDecoder) and dec.native_info["reason"] == "backend='ort'"
    dec.close()
    # auto on a bundle without a native plan: ORT, and the reason says so
    dec = open_decoder(b, "auto", BackendOptions(threads=1))
    assert isinstance(dec, OrtDecoder) and "native_decode" in dec.native_info["reason"]
    dec.close()
    from edgevlm.runtime.native import NativeUnavailable

    with pytest.raises(NativeUnavailable, match="backend='native' but"):
        open_decoder(b, "native", BackendOptions(threads=1))
    with pytest.raises(ConfigError, match="backend must be one of"):
        open_decoder(b, "fast")


# ---- every backend gives the same greedy tokens: Session and `edgevlm run` -------------------------------------
N_NEW = 10


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    """The tiny random-init bundle for a TensorRT target (fp32, Optimum decoder)."""
    pytest.importorskip("torch")
    from edgevlm.pipeline import export_bundle

    out = tmp_path_factory.mktemp("decoders_trt") / "tiny-orin"
    return export_bundle("tiny-ldpnetv2", out, random_init=True, target="jetson-orin-nano-8gb", precision="fp32",
                         parity=False)


def _run_cli(capsys, *args: str) -> tuple[int, dict | str]:
    import json

    from edgevlm.cli import main

    rc = main(["run", *args, "--no-cache", "--threads", "1", "--max-new-tokens", str(N_NEW)])
    out, err = capsys.readouterr()
    if rc != 0:
        return rc, err
    return rc, json.loads(out.strip().splitlines()[-1]) if "--json-output" in args else out


def test_greedy_tokens_are_the_same_on_ort_and_tensorrt_engines(trt_bundle, monkeypatch, tmp_path, capsys):
    """ORT and the TensorRT runners (fake engines that run the bundle's ONNX graphs) through ``Session`` and
    ``edgevlm run``: same tokens; auto picks the engines when they belong to this device; everything is freed."""
    import sys

    from tests.fake_tensorrt import install_fake_tensorrt
    from fixtures_bundles import QUESTION, make_image, write_png

    from edgevlm.runtime import Session

    img = make_image(3)
    ort = Session.from_bundle(trt_bundle, backend="ort", threads=1, hash_stamps=None)
    want = ort.generate(img, QUESTION, max_new_tokens=N_NEW, ignore_eos=True)
    assert (ort.vision_backend, ort.decoder_backend, ort.decode_backend) == ("onnxruntime-cpu",) * 2 + ("onnxruntime",)
    assert want.timings.decoder_backend == "onnxruntime-cpu" and want.timings.to_dict()["vision_backend"]

    root = install_fake_tensorrt(monkeypatch, trt_bundle)
    cudart = sys.modules["tensorrt"].cudart
    for backend in ("tensorrt", "auto"):
        with Session.from_bundle(root, backend=backend, threads=1, hash_stamps=None) as s:
            assert (s.vision_backend, s.decoder_backend, s.decode_backend) == ("tensorrt",) * 3
            got = s.generate(img, QUESTION, max_new_tokens=N_NEW, ignore_eos=True)
            assert got.tokens == want.tokens, backend
            assert (got.timings.vision_backend, got.timings.decoder_backend) == ("tensorrt", "tensorrt")
            np.testing.assert_allclose(s.last_logits, ort.last_logits, rtol=1e-4, atol=1e-4)
            # streaming and a second request on the same device buffers
            assert "".join(s.stream(img, QUESTION, max_new_tokens=N_NEW, ignore_eos=True)) == want.text
        assert cudart.mem == {} and cudart.streams == 0, backend             # Session.close freed everything
    # the older switch still forces ONNX Runtime even where engines are usable
    s = Session.from_bundle(root, native_decode="off", threads=1, hash_stamps=None)
    assert s.decoder_backend == "onnxruntime-cpu" and s.vision_backend == "onnxruntime-cpu"
    s.close()

    png = str(write_png(tmp_path / "img.png", 3))
    outs = {}
    for backend in ("ort", "tensorrt", "auto"):
        rc, out = _run_cli(capsys, str(root), "--image", png, "--prompt", QUESTION, "--json-output",
                           "--backend", backend)
        assert rc == 0, out
        outs[backend] = out
    assert outs["ort"]["backends"] == {"vision": "onnxruntime-cpu", "decoder": "onnxruntime-cpu"}
    assert outs["tensorrt"]["backends"] == outs["auto"]["backends"] == {"vision": "tensorrt", "decoder": "tensorrt"}
    assert outs["tensorrt"]["timings"]["decoder_backend"] == "tensorrt"
    assert outs["ort"]["tokens"] == outs["tensorrt"]["tokens"] == outs["auto"]["tokens"]
    rc, text = _run_cli(capsys, str(root), "--image", png, "--prompt", QUESTION, "--backend", "tensorrt")
    assert rc == 0 and "tokens] vision: tensorrt, decoder: tensorrt" in text


def test_engines_of_another_gpu_auto_falls_back_tensorrt_refuses(trt_bundle, monkeypatch):
    from tests.fake_tensorrt import install_fake_tensorrt
    from fixtures_bundles import QUESTION, make_image

    from edgevlm.errors import RuntimeBackendError
    from edgevlm.runtime import Session

    root = install_fake_tensorrt(monkeypatch, trt_bundle, device_compute_capability="8.9",
                                 device_name_here="RTX 4090")
    s = Session.from_bundle(root, threads=1, hash_stamps=None)                 # auto: not these engines
    assert s.decoder_backend == "onnxruntime-cpu"
    assert s.generate(make_image(1), QUESTION, max_new_tokens=2).tokens
    with pytest.raises(RuntimeBackendError, match="build-engine"):
        Session.from_bundle(root, backend="tensorrt", threads=1, hash_stamps=None)


def test_backend_tensorrt_without_tensorrt_is_exit_2_naming_it(tmp_path_factory, monkeypatch, tmp_path, capsys):
    import sys

    from fixtures_bundles import QUESTION, write_png

    from edgevlm.errors import MissingDependency
    from edgevlm.runtime import Session

    monkeypatch.setitem(sys.modules, "tensorrt", None)                         # `import tensorrt` fails
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph="portable")
    with pytest.raises(MissingDependency, match="'tensorrt'"):
        Session.from_bundle(path, backend="tensorrt", threads=1, hash_stamps=None)
    png = str(write_png(tmp_path / "img.png"))
    rc, err = _run_cli(capsys, str(path), "--image", png, "--prompt", QUESTION, "--backend", "tensorrt")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "tensorrt" in err and err.startswith("error:")
    # auto on the same machine: ONNX Runtime, no error
    s = Session.from_bundle(path, threads=1, hash_stamps=None)
    assert s.decoder_backend == "onnxruntime-cpu"


def test_native_and_ort_give_the_same_tokens_through_the_cli(tmp_path_factory, tmp_path, capsys):
    """The int4 CPU bundle: ``--backend native`` (where this CPU runs the kernel) and ``--backend ort`` agree."""
    from fixtures_bundles import QUESTION, write_png

    from edgevlm.runtime.native import availability

    if availability() is not None:
        pytest.skip(f"native kernel unavailable here ({availability()})")
    from test_native import _quantized

    path = _quantized(tmp_path_factory, "int4")
    png = str(write_png(tmp_path / "img.png", 4))
    outs = {}
    for backend in ("ort", "native", "auto"):
        rc, out = _run_cli(capsys, str(path), "--image", png, "--prompt", QUESTION, "--json-output",
                           "--backend", backend)
        assert rc == 0, out
        outs[backend] = out
    assert outs["native"]["backends"]["decoder"] == outs["auto"]["backends"]["decoder"] == "native"
    assert outs["ort"]["backends"]["decoder"] == "onnxruntime-cpu"
    assert outs["native"]["timings"]["decode_backend"] == "native"
    assert outs["ort"]["tokens"] == outs["native"]["tokens"] == outs["auto"]["tokens"]


# ---- the loop knows nothing of backends ---------------------------------------------------------------------------
class _Scripted:
    """A Decoder that plays back fixed logits (one-hot on a scripted token per call)."""

    backend, hidden_size, vocab_size, max_context, max_prompt = "scripted", 4, 8, 12, 12

    def __init__(self, tokens):
        self.tokens, self.calls, self._n = list(tokens), 0, 0

    @property
    def length(self):
        return self._n

    def _logits(self):
        out = np.zeros(self.vocab_size, np.float32)
        out[self.tokens[min(self.calls, len(self.tokens) - 1)]] = 1.0
        self.calls += 1
        return out

    def prefill(self, embeds, positions=None):
        self._n = np.asarray(embeds).reshape(-1, self.hidden_size).shape[0]
        return self._logits()

    def step(self, embed, position=None):
        assert np.asarray(embed).shape == (self.hidden_size,)
        self._n += 1
        return self._logits()


class _Chars:
    """Token i decodes to the i-th character of ALPHABET; 0 is the EOS (skipped)."""

    ALPHABET = "\0ab<>/s!"

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.ALPHABET[i] for i in ids if i)


def _loop(tokens, **kw):
    from edgevlm.runtime.generation import generate_stream
    from edgevlm.runtime.sampling import SamplingParams

    gen = generate_stream(_Scripted(tokens), np.zeros((1, 3, 4), np.float32),
                          embed_table=np.eye(8, 4, dtype=np.float32), tokenizer=_Chars(),
                          sampling=SamplingParams(), **{"max_new_tokens": 20, **kw})
    deltas = []
    while True:
        try:
            deltas.append(next(gen))
        except StopIteration as done:
            return deltas, done.value


def test_generation_loop_stops_and_streams_the_same_on_any_decoder():
    # a stop string split over tokens is held back, never half-emitted, and cut from the text
    deltas, g = _loop([1, 2, 3, 5, 6, 4, 1, 1], stop_strings=["</s>"], eos_id=0)
    assert g.finish_reason == "stop_string" and g.text == "ab" and "".join(deltas) == "ab"
    assert all("<" not in d for d in deltas) and g.tokens == [1, 2, 3, 5, 6, 4]
    # EOS ends (and is counted), max_new_tokens ends, ignore_eos runs to the limit
    deltas, g = _loop([1, 2, 0, 1], eos_id=0)
    assert (g.finish_reason, g.tokens, g.text, len(g.step_ms)) == ("eos", [1, 2, 0], "ab", 2)
    _, g = _loop([1, 2, 0, 1], eos_id=0, max_new_tokens=2)
    assert (g.finish_reason, g.tokens) == ("max_new_tokens", [1, 2])
    _, g = _loop([1, 0, 0, 0], eos_id=0, ignore_eos=True, stop_strings=["b"], max_new_tokens=5)
    assert (g.finish_reason, len(g.tokens)) == ("max_new_tokens", 5)
    # the context fills up: prompt 3 + 9 steps = 12 = max_context
    _, g = _loop([1], max_new_tokens=100)
    assert g.finish_reason == "context_full" and len(g.tokens) == 10 and len(g.step_ms) == 9


def test_native_step_decoder_is_a_decoder_and_closes_the_kernel(tmp_path_factory):
    from edgevlm.runtime.decoders import NativeStepDecoder
    from edgevlm.runtime.native import availability

    if availability() is not None:
        pytest.skip(f"native kernel unavailable here ({availability()})")
    from test_native import _quantized

    b = read_bundle(_quantized(tmp_path_factory, "int4"), verify_hashes=False)
    table = load_embedding_table(b)
    opts = BackendOptions(threads=1)
    with open_decoder(b, "native", opts) as nat, open_decoder(b, "ort", opts) as o:
        assert isinstance(nat, NativeStepDecoder) and isinstance(nat, Decoder) and nat.backend == "native"
        assert nat.info()["native"]["backend"] == "native" and nat.info()["kv_mode"] == "shared_buffer"
        x = np.asarray(table[[1, 5, 9, 17]])
        a, c = [int(np.argmax(nat.prefill(x)))], [int(np.argmax(o.prefill(x)))]
        for _ in range(6):
            a.append(int(np.argmax(nat.step(table[a[-1]]))))
            c.append(int(np.argmax(o.step(table[c[-1]]))))
        assert a == c and nat.length == o.length == 10
        assert nat.kv_arrays()[0].shape == o.kv_arrays()[0].shape
        kernel = nat.native
    assert nat.native is None and getattr(kernel, "closed", True)
