"""The torch-free runtime against the PyTorch reference, on fp32 bundles of every tiny preset.

Greedy output must equal ``MobileVLM.generate`` token for token; timings must be present and consistent; streaming
must give the same text; seeded sampling must be reproducible; stop strings must cut the text. The reference side of
these tests imports torch; the runtime side never does (tests/test_torch_free.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fixtures_bundles import QUESTION, TINY_PRESETS, make_image, tiny_bundle

torch = pytest.importorskip("torch")

from edgevlm.model.vlm import SamplingConfig, select_token as torch_select_token  # noqa: E402
from edgevlm.preprocess import preprocess  # noqa: E402
from edgevlm.runtime import Session  # noqa: E402
from edgevlm.runtime.sampling import SamplingParams, filtered_probs, select_token  # noqa: E402
from edgevlm.runtime.timings import RequestTimings, format_eq4_table  # noqa: E402

MAX_NEW = 24
_SESSIONS: dict[str, Session] = {}


def session_for(tmp_path_factory, name: str, decoder_graph: str = "auto") -> Session:
    key = f"{name}@{decoder_graph}"
    if key not in _SESSIONS:
        path, _ = tiny_bundle(tmp_path_factory, name, decoder_graph=decoder_graph)
        _SESSIONS[key] = Session.from_bundle(path, threads=1, hash_stamps=None)
    return _SESSIONS[key]


def reference_tokens(model, session: Session, prompt_ids, image, max_new_tokens: int) -> list[int]:
    pv = torch.from_numpy(preprocess(image, session.preprocess_config))[None]
    return model.generate(prompt_ids, pv, max_new_tokens=max_new_tokens, eos_token_id=session.eos_id)


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_greedy_matches_pytorch_reference(tmp_path_factory, name):
    _, model = tiny_bundle(tmp_path_factory, name)
    s = session_for(tmp_path_factory, name)
    for seed in (0, 1):
        img = make_image(seed)
        r = s.generate(img, QUESTION, max_new_tokens=MAX_NEW)
        assert r.prompt_ids.count(-200) == 1
        ref = reference_tokens(model, s, r.prompt_ids, img, MAX_NEW)
        assert r.tokens == ref, f"{name} seed {seed}: runtime {r.tokens} != reference {ref}"
        assert r.text == s.tokenizer.decode(r.tokens, skip_special_tokens=True)
        assert len(r.tokens) >= 1
        if r.finish_reason == "eos":
            assert r.tokens[-1] == s.eos_id
        else:
            assert r.finish_reason == "max_new_tokens" and len(r.tokens) == MAX_NEW


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_last_step_logits_match_pytorch_full_forward(tmp_path_factory, name):
    """The logits of the last decode step (after prefill + KV-cached steps through the bound buffers) equal a
    cache-free PyTorch forward over prompt + generated tokens: catches position / mask / KV errors that a
    random-init model's greedy tokens would hide."""
    _, model = tiny_bundle(tmp_path_factory, name)
    s = session_for(tmp_path_factory, name)
    img = make_image(8)
    r = s.generate(img, QUESTION, max_new_tokens=6, temperature=1.0, seed=0)   # sampled: no EOS cut-off needed
    got = s.last_logits
    ids = torch.tensor([r.prompt_ids + r.tokens[:-1]])
    pv = torch.from_numpy(preprocess(img, s.preprocess_config))[None]
    with torch.no_grad():
        want = model(ids, pv).logits[0, -1].float().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_greedy_matches_reference_until_context_is_full(tmp_path_factory):
    """A prompt that leaves 5 free positions: both stop when the context is full, with the same tokens."""
    name = "tiny-ldpnetv2"
    _, model = tiny_bundle(tmp_path_factory, name)
    s = session_for(tmp_path_factory, name)
    base = len(s.tokenize(QUESTION)[1]) - 1 + s.visual_tokens
    words = []
    question = QUESTION
    while len(s.tokenize(question)[1]) - 1 + s.visual_tokens < s.context_length - 5:
        words.append("red")
        question = " ".join(words) + " " + QUESTION
    words.pop()
    question = " ".join(words) + " " + QUESTION
    length = s.tokenize(question)[2]
    assert base < length <= s.context_length - 5
    r = s.generate(make_image(2), question, max_new_tokens=50)
    ref = reference_tokens(model, s, r.prompt_ids, make_image(2), 50)
    assert r.tokens == ref
    if r.finish_reason == "context_full":
        assert length + len(r.tokens) - 1 == s.context_length


def test_timings_present_positive_and_consistent(tmp_path_factory):
    s = session_for(tmp_path_factory, "tiny-ldpnet")
    r = s.generate(make_image(3), QUESTION, max_new_tokens=12)
    t = r.timings
    assert isinstance(t, RequestTimings)
    assert t.load_s > 0 and t.load_s == pytest.approx(s.load_s)
    for key in ("preprocess_ms", "tokenize_ms", "vision_ms", "prefill_ms", "ttft_ms", "sampling_ms", "total_ms",
                "prefill_tok_s", "peak_rss_mb"):
        assert getattr(t, key) > 0, key
    assert t.prompt_tokens == t.visual_tokens + t.text_tokens == len(r.prompt_ids) - 1 + s.visual_tokens
    assert t.visual_tokens == s.visual_tokens
    assert t.generated_tokens == len(r.tokens)
    assert t.decode_steps == len(r.tokens) - 1
    parts = t.parts_ms()
    assert all(v >= 0 for v in parts.values())
    measured = sum(v for k, v in parts.items() if k != "other")
    assert measured <= t.total_ms + 1e-6
    assert sum(parts.values()) == pytest.approx(t.total_ms, rel=1e-9, abs=1e-6)
    assert t.ttft_ms <= t.total_ms
    assert t.preprocess_ms + t.tokenize_ms + t.vision_ms + t.prefill_ms <= t.ttft_ms
    assert t.prefill_tok_s == pytest.approx(t.prompt_tokens / (t.prefill_ms / 1e3), rel=1e-9)
    if t.decode_steps:
        assert t.decode_ms > 0
        assert t.decode_tok_s == pytest.approx(t.decode_steps / (t.decode_ms / 1e3), rel=1e-9)
        assert 0 < t.decode_token_ms_p50 <= t.decode_token_ms_p95 <= t.decode_ms
    table = format_eq4_table(t)
    assert "Tks_in / v_prompt" in table and "measured" in table
    d = r.to_dict()
    assert d["timings"]["total_ms"] > 0 and d["tokens"] == r.tokens


def test_load_breakdown_sums_to_load(tmp_path_factory):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnet")
    s = Session.from_bundle(path, threads=1, hash_stamps=None)
    b = s.load_breakdown
    for key in ("read_bundle_s", "tokenizer_s", "embed_s", "vision_wait_s", "decoder_session_s"):
        assert b[key] >= 0, key
    assert sum(b.values()) == pytest.approx(s.load_s, rel=1e-6, abs=1e-6)
    assert 0 < s.load_overlapped["vision_session_s"] < s.load_s       # built beside the decoder, inside the load


@pytest.mark.parametrize("name", ["tiny-mlp2x_gelu"])
def test_streaming_yields_the_same_text(tmp_path_factory, name):
    s = session_for(tmp_path_factory, name)
    img = make_image(4)
    r = s.generate(img, QUESTION, max_new_tokens=MAX_NEW)
    stream = s.stream(img, QUESTION, max_new_tokens=MAX_NEW)
    deltas = list(stream)
    assert "".join(deltas) == r.text
    assert stream.result is not None and stream.result.tokens == r.tokens
    assert all(deltas)                                                   # no empty deltas
    got: list[str] = []
    r2 = s.generate(img, QUESTION, max_new_tokens=MAX_NEW, stream=got.append)
    assert "".join(got) == r2.text == r.text


def test_stop_string_cuts_text_and_stream(tmp_path_factory):
    s = session_for(tmp_path_factory, "tiny-ldpnetv2")
    img = make_image(5)
    full = s.generate(img, QUESTION, max_new_tokens=MAX_NEW)
    text = full.text.strip()
    if len(text) < 4:
        pytest.skip(f"greedy text too short to pick a stop string from: {full.text!r}")
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = full.text.find(stop)
    r = s.generate(img, QUESTION, max_new_tokens=MAX_NEW, stop=[stop])
    assert r.finish_reason == "stop_string"
    assert r.text == full.text[:cut]
    assert r.tokens == full.tokens[:len(r.tokens)] and len(r.tokens) <= len(full.tokens)
    assert "".join(s.stream(img, QUESTION, max_new_tokens=MAX_NEW, stop=[stop])) == r.text


def test_seeded_sampling_is_reproducible(tmp_path_factory):
    s = session_for(tmp_path_factory, "tiny-ldpnet")
    img = make_image(6)
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95)
    a = s.generate(img, QUESTION, seed=7, **kw)
    b = s.generate(img, QUESTION, seed=7, **kw)
    c = s.generate(img, QUESTION, seed=8, **kw)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens                         # 16 draws from a wide distribution: practically certain
    greedy = s.generate(img, QUESTION, max_new_tokens=16)
    assert s.generate(img, QUESTION, max_new_tokens=16, temperature=1.0, top_k=1, seed=3).tokens == greedy.tokens


# ---- sampling semantics vs the PyTorch reference ------------------------------------------------------------------
@pytest.mark.parametrize("params", [SamplingParams(0.7, 0, 1.0), SamplingParams(1.0, 3, 1.0),
                                    SamplingParams(0.9, 0, 0.6), SamplingParams(1.3, 5, 0.8)])
def test_sampling_distribution_matches_select_token(params):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=12).astype(np.float32) * 2
    probs = filtered_probs(logits, params)
    support = set(np.flatnonzero(probs))
    gen = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    torch_draws = [torch_select_token(torch.from_numpy(logits), cfg, gen) for _ in range(3000)]
    ours = np.random.default_rng(1)
    np_draws = [select_token(logits, params, ours) for _ in range(3000)]
    assert set(torch_draws) == support == set(np_draws)
    for draws in (torch_draws, np_draws):
        freq = np.bincount(draws, minlength=logits.size) / len(draws)
        assert np.abs(freq - probs).max() < 0.04


def test_greedy_ties_take_the_first_maximum():
    logits = np.array([0.0, 3.0, 1.0, 3.0], np.float32)
    assert select_token(logits, SamplingParams()) == int(torch.argmax(torch.from_numpy(logits))) == 1


def test_decode_allocates_no_kv_copies_in_python(tmp_path_factory):
    """Concat graphs: the presents of step t are the pasts of step t+1: the same OrtValue objects, no numpy round
    trip."""
    s = session_for(tmp_path_factory, "tiny-ldpnetv2", "portable")
    assert s.kv_spec.mode == "concat"
    seen = []
    orig = s.kv.commit

    def spy(n):
        orig(n)
        seen.append([id(v) for v in s.kv._values])
    s.kv.commit = spy
    try:
        r = s.generate(make_image(7), QUESTION, max_new_tokens=4)
    finally:
        del s.kv.commit
    assert len(seen) == len(r.tokens)                    # prefill + decode steps
    assert all(len(ids) == 2 * s.kv_spec.num_layers for ids in seen)
    assert math.isclose(s.kv.length, r.timings.prompt_tokens + len(r.tokens) - 1)


def test_shared_buffer_decode_reuses_one_preallocated_buffer(tmp_path_factory):
    """Shared-buffer graphs (the CPU export's default): every run binds the very same KV OrtValues as past and
    present; nothing is allocated or re-bound per token, across requests too."""
    pytest.importorskip("onnxruntime_genai")
    s = session_for(tmp_path_factory, "tiny-ldpnetv2", "gqa")
    assert s.kv_spec.mode == "shared_buffer" and not s.io.has_positions
    before = [id(v) for v in s.kv._buffers]
    ptrs = [v.data_ptr() for v in s.kv._buffers]
    r1 = s.generate(make_image(7), QUESTION, max_new_tokens=4)
    r2 = s.generate(make_image(8), QUESTION, max_new_tokens=4)
    assert [id(v) for v in s.kv._buffers] == before and [v.data_ptr() for v in s.kv._buffers] == ptrs
    assert s.kv.length == r2.timings.prompt_tokens + len(r2.tokens) - 1 and r1.tokens


# ---- the ORT-CPU decoder variant: GroupQueryAttention with a shared past/present buffer ----------------------------
def _gqa_bundle(tmp_path_factory, precision: str):
    """The tiny-ldpnetv2 bundle with its decoder swapped for the onnxruntime-genai build (kv_cache mode
    "shared_buffer", no position_ids input)."""
    import shutil

    pytest.importorskip("onnxruntime_genai")
    from edgevlm.bundle import update_manifest
    from edgevlm.exporter.ort_decoder import build_ort_decoder

    src, model = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    dst = tmp_path_factory.mktemp(f"gqa_{precision}") / "bundle"
    shutil.copytree(src, dst)
    entry = build_ort_decoder(model.llm, dst, precision=precision, block_size=32)

    def swap(m):
        m["components"]["decoder"] = entry
    update_manifest(dst, swap, new_files=["decoder.onnx", "decoder.onnx.data"])
    return dst, model


def test_shared_buffer_kv_mode_matches_reference(tmp_path_factory):
    path, model = _gqa_bundle(tmp_path_factory, "fp32")
    s = Session.from_bundle(path, threads=1, hash_stamps=None)
    assert s.kv_spec.mode == "shared_buffer" and not s.io.has_positions
    img = make_image(9)
    r = s.generate(img, QUESTION, max_new_tokens=MAX_NEW)
    assert r.tokens == reference_tokens(model, s, r.prompt_ids, img, MAX_NEW)
    r = s.generate(img, QUESTION, max_new_tokens=6, temperature=1.0, seed=0)
    pv = torch.from_numpy(preprocess(img, s.preprocess_config))[None]
    with torch.no_grad():
        want = model(torch.tensor([r.prompt_ids + r.tokens[:-1]]), pv).logits[0, -1].numpy()
    np.testing.assert_allclose(s.last_logits, want, atol=1e-4, rtol=0)
    # a second request reuses the same buffers: same answer as a fresh session
    again = s.generate(img, QUESTION, max_new_tokens=6, temperature=1.0, seed=0)
    assert again.tokens == r.tokens


def test_shared_buffer_int4_decoder_runs(tmp_path_factory):
    path, model = _gqa_bundle(tmp_path_factory, "int4")
    s = Session.from_bundle(path, threads=1, hash_stamps=None)
    r = s.generate(make_image(10), QUESTION, max_new_tokens=8)
    assert 1 <= len(r.tokens) <= 8 and r.timings.decode_steps == len(r.tokens) - 1
    assert np.isfinite(s.last_logits).all()


def test_optimized_graph_cache_hit_gives_the_same_answer(tmp_path_factory, tmp_path):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnet")
    cold = Session.from_bundle(path, threads=1, optimized_cache=tmp_path, hash_stamps=None)
    assert {i.cache for i in cold.session_info.values()} == {"miss"}
    warm = Session.from_bundle(path, threads=1, optimized_cache=tmp_path, hash_stamps=None)
    assert {i.cache for i in warm.session_info.values()} == {"hit"}
    assert all(Path(i.model_path).is_relative_to(tmp_path) for i in warm.session_info.values())
    img = make_image(11)
    assert warm.generate(img, QUESTION, max_new_tokens=12).tokens == cold.generate(img, QUESTION,
                                                                                  max_new_tokens=12).tokens
    # a corrupt entry is rebuilt, not trusted
    for entry in tmp_path.iterdir():
        (entry / "model.onnx").write_bytes(b"garbage")
    again = Session.from_bundle(path, threads=1, optimized_cache=tmp_path, hash_stamps=None)
    assert {i.cache for i in again.session_info.values()} == {"miss"}
    assert again.generate(img, QUESTION, max_new_tokens=12).tokens == cold.generate(img, QUESTION,
                                                                                   max_new_tokens=12).tokens


def test_optimized_graph_cache_write_failure_falls_back(tmp_path_factory, tmp_path):
    """A cache that cannot be written (here: a file where the cache directory should be) never fails a load."""
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnet")
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    s = Session.from_bundle(path, threads=1, optimized_cache=blocker, hash_stamps=None)
    assert {i.cache for i in s.session_info.values()} == {"off"}
    assert s.generate(make_image(12), QUESTION, max_new_tokens=3).tokens


def test_cpu_time_is_reported(tmp_path_factory):
    s = session_for(tmp_path_factory, "tiny-ldpnet")
    t = s.generate(make_image(13), QUESTION, max_new_tokens=6, ignore_eos=True).timings
    assert t.generated_tokens == 6 and t.decode_steps == 5
    assert t.cpu_ms > 0 and t.decode_cpu_ms_per_token > 0


