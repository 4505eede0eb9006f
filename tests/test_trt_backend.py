"""The TensorRT runtime backend without TensorRT: KV ping-pong bookkeeping, profile selection, I/O-table parsing,
the decoder / vision runners (the ``Decoder`` / ``VisionEncoder`` interfaces) against hand-made fake engines and a
fake ``cudart`` whose "device memory" is host memory (so every copy and every engine read/write really happens), a
tiny exported bundle through ``TrtBackend`` with ``tests/fake_tensorrt.py`` (engines that run the bundle's ONNX
graphs with ONNX Runtime: greedy tokens identical to ONNX Runtime), engines of another GPU / TensorRT
(``EngineMismatchError``), and the clear errors without tensorrt / cuda-python. The real-engine test is marked
``tensorrt`` (skipped without TensorRT and a GPU)."""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest

from edgevlm.errors import BundleError, MissingDependency, PromptError, RuntimeBackendError
from edgevlm.runtime import trt_backend as tb
from edgevlm.runtime.kv_cache import KVSpec
from tests.fake_tensorrt import FakeCudart, install_fake_tensorrt

H, HD, D, VOCAB, L = 2, 4, 8, 5, 2          # kv heads, head dim, hidden, vocab, layers
CTX, PROMPT = 12, 6                          # context (KV capacity) and longest prefill
S, V = 4, 3                                  # vision: image size, visual tokens

KV = KVSpec.from_manifest({"num_layers": L, "num_kv_heads": H, "head_dim": D // H, "dtype": "float32",
                           "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
                           "present_key": "present.{i}.key", "present_value": "present.{i}.value"})


# ---- fakes --------------------------------------------------------------------------------------------------------
class _E:
    """A TensorRT-like enum value (``.name``)."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Enum.{self.name}"


INPUT, OUTPUT = _E("INPUT"), _E("OUTPUT")
FLOAT, INT64, BF16 = _E("FLOAT"), _E("INT64"), _E("BF16")


def _view(addr, shape, dtype):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer((ctypes.c_char * n).from_address(addr), dtype=dtype).reshape(shape)


def toy_kv(embeds, positions, j):
    """New K/V of tensor j for tokens ``embeds [T, D]`` at ``positions [T]``: ``[H, T, HD]``."""
    x = embeds * (j + 1) + positions[:, None] * 0.1
    return x.reshape(len(embeds), H, HD).transpose(1, 0, 2)


def toy_logits(presents, last_embed):
    """Logits from the whole cache (time-weighted, so order and content matter) and the last embedding."""
    total = presents[0].shape[1]
    w = (np.arange(total, dtype=np.float64) + 1)[None, :, None]
    s = sum(float((p * w).sum()) * (j + 1) for j, p in enumerate(presents))
    return (np.arange(1, VOCAB + 1) * s * 1e-3 + last_embed[:VOCAB]).astype(np.float32)


def reference_logits(embeds, positions):
    """What a decoder that sees all tokens at once returns (the ping-pong runner must match it every step)."""
    presents = [toy_kv(embeds, positions, j) for j in range(2 * L)]
    return toy_logits(presents, embeds[-1])


class FakeContext:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addr = engine, 0, {}, {}
        self.profile_calls, self.executions = [], []

    def set_optimization_profile_async(self, index, stream):
        assert isinstance(stream, int)
        self.profile, self.shapes = index, {}
        self.profile_calls.append(index)
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False                                  # like TensorRT: outside the active profile
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def get_tensor_shape(self, name):
        return self.engine.output_shape(name, self.shapes) if name in self.engine.outputs else self.shapes[name]

    def execute_async_v3(self, stream):
        assert isinstance(stream, int)
        self.executions.append((self.profile, dict(self.shapes), dict(self.addr)))
        self.engine.compute(self)
        return True


class FakeDecoderEngine:
    """The Optimum decoder contract: present = concat(past, new); logits of the last position [1, 1, vocab]."""

    def __init__(self, kv_dtype=FLOAT):
        self.pasts, self.presents = KV.past_names(), KV.present_names()
        self.io = ([("inputs_embeds", INPUT, FLOAT, (-1, -1, D)), ("attention_mask", INPUT, INT64, (-1, -1)),
                    ("position_ids", INPUT, INT64, (-1, -1))]
                   + [(n, INPUT, kv_dtype, (-1, H, -1, HD)) for n in self.pasts]
                   + [("logits", OUTPUT, FLOAT, (-1, 1, VOCAB))]
                   + [(n, OUTPUT, kv_dtype, (-1, H, -1, HD)) for n in self.presents])
        self.by_name = {t[0]: t for t in self.io}
        self.outputs = [t[0] for t in self.io if t[1] is OUTPUT]
        self.num_io_tensors = len(self.io)
        self.num_optimization_profiles = 2
        self.contexts = []

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return self.by_name[name][1]

    def get_tensor_dtype(self, name):
        return self.by_name[name][2]

    def get_tensor_shape(self, name):
        return self.by_name[name][3]

    def get_tensor_profile_shape(self, name, i):
        prefill = {"inputs_embeds": ((1, 1, D), (1, 4, D), (1, PROMPT, D)),
                   "attention_mask": ((1, 1), (1, 4), (1, PROMPT)), "position_ids": ((1, 1), (1, 4), (1, PROMPT))}
        decode = {"inputs_embeds": ((1, 1, D),) * 3, "attention_mask": ((1, 2), (1, 8), (1, CTX)),
                  "position_ids": ((1, 1),) * 3}
        if name in prefill:
            return (prefill if i == 0 else decode)[name]
        return ((1, H, 0, HD),) * 3 if i == 0 else ((1, H, 1, HD), (1, H, 7, HD), (1, H, CTX - 1, HD))

    def create_execution_context(self):
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx

    def output_shape(self, name, shapes):
        seq, total = shapes["inputs_embeds"][1], shapes["attention_mask"][1]
        return (1, 1, VOCAB) if name == "logits" else (1, H, total, HD)

    def compute(self, ctx):
        sh, ad = ctx.shapes, ctx.addr
        seq, total = sh["inputs_embeds"][1], sh["attention_mask"][1]
        past = sh[self.pasts[0]][2]
        assert total == past + seq
        emb = _view(ad["inputs_embeds"], (seq, D), np.float32).astype(np.float64)
        pos = _view(ad["position_ids"], (seq,), np.int64)
        assert np.all(_view(ad["attention_mask"], (total,), np.int64) == 1)
        presents = []
        for j, (pn, qn) in enumerate(zip(self.pasts, self.presents)):
            assert ad[pn] != ad[qn], "past and present must be different buffers"
            p = _view(ad[pn], (H, past, HD), np.float32).astype(np.float64)
            full = np.concatenate([p, toy_kv(emb, pos, j)], axis=1)
            _view(ad[qn], (H, total, HD), np.float32)[...] = full
            presents.append(full)
        _view(ad["logits"], (VOCAB,), np.float32)[...] = toy_logits(presents, emb[-1])


class FakeVisionEngine:
    def __init__(self):
        self.io = [("pixel_values", INPUT, FLOAT, (-1, 3, S, S)), ("image_embeds", OUTPUT, FLOAT, (-1, V, D))]
        self.by_name = {t[0]: t for t in self.io}
        self.outputs = ["image_embeds"]
        self.num_io_tensors, self.num_optimization_profiles = 2, 1

    get_tensor_name = FakeDecoderEngine.get_tensor_name
    get_tensor_mode = FakeDecoderEngine.get_tensor_mode
    get_tensor_dtype = FakeDecoderEngine.get_tensor_dtype
    get_tensor_shape = FakeDecoderEngine.get_tensor_shape

    def get_tensor_profile_shape(self, name, i):
        return (1, 3, S, S), (1, 3, S, S), (2, 3, S, S)

    def create_execution_context(self):
        return FakeContext(self)

    def output_shape(self, name, shapes):
        return (shapes["pixel_values"][0], V, D)

    @staticmethod
    def reference(px):
        return px.mean(axis=(1, 2, 3))[:, None, None] + np.arange(V)[None, :, None] + 0.1 * np.arange(D)

    def compute(self, ctx):
        b = ctx.shapes["pixel_values"][0]
        px = _view(ctx.addr["pixel_values"], (b, 3, S, S), np.float32)
        _view(ctx.addr["image_embeds"], (b, V, D), np.float32)[...] = self.reference(px)


def _decoder(cudart=None, **kw):
    cudart = cudart or FakeCudart()
    engine = tb.TrtEngine(FakeDecoderEngine(), name="decoder engine", profile_names=["prefill", "decode"])
    return tb.TrtDecoderRunner(engine, KV, stream=7, cudart=cudart, **kw), cudart


# ---- pure bookkeeping -----------------------------------------------------------------------------------------------
def test_kv_pingpong_swaps_buffers_and_guards_the_context():
    pp = tb.KVPingPong(8)
    s1 = pp.plan(5)
    assert (s1.past, s1.seq, s1.total, s1.past_buffer, s1.present_buffer) == (0, 5, 5, 0, 1)
    pp.commit(s1)
    s2 = pp.plan(1)
    assert (s2.past, s2.total, s2.past_buffer, s2.present_buffer) == (5, 6, 1, 0)     # the presents became the past
    pp.commit(s2)
    s3 = pp.plan(1)
    assert (s3.past_buffer, s3.present_buffer) == (0, 1) and pp.length == 6
    with pytest.raises(RuntimeBackendError, match="out of order"):
        pp.commit(s2)
    pp.commit(s3)
    pp.commit(pp.plan(1))
    assert pp.length == 8
    with pytest.raises(PromptError, match="at most 8 tokens"):
        pp.plan(1)
    with pytest.raises(RuntimeBackendError):
        pp.plan(0)
    pp.reset()
    assert (pp.length, pp.current) == (0, 0) and pp.plan(8).total == 8


def test_io_table_and_profiles_from_a_fake_engine():
    eng = FakeDecoderEngine(kv_dtype=BF16)
    io = tb.io_table(eng)
    assert list(io)[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert io["inputs_embeds"].is_input and io["inputs_embeds"].dtype == np.float32
    assert io["inputs_embeds"].shape == (-1, -1, D)
    assert io["attention_mask"].dtype == np.int64 and not io["logits"].is_input
    assert io["present.1.value"].trt_dtype == "BF16" and io["present.1.value"].dtype is None
    with pytest.raises(RuntimeBackendError, match="BF16"):
        io["present.1.value"].itemsize
    inputs = [n for n, t in io.items() if t.is_input]
    profiles = tb.profile_table(eng, inputs, ["prefill", "decode"])
    assert [p.name for p in profiles] == ["prefill", "decode"]
    assert profiles[1].shapes["past_key_values.0.key"][2] == (1, H, CTX - 1, HD)
    assert [p.name for p in tb.profile_table(eng, inputs)] == ["profile0", "profile1"]


def _shapes(seq, past):
    return {"inputs_embeds": (1, seq, D), "attention_mask": (1, past + seq), "position_ids": (1, seq),
            **{n: (1, H, past, HD) for n in KV.past_names()}}


def test_select_profile_prefill_vs_decode():
    eng = FakeDecoderEngine()
    profiles = tb.profile_table(eng, [n for n, t in tb.io_table(eng).items() if t.is_input], ["prefill", "decode"])
    assert tb.select_profile(profiles, _shapes(5, 0), "prefill") == 0
    assert tb.select_profile(profiles, _shapes(1, 0), "prefill") == 0              # a one-token prompt
    assert tb.select_profile(profiles, _shapes(1, 5), "decode") == 1
    assert tb.select_profile(profiles, _shapes(1, 5)) == 1                          # only the decode profile fits
    with pytest.raises(RuntimeBackendError, match="no optimization profile") as exc:
        tb.select_profile(profiles, _shapes(1, CTX), "decode")                     # past beyond the context
    assert "prefill:" in str(exc.value) and "decode:" in str(exc.value)
    with pytest.raises(RuntimeBackendError):
        tb.select_profile(profiles, _shapes(3, 4))                                  # chunked prefill: not planned


# ---- the runners against fakes ---------------------------------------------------------------------------------------
def test_decoder_runner_keeps_the_kv_cache_on_the_device_and_matches_a_full_recompute():
    runner, cudart = _decoder()
    assert (runner.max_prompt, runner.max_context, runner.hidden_size, runner.vocab_size) == (PROMPT, CTX, D, VOCAB)
    assert len(runner.d_kv) == 2 * L and all(len(pair) == 2 for pair in runner.d_kv)
    assert all(b.nbytes == H * CTX * HD * 4 for pair in runner.d_kv for b in pair)   # max-context buffers
    mallocs = (cudart.mallocs, cudart.host_mallocs)
    ctx = runner.engine.context
    rng = np.random.default_rng(0)

    for request in range(2):                                           # the second request reuses everything
        embeds = rng.standard_normal((5, D)).astype(np.float32)
        logits = runner.prefill(embeds[None])
        np.testing.assert_allclose(logits, reference_logits(embeds, np.arange(5)), rtol=1e-5)
        assert runner.length == 5 and runner.last_profile == 0
        ex = ctx.executions[-1]
        assert ex[1]["past_key_values.0.key"] == (1, H, 0, HD) and ex[1]["attention_mask"] == (1, 5)
        assert ex[2]["past_key_values.0.key"] == runner.d_kv[0][0].ptr        # past: buffer A (empty)
        assert ex[2]["present.0.key"] == runner.d_kv[0][1].ptr                # present: buffer B
        all_e, all_p = embeds, np.arange(5)
        for t in range(4):
            cudart.copies.clear()
            e = rng.standard_normal(D).astype(np.float32)
            logits = runner.decode(e)
            all_e, all_p = np.concatenate([all_e, e[None]]), np.append(all_p, 5 + t)
            np.testing.assert_allclose(logits, reference_logits(all_e, all_p), rtol=1e-5)
            ex = ctx.executions[-1]
            past_buf, present_buf = (1, 0) if t % 2 == 0 else (0, 1)         # ping-pong
            assert ex[0] == 1 and runner.last_profile == 1
            assert ex[1]["past_key_values.1.value"] == (1, H, 5 + t, HD)
            assert ex[1]["inputs_embeds"] == (1, 1, D) and ex[1]["position_ids"] == (1, 1)
            assert ex[1]["attention_mask"] == (1, 6 + t)
            assert ex[2]["past_key_values.1.value"] == runner.d_kv[3][past_buf].ptr
            assert ex[2]["present.1.value"] == runner.d_kv[3][present_buf].ptr
            # per token: D floats + one position up, one logits row down; no KV byte crosses
            assert sorted(cudart.copies) == sorted([("H2D", D * 4), ("H2D", 8), ("D2H", VOCAB * 4)])
        assert runner.length == 9
    assert (cudart.mallocs, cudart.host_mallocs) == mallocs            # nothing allocated per step / request
    assert ctx.profile_calls == [0, 1, 0, 1]                           # switched only when the phase changed

    # the context fills up: a clear error, not a TensorRT shape failure
    runner.decode(np.zeros(D, np.float32))
    runner.decode(np.zeros(D, np.float32))
    runner.decode(np.zeros(D, np.float32))
    assert runner.length == CTX
    with pytest.raises(PromptError, match=f"at most {CTX} tokens"):
        runner.decode(np.zeros(D, np.float32))
    with pytest.raises(PromptError, match="prefill profile"):
        runner.prefill(np.zeros((1, PROMPT + 1, D), np.float32))
    with pytest.raises(RuntimeBackendError, match="batch 1"):
        runner.prefill(np.zeros((2, 3, D), np.float32))
    runner.close()
    assert cudart.mem == {}                                            # every buffer freed


def test_decoder_runner_respects_a_smaller_context_and_explicit_positions():
    runner, _ = _decoder(max_context=7)
    assert runner.max_context == 7 and runner.max_prompt == PROMPT
    e = np.ones((1, 3, D), np.float32)
    logits = runner.prefill(e, positions=np.array([[10, 11, 12]]))
    np.testing.assert_allclose(logits, reference_logits(e[0], np.array([10, 11, 12])), rtol=1e-5)
    runner.decode(np.ones((1, 1, D), np.float32), position=13)
    assert runner.engine.context.executions[-1][1]["position_ids"] == (1, 1)
    for _ in range(3):
        runner.decode(np.ones(D, np.float32))
    with pytest.raises(PromptError):
        runner.decode(np.ones(D, np.float32))


def test_the_runners_implement_the_decoder_and_vision_interfaces():
    from edgevlm.runtime.decoders import Decoder, VisionEncoder

    runner, cudart = _decoder()
    assert isinstance(runner, Decoder) and runner.backend == "tensorrt"
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((3, D))                              # [T, D] float64: cast to the engine's
    runner.prefill(embeds)
    e = rng.standard_normal((1, 1, D)).astype(np.float32)
    logits = runner.step(e)
    assert logits.dtype == np.float32 and logits.shape == (VOCAB,) and runner.decode == runner.step
    all_e, pos = np.concatenate([embeds, e[0]]), np.arange(4)
    np.testing.assert_allclose(logits, reference_logits(all_e, pos), rtol=1e-5)
    kv = runner.kv_arrays()                                            # device -> host, current past buffers
    assert len(kv) == 2 * L and all(a.shape == (1, H, 4, HD) and a.dtype == np.float32 for a in kv)
    for j, a in enumerate(kv):
        np.testing.assert_allclose(a[0], toy_kv(all_e, pos, j), rtol=1e-5)
    info = runner.info()
    assert {k: info[k] for k in ("backend", "kv_dtype", "kv_mode", "kv_device", "max_context", "max_prompt")} == {
        "backend": "tensorrt", "kv_dtype": "float32", "kv_mode": "ping-pong", "kv_device": "cuda",
        "max_context": CTX, "max_prompt": PROMPT}
    assert info["kv_bytes"] == 2 * (2 * L) * H * CTX * HD * 4 and info["profiles"] == ["prefill", "decode"]
    with pytest.raises(PromptError, match="prefill profile"):
        runner.prefill(np.ones((1, PROMPT + 1, D), np.float32))
    runner.prefill(np.ones((PROMPT, D), np.float32))
    for _ in range(CTX - PROMPT):
        runner.step(np.ones(D, np.float32))
    with pytest.raises(PromptError, match="at most 12 tokens"):
        runner.step(np.ones(D, np.float32))                            # the cache is full
    runner.close()
    runner.close()
    assert cudart.mem == {}
    with pytest.raises(RuntimeBackendError, match="closed"):
        runner.step(np.ones(D, np.float32))

    vision = tb.TrtVisionRunner(tb.TrtEngine(FakeVisionEngine(), name="vision engine"), input_name="pixel_values",
                                output_name="image_embeds", stream=7, cudart=cudart)
    assert isinstance(vision, VisionEncoder) and vision.backend == "tensorrt"
    px = np.ones((1, 3, S, S), np.float32)
    np.testing.assert_allclose(vision.encode(px), FakeVisionEngine.reference(px), rtol=1e-6)
    assert vision.info()["backend"] == "tensorrt" and vision.info()["max_batch"] == 2
    with vision:
        pass
    with pytest.raises(RuntimeBackendError, match="closed"):
        vision.encode(px)
    assert cudart.mem == {}


def test_decoder_runner_checks_the_engine_against_the_manifest():
    eng = tb.TrtEngine(FakeDecoderEngine(), name="decoder engine")
    bad = KVSpec.from_manifest({"num_layers": L + 1, "num_kv_heads": H, "head_dim": HD,
                                "past_key": "past_key_values.{i}.key", "past_value": "past_key_values.{i}.value",
                                "present_key": "present.{i}.key", "present_value": "present.{i}.value"})
    with pytest.raises(BundleError, match="no tensor 'past_key_values.2.key'"):
        tb.TrtDecoderRunner(eng, bad, stream=7, cudart=FakeCudart())


def test_vision_runner_with_a_fake_engine():
    cudart = FakeCudart()
    runner = tb.TrtVisionRunner(tb.TrtEngine(FakeVisionEngine(), name="vision engine"), input_name="pixel_values",
                                output_name="image_embeds", stream=7, cudart=cudart)
    assert runner.max_batch == 2
    px = np.random.default_rng(1).standard_normal((1, 3, S, S)).astype(np.float32)
    out = runner(px)
    assert out.shape == (1, V, D) and out.dtype == np.float32
    np.testing.assert_allclose(out, FakeVisionEngine.reference(px), rtol=1e-6)
    two = np.concatenate([px, px + 1])
    np.testing.assert_allclose(runner(two), FakeVisionEngine.reference(two), rtol=1e-6)
    with pytest.raises(RuntimeBackendError, match="max batch 2"):
        runner(np.zeros((3, 3, S, S), np.float32))
    runner.close()
    assert cudart.mem == {}


def test_cuda_errors_are_typed():
    class Failing(FakeCudart):
        def cudaMalloc(self, n):
            return 2, 0                                                # cudaErrorMemoryAllocation

    with pytest.raises(RuntimeBackendError, match="cudaMalloc.*fake error"):
        tb.DeviceBuffer(16, cudart=Failing(), name="x")
    buf = tb.DeviceBuffer(8, cudart=FakeCudart(), name="small")
    with pytest.raises(RuntimeBackendError, match="overflows device buffer 'small'"):
        buf.copy_from_host(np.zeros(3, np.float32), 7)


# ---- dependencies and bundle wiring -------------------------------------------------------------------------------
def test_missing_tensorrt_and_cuda_python_are_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependency) as exc:
        tb.import_tensorrt()
    assert "pip install 'edgevlm[tensorrt]'" in str(exc.value) and "edgevlm build-engine" in str(exc.value)
    assert exc.value.extra == "tensorrt"
    assert tb.tensorrt_available() == (False, "tensorrt is not installed")

    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(MissingDependency) as exc:
        tb.import_cudart()
    assert exc.value.package == "cuda-python" and "edgevlm[tensorrt]" in str(exc.value)

    fake_cuda = types.ModuleType("cuda")                               # older cuda-python: `from cuda import cudart`
    fake_cuda.cudart = FakeCudart()
    monkeypatch.setitem(sys.modules, "cuda", fake_cuda)
    assert tb.import_cudart() is fake_cuda.cudart


def test_backend_from_bundle_needs_engines_and_tensorrt(monkeypatch):
    no_trt = types.SimpleNamespace(manifest={"target": {"name": "cpu-x86-avx2"}})
    with pytest.raises(BundleError, match="--target jetson-orin"):
        tb.TrtBackend.from_bundle(no_trt)
    not_built = types.SimpleNamespace(manifest={"tensorrt": {"engines": {}}})
    with pytest.raises(BundleError, match="edgevlm build-engine"):
        tb.TrtBackend.from_bundle(not_built)
    only_decoder = types.SimpleNamespace(manifest={"tensorrt": {"engines": {"decoder": {"file": "e/d.engine"}}}})
    with pytest.raises(BundleError, match="--only vision"):
        tb.TrtBackend.from_bundle(only_decoder)
    built = types.SimpleNamespace(manifest={"tensorrt": {"engines": {"vision": {"file": "e/v.engine"},
                                                                     "decoder": {"file": "e/d.engine"}}}})
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependency, match="tensorrt"):
        tb.TrtBackend.from_bundle(built)


def test_engine_entries_must_match_the_installed_tensorrt_and_gpu():
    entry = {"file": "engines/decoder.engine", "tensorrt": "10.3.0.30", "compute_capability": "8.7",
             "device": "Orin"}
    tb.check_engine_entry("decoder", entry, "10.3.0.26", ("Orin", "8.7"))          # same major.minor: fine
    with pytest.raises(tb.EngineMismatchError, match="another TensorRT release") as exc:
        tb.check_engine_entry("decoder", entry, "10.7.0", ("Orin", "8.7"))
    assert "built for SM 8.7 (Orin) with TensorRT 10.3.0.30; this device is SM 8.7 (Orin) with TensorRT 10.7.0" in (
        str(exc.value)) and "`edgevlm build-engine BUNDLE` on this device" in str(exc.value)
    assert isinstance(exc.value, RuntimeBackendError) and exc.value.component == "decoder"
    with pytest.raises(tb.EngineMismatchError, match="another GPU architecture") as exc:
        tb.check_engine_entry("decoder", entry, "10.3", ("RTX 4090", "8.9"))
    assert "built for SM 8.7 (Orin) with TensorRT 10.3.0.30; this device is SM 8.9 (RTX 4090) with TensorRT 10.3" in (
        str(exc.value))
    assert exc.value.built["compute_capability"] == "8.7" and exc.value.here["compute_capability"] == "8.9"
    with pytest.raises(tb.EngineMismatchError, match="another GPU architecture and another TensorRT release"):
        tb.check_engine_entry("decoder", entry, "10.7.0", ("RTX 4090", "8.9"))


class _Logger:
    """``trt.Logger`` of the fake ``tensorrt`` modules below."""

    WARNING, INFO = 2, 3

    def __init__(self, level):
        pass


def test_engine_load_without_a_gpu_says_where_to_run(tmp_path, monkeypatch):
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0"

    class Runtime:
        def __init__(self, logger):
            raise TypeError("pybind11::init(): factory function returned nullptr")

    fake.Logger, fake.Runtime = _Logger, Runtime
    (tmp_path / "x.engine").write_bytes(b"plan")
    with pytest.raises(RuntimeBackendError, match="no usable NVIDIA GPU"):
        tb.TrtEngine.load(tmp_path / "x.engine", trt=fake)
    with pytest.raises(BundleError, match="build-engine"):
        tb.TrtEngine.load(tmp_path / "missing.engine", trt=fake)


# ---- memory and lifetimes (issue 21: nothing leaks when a load fails half-way or a free fails) ----------------------
class _FailAfter(FakeCudart):
    """cudaMalloc / cudaMallocHost fail (out of memory) after ``n`` successful allocations."""

    def __init__(self, n):
        super().__init__()
        self.left = n

    def _alloc(self, n):
        if self.left == 0:
            return 2, 0                                                # cudaErrorMemoryAllocation
        self.left -= 1
        return super()._alloc(n)


@pytest.mark.parametrize("ok", [0, 1, 3, 6, 9])
def test_a_decoder_that_runs_out_of_memory_half_way_frees_what_it_allocated(ok):
    cudart = _FailAfter(ok)
    engine = tb.TrtEngine(FakeDecoderEngine(), name="decoder engine", profile_names=["prefill", "decode"])
    with pytest.raises(RuntimeBackendError, match="cudaMalloc"):
        tb.TrtDecoderRunner(engine, KV, stream=7, cudart=cudart)
    assert cudart.mem == {} and cudart.freed == ok                    # every earlier buffer handed back


@pytest.mark.parametrize("ok", [0, 1, 2, 3])
def test_a_vision_runner_that_runs_out_of_memory_half_way_frees_what_it_allocated(ok):
    cudart = _FailAfter(ok)
    with pytest.raises(RuntimeBackendError, match="cudaMalloc"):
        tb.TrtVisionRunner(tb.TrtEngine(FakeVisionEngine(), name="vision engine"), input_name="pixel_values",
                           output_name="image_embeds", stream=7, cudart=cudart)
    assert cudart.mem == {}


def test_close_frees_every_buffer_even_when_one_free_fails_and_runners_are_context_managers():
    class OneBadFree(FakeCudart):
        def cudaFree(self, ptr):
            if self.freed == 0:
                self.freed += 1
                self.bad = ptr
                return (1,)                                            # the first cudaFree fails
            return super().cudaFree(ptr)

    cudart = OneBadFree()
    runner, _ = _decoder(cudart)
    n = len(cudart.mem)
    with pytest.raises(RuntimeBackendError, match=r"1 of \d+ buffer\(s\) could not be freed"):
        runner.close()
    assert set(cudart.mem) == {cudart.bad} and n > 10                 # all the others were freed
    del cudart.mem[cudart.bad]
    runner.close()                                                     # idempotent: nothing freed twice

    cudart = FakeCudart()
    with tb.TrtDecoderRunner(tb.TrtEngine(FakeDecoderEngine(), name="d"), KV, stream=7, cudart=cudart) as runner:
        runner.prefill(np.ones((1, 2, D), np.float32))
    assert cudart.mem == {}
    with tb.TrtVisionRunner(tb.TrtEngine(FakeVisionEngine(), name="v"), input_name="pixel_values",
                            output_name="image_embeds", stream=7, cudart=cudart) as vision:
        vision(np.zeros((1, 3, S, S), np.float32))
    assert cudart.mem == {}


def _fake_trt_for_bundle(engines_made, dla_cores):
    """A ``tensorrt`` module whose Runtime deserializes b"vision" / b"decoder" into the fake engines."""
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0.30"

    class Runtime:
        def __init__(self, logger):
            self.DLA_core = -1

        def deserialize_cuda_engine(self, data):
            dla_cores.append(self.DLA_core)
            eng = FakeVisionEngine() if data == b"vision" else FakeDecoderEngine()
            engines_made.append(eng)
            return eng

    fake.Logger, fake.Runtime = _Logger, Runtime
    return fake


def _fake_bundle(tmp_path, dla_core=None, trt="10.3.0.30"):
    (tmp_path / "engines").mkdir(exist_ok=True)
    (tmp_path / "engines/vision.engine").write_bytes(b"vision")
    (tmp_path / "engines/decoder.engine").write_bytes(b"decoder")
    profiles = [{"name": "prefill"}, {"name": "decode"}]
    manifest = {"tensorrt": {"engines": {
        "vision": {"file": "engines/vision.engine", "tensorrt": trt, "compute_capability": "8.7",
                   "dla_core": dla_core, "profiles": [{"name": "default"}]},
        "decoder": {"file": "engines/decoder.engine", "tensorrt": trt, "compute_capability": "8.7",
                    "profiles": profiles}}},
        "components": {"vision": {"inputs": [{"name": "pixel_values"}], "outputs": [{"name": "image_embeds"}]},
                       "decoder": {"kv_cache": {"num_layers": L, "num_kv_heads": H, "head_dim": HD,
                                                "dtype": "float32", "past_key": "past_key_values.{i}.key",
                                                "past_value": "past_key_values.{i}.value",
                                                "present_key": "present.{i}.key",
                                                "present_value": "present.{i}.value"}}}}
    return types.SimpleNamespace(manifest=manifest, path=lambda rel: tmp_path / rel,
                                 component=lambda name: manifest["components"][name])


class _CudartWithDevice(FakeCudart):
    """``FakeCudart`` (device, streams) whose allocations fail after ``fail_after`` successful ones."""

    def __init__(self, fail_after=None):
        super().__init__(device_name="Orin")
        self.fail_after = fail_after

    def _alloc(self, n):
        if self.fail_after is not None:
            if self.fail_after == 0:
                return 2, 0
            self.fail_after -= 1
        return super()._alloc(n)


def test_backend_sets_the_build_time_dla_core_and_cleans_up_a_failed_load(tmp_path, monkeypatch):
    made, cores = [], []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt_for_bundle(made, cores))
    cudart = _CudartWithDevice()
    monkeypatch.setattr(tb, "import_cudart", lambda: cudart)
    with tb.TrtBackend.from_bundle(_fake_bundle(tmp_path, dla_core=1)) as be:
        assert be.info["device"] == "Orin" and be.decoder.max_context == CTX
        assert cores == [1, -1]                                       # vision on DLA core 1, decoder on the GPU
    assert cudart.mem == {} and cudart.streams == 0

    # the decoder's buffers run out half-way: the vision runner's buffers and the stream are handed back too
    cudart = _CudartWithDevice(fail_after=7)
    monkeypatch.setattr(tb, "import_cudart", lambda: cudart)
    with pytest.raises(RuntimeBackendError, match="cudaMalloc"):
        tb.TrtBackend.from_bundle(_fake_bundle(tmp_path))
    assert cudart.mem == {} and cudart.streams == 0


def test_engines_record_the_full_tensorrt_release_and_dla_needs_11_4_1():
    entry = {"file": "engines/vision.engine", "tensorrt": "10.3.0", "compute_capability": "8.7"}
    tb.check_engine_entry("vision", entry, "10.3.0.30", ("Orin", "8.7"))     # build number: not part of it
    with pytest.raises(tb.EngineMismatchError, match="TensorRT 10.3.0; this device is SM 8.7 .* TensorRT 10.3.1"):
        tb.check_engine_entry("vision", entry, "10.3.1", ("Orin", "8.7"))
    dla = {**entry, "tensorrt": "11.4", "dla_core": 0}
    tb.check_engine_entry("vision", dla, "11.4.1", ("Orin", "8.7"))
    with pytest.raises(RuntimeBackendError, match="11.4.1"):
        tb.check_engine_entry("vision", dla, "11.4.0", ("Orin", "8.7"))


# ---- a real tiny bundle through fake engines that run its ONNX graphs (tests/fake_tensorrt.py) ----------------------
@pytest.fixture(scope="module")
def tiny_trt_bundle(tmp_path_factory):
    """The tiny random-init bundle for a TensorRT target: Optimum decoder with past/present KV, mask, positions."""
    from edgevlm.pipeline import export_bundle

    out = tmp_path_factory.mktemp("trt_backend") / "tiny-orin"
    return export_bundle("tiny-ldpnetv2", out, random_init=True, target="jetson-orin-nano-8gb", precision="fp32",
                         parity=False)


def _ort_greedy(root, prompt, table, n):
    """Greedy tokens + final past KV with ONNX Runtime running decoder.onnx directly (the reference)."""
    import onnxruntime as ort

    from edgevlm.bundle import read_bundle

    kv = KVSpec.from_manifest(read_bundle(root).component("decoder")["kv_cache"])
    sess = ort.InferenceSession(str(root / "decoder.onnx"), providers=["CPUExecutionProvider"])
    past = [np.zeros(kv.shape(0), np.float32) for _ in kv.past_names()]
    x, length, tokens = prompt, 0, []
    for _ in range(n):
        t = x.shape[0]
        feeds = {"inputs_embeds": x[None].astype(np.float32), "attention_mask": np.ones((1, length + t), np.int64),
                 "position_ids": np.arange(length, length + t, dtype=np.int64)[None],
                 **dict(zip(kv.past_names(), past))}
        logits, *past = sess.run(["logits", *kv.present_names()], feeds)
        length += t
        tokens.append(int(np.argmax(logits[0, -1])))
        x = table[tokens[-1]][None]
    return tokens, past, logits[0, -1]


def test_a_tiny_bundle_through_fake_engines_gives_the_greedy_tokens_of_onnx_runtime(tiny_trt_bundle, monkeypatch):
    import onnxruntime as ort

    from edgevlm.bundle import read_bundle

    root = install_fake_tensorrt(monkeypatch, tiny_trt_bundle)
    bundle = read_bundle(root)                                         # engines hashed into the manifest
    entry = tb.engine_entries(bundle.manifest)["decoder"]
    assert (entry["tensorrt"], entry["compute_capability"], entry["built_by"]) == ("10.3.0", "8.7", "build_engines.sh")
    assert tb.engines_usable_here(bundle.manifest) == (True, "TensorRT 10.3.0 on Orin (fake) (SM 8.7)")
    cfg = bundle.model_config
    s_img = cfg.vision.image_size
    px = np.random.default_rng(0).standard_normal((1, 3, s_img, s_img)).astype(np.float32)
    table = np.load(root / bundle.component("embed")["file"])
    vision_ref = ort.InferenceSession(str(root / "vision.onnx"), providers=["CPUExecutionProvider"])
    cudart = sys.modules["tensorrt"].cudart
    n = 8
    with tb.TrtBackend.from_bundle(bundle) as be:
        img = be.vision.encode(px)                                     # [1, V, D]
        np.testing.assert_allclose(img, vision_ref.run(None, {"pixel_values": px})[0], rtol=1e-5, atol=1e-6)
        prompt = np.concatenate([table[[1, 5, 9]], img[0], table[[17, 3]]])    # text, image, text: [T, D]
        want, want_kv, want_logits = _ort_greedy(root, prompt, table, n)
        dec = be.decoder
        got = [int(np.argmax(dec.prefill(prompt[None])))]
        assert dec.last_profile == 0                                   # the planned prefill profile
        for _ in range(n - 1):
            logits = dec.step(table[got[-1]])
            got.append(int(np.argmax(logits)))
        assert dec.last_profile == 1 and dec.engine.profile_switches == 2       # prefill -> decode, once
        assert got == want
        np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
        assert dec.length == prompt.shape[0] + n - 1
        for a, b in zip(dec.kv_arrays(), want_kv):                     # the device cache = ORT's presents
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert dec.info()["kv_device"] == "cuda" and dec.info()["max_context"] == 256
        # a second request on the same buffers
        assert int(np.argmax(dec.prefill(prompt))) == want[0] and dec.length == prompt.shape[0]
    assert cudart.mem == {} and cudart.streams == 0                   # everything handed back


def test_engines_of_another_gpu_or_tensorrt_are_refused_naming_both(tiny_trt_bundle, monkeypatch):
    from edgevlm.bundle import read_bundle

    root = install_fake_tensorrt(monkeypatch, tiny_trt_bundle, device_compute_capability="8.9",
                                 device_name_here="RTX 4090")
    bundle = read_bundle(root)
    with pytest.raises(tb.EngineMismatchError) as exc:
        tb.TrtBackend.from_bundle(bundle)
    text = str(exc.value)
    assert "built for SM 8.7 (Orin (fake)) with TensorRT 10.3.0; this device is SM 8.9 (RTX 4090) with TensorRT " \
           "10.3.0" in text and "edgevlm build-engine BUNDLE` on this device" in text
    ok, why = tb.engines_usable_here(bundle.manifest)
    assert not ok and "SM 8.7" in why and "SM 8.9" in why
    assert sys.modules["tensorrt"].cudart.streams == 0               # refused before a stream was created

    root = install_fake_tensorrt(monkeypatch, tiny_trt_bundle, runtime_version="10.7.0")
    with pytest.raises(tb.EngineMismatchError, match="another TensorRT release") as exc:
        tb.TrtBackend.from_bundle(read_bundle(root))
    assert "with TensorRT 10.3.0; this device is SM 8.7 (Orin (fake)) with TensorRT 10.7.0" in str(exc.value)
    assert tb.engines_usable_here(read_bundle(root).manifest)[0] is False


def test_engines_usable_here_says_why_not_and_never_raises(tiny_trt_bundle, monkeypatch):
    from edgevlm.bundle import read_bundle

    m = read_bundle(install_fake_tensorrt(monkeypatch, tiny_trt_bundle)).manifest
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda", None)
    assert tb.engines_usable_here(m) == (False, "cuda-python is not installed")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert tb.engines_usable_here(m) == (False, "tensorrt is not installed")
    assert tb.engines_usable_here({"tensorrt": {"engines": {"decoder": {"file": "d"}}}}) == (
        False, "the bundle records no TensorRT engine for vision")
    ok, why = tb.engines_usable_here({"target": {"name": "cpu"}})
    assert not ok and "not exported for a TensorRT target" in why
    assert tb.engines_usable_here({"tensorrt": "garbage"})[0] is False
    assert tb.engines_usable_here(None)[0] is False                   # never raises, whatever it is given


# ---- on a machine with TensorRT and an NVIDIA GPU ------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.tensorrt
def test_real_engines_match_onnx_runtime(tmp_path):
    """Export a tiny bundle for the installed TensorRT, build its engines, run them through ``TrtBackend`` (prefill +
    decode loop with the device KV cache) and compare with ONNX Runtime via ``edgevlm verify``."""
    trt = pytest.importorskip("tensorrt")
    from edgevlm.bundle import read_bundle
    from edgevlm.cli.engine import build_bundle_engines
    from edgevlm.pipeline import export_bundle
    from edgevlm.exporter.verify import verify_bundle

    major, minor = trt.__version__.split(".")[:2]
    out = export_bundle("tiny-ldpnetv2", tmp_path / "b", random_init=True, target=f"rtx-4090@trt{major}.{minor}",
                        precision="fp32", parity=False)
    bundle, results = build_bundle_engines(out)
    assert set(results) == {"vision", "decoder"}
    bundle = read_bundle(out)                                          # engines hashed into the manifest
    be = tb.TrtBackend.from_bundle(bundle)
    try:
        cfg = bundle.model_config
        s = cfg.vision.image_size
        img = be.vision(np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32))
        assert img.shape == (1, cfg.visual_tokens, cfg.llm.hidden_size) and np.all(np.isfinite(img))
        logits = be.decoder.prefill(img)
        for _ in range(5):
            tok = int(np.argmax(logits))
            logits = be.decoder.decode(np.zeros(cfg.llm.hidden_size, np.float32) + tok * 1e-3)
            assert np.all(np.isfinite(logits))
        assert be.decoder.length == cfg.visual_tokens + 5
    finally:
        be.close()
    report = verify_bundle(out, engines="require")
    assert report.passed, [(c.name, c.detail) for c in report.failures]
    assert report.check("engine:decoder").status == "pass"
