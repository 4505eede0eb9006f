"""The Session's caches (``edgevlm.runtime.caches``): the image-embedding LRU, and prompt-prefix KV reuse through
``Decoder.rewind`` / ``Decoder.extend``.

The contract: greedy tokens are the same with and without the caches (concat and GroupQueryAttention graphs, ORT and
native decoders); a repeated image skips the vision encoder; a repeated prefix is not prefilled again; a stream the
consumer abandons leaves the next request correct; a decoder that cannot prefill after a past falls back to a full
prefill.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_bundles import QUESTION, make_image, tiny_bundle

from edgevlm.bundle import load_embedding_table, read_bundle
from edgevlm.runtime import Session
from edgevlm.runtime.backends import BackendOptions
from edgevlm.runtime.caches import (ImageEmbeddingCache, KVReuseUnsupported, common_prefix, image_key,
                                    spliced_identity)
from edgevlm.runtime.decoders import OrtDecoder, open_decoder
from edgevlm.runtime.generation import generate_stream
from edgevlm.runtime.sampling import SamplingParams

GRAPHS = ("portable", "gqa")
QUESTIONS = (QUESTION, "How many squares are there?", "Where is the star?")


def _graph_or_skip(graph: str) -> None:
    if graph == "gqa":
        pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai builds the GroupQueryAttention graph")


_SESSIONS: dict[tuple[str, bool], Session] = {}


def _session(tmp_path_factory, graph: str, cached: bool) -> Session:
    _graph_or_skip(graph)
    if (graph, cached) not in _SESSIONS:
        path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph=graph)
        _SESSIONS[(graph, cached)] = Session.from_bundle(path, backend="ort", threads=1, hash_stamps=None,
                                                         image_cache_mib=4 if cached else 0, prefix_cache=cached)
    s = _SESSIONS[(graph, cached)]
    s.clear_caches()
    return s


# ---- the pieces -------------------------------------------------------------------------------------------------
def test_image_cache_is_an_lru_bounded_in_bytes():
    a = np.ones((1, 4, 8), np.float32)                 # 128 bytes each
    c = ImageEmbeddingCache(300)
    assert c.get("x") is None and c.misses == 1
    c.put("x", a)
    c.put("y", a * 2)
    got = c.get("x")                                   # x is now the most recently used
    assert got is not None and not got.flags.writeable and c.hits == 1
    a[...] = 7                                         # the cache holds a copy
    assert float(c.get("x")[0, 0, 0]) == 1.0
    c.put("z", a * 3)                                  # 384 > 300: y (least recently used) goes
    assert "y" not in c and "x" in c and "z" in c and c.bytes == 256 and c.evictions == 1
    c.put("big", np.ones((1, 100, 8), np.float32))     # larger than the whole budget: not stored
    assert "big" not in c and c.bytes <= c.max_bytes
    off = ImageEmbeddingCache.from_mib(0)
    off.put("x", a)
    assert not off.enabled and len(off) == 0
    assert c.stats() == {"entries": 2, "bytes": 256, "max_bytes": 300, "hits": 2, "misses": 1, "evictions": 1}


def test_image_key_and_spliced_identity():
    pv = np.zeros((1, 3, 4, 4), np.float32)
    k = image_key(pv)
    assert k == image_key(pv.copy()) and k != image_key(pv + 1e-6) and k != image_key(pv.reshape(1, 3, 2, 8))
    a = spliced_identity([1, 5, -200, 7, 8], k, 3)
    assert a == [1, 5, (k, 0), (k, 1), (k, 2), 7, 8]
    assert common_prefix(a, spliced_identity([1, 5, -200, 9], k, 3)) == 5
    assert common_prefix(a, spliced_identity([1, 5, -200, 7, 8], "other", 3)) == 2
    unknown = spliced_identity([1, -200], None, 2)
    assert common_prefix(unknown, spliced_identity([1, -200], None, 2)) == 1


# ---- decoders: rewind + extend == one prefill -------------------------------------------------------------------
@pytest.mark.parametrize("graph", GRAPHS)
def test_ort_decoder_rewind_and_extend_equal_a_fresh_prefill(tmp_path_factory, graph):
    _graph_or_skip(graph)
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph=graph)
    b = read_bundle(path, verify_hashes=False)
    table = load_embedding_table(b)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 12, table.shape[1])).astype(np.float32) * 0.1          # [1, T, D]
    with OrtDecoder(b, BackendOptions(threads=1)) as dec:
        want = np.array(dec.prefill(x))
        kv_want = dec.kv_arrays()
        dec.prefill(x[:, :5])
        got = np.array(dec.extend(x[:, 5:]))                                             # 5 cached + 7 more
        assert dec.length == 12
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        for a, c in zip(kv_want, dec.kv_arrays()):
            np.testing.assert_allclose(a, c, atol=1e-4, rtol=0)
        for t in (3, 4, 5):                                                              # some steps on top
            dec.step(table[t])
        assert dec.length == 15
        dec.rewind(8)                                                                    # keep 8, re-extend 4
        assert dec.length == 8 and dec.kv_arrays()[0].shape == tuple(dec.spec.shape(8))
        np.testing.assert_allclose(np.array(dec.extend(x[0, 8:])), want, atol=1e-4, rtol=0)
        dec.rewind(12)                                                                   # n == length: no-op
        assert dec.length == 12
        with pytest.raises(ValueError, match="rewind"):
            dec.rewind(13)
        dec.rewind(0)
        assert dec.length == 0
        np.testing.assert_allclose(np.array(dec.extend(x)), want, atol=1e-4, rtol=0)   # empty cache: a prefill


def test_native_decoder_rewind_and_extend_keep_the_fp16_cache_in_sync(tmp_path_factory):
    from edgevlm.runtime.native import availability

    if availability() is not None:
        pytest.skip(f"native kernel unavailable here ({availability()})")
    from test_native import _quantized

    b = read_bundle(_quantized(tmp_path_factory, "int4"), verify_hashes=False)
    table = load_embedding_table(b)
    ids = [1, 5, 9, 17, 23, 40, 41, 2]
    opts = BackendOptions(threads=1)
    with open_decoder(b, "native", opts) as nat, open_decoder(b, "ort", opts) as o:
        assert nat.backend == "native"

        def greedy(dec, first_logits, n=6):
            out = [int(np.argmax(first_logits))]
            for _ in range(n):
                out.append(int(np.argmax(dec.step(table[out[-1]]))))
            return out

        want = greedy(o, o.prefill(table[ids]))
        assert greedy(nat, nat.prefill(table[ids])) == want
        nat.rewind(3)                                    # keep 3 rows, the rest again through ORT + sync
        assert greedy(nat, nat.extend(table[ids[3:]])) == want
        nat.prefill(table[[7, 7, 7, 7, 7, 7]])          # other rows in the cache, then the same prefix again
        nat.rewind(0)
        assert greedy(nat, nat.extend(table[ids])) == want


class _NoReuse:
    """A decoder whose rewind refuses (a TensorRT engine without a past > 0 prefill profile)."""

    backend, max_context, hidden_size = "fake", 64, 4

    def __init__(self) -> None:
        self.length, self.prefills = 0, 0

    def rewind(self, n):
        raise KVReuseUnsupported("no profile")

    def extend(self, embeds):  # pragma: no cover - rewind refuses first
        raise AssertionError

    def prefill(self, embeds):
        self.prefills += 1
        self.length = embeds.shape[1]
        return np.eye(8, dtype=np.float32)[1]

    def step(self, embed):
        self.length += 1
        return np.eye(8, dtype=np.float32)[0]


def test_a_decoder_that_cannot_rewind_gets_a_full_prefill():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "x" * len(ids)

    dec = _NoReuse()
    dec.length = 10
    fed: list[int] = []
    gen = generate_stream(dec, np.zeros((1, 6, 4), np.float32), embed_table=np.zeros((8, 4), np.float32),
                          tokenizer=Tok(), sampling=SamplingParams(), max_new_tokens=3, eos_id=0, reuse=4, fed=fed)
    with pytest.raises(StopIteration) as done:
        while True:
            next(gen)
    g = done.value.value
    assert dec.prefills == 1 and g.cached_tokens == 0 and g.tokens == [1, 0] and fed == [1]


# ---- Session: same tokens with and without the caches -----------------------------------------------------------
@pytest.mark.parametrize("graph", GRAPHS)
def test_session_caches_give_the_same_greedy_tokens(tmp_path_factory, graph):
    cold, warm = _session(tmp_path_factory, graph, False), _session(tmp_path_factory, graph, True)
    v = warm.visual_tokens
    img_a, img_b = make_image(11), make_image(12)
    plan = [(img_a, QUESTIONS[0]), (img_a, QUESTIONS[1]), (img_b, QUESTIONS[1]), (img_a, QUESTIONS[1]),
            (img_a, QUESTIONS[1])]
    hits, cached = [], []
    for image, q in plan:
        want = cold.generate(image, q, max_new_tokens=8)
        got = warm.generate(image, q, max_new_tokens=8)
        assert got.tokens == want.tokens and got.text == want.text
        assert want.timings.cached_tokens == 0 and not want.timings.image_cache_hit
        assert got.timings.prompt_tokens == want.timings.prompt_tokens
        hits.append(got.timings.image_cache_hit)
        cached.append(got.timings.cached_tokens)
    assert hits == [False, True, False, True, True]
    p = got.prompt_ids.index(-200)                    # template text before the image
    assert cached[0] == 0
    assert cached[1] >= p + v                         # same image, other question: system prompt + image kept
    assert p <= cached[2] < p + v                     # another image: the system prompt (at least) kept
    assert p <= cached[3] < p + v                     # one KV slot: image b replaced image a's rows
    assert cached[4] == got.timings.prompt_tokens - 1  # the same request again: all but the last position
    stats = warm.cache_stats()
    assert stats["image"]["hits"] >= 3 and stats["prefix"]["reused"] >= 4 and stats["prefix"]["enabled"]
    assert cold.cache_stats()["image"]["max_bytes"] == 0 and not cold.cache_stats()["prefix"]["enabled"]


def test_session_image_cache_hit_skips_the_vision_encoder(tmp_path_factory, monkeypatch):
    s = _session(tmp_path_factory, "portable", True)
    calls = []
    real = s.vision.encode
    monkeypatch.setattr(s.vision, "encode", lambda pv: calls.append(1) or real(pv))
    first = s.generate(make_image(21), QUESTION, max_new_tokens=2)
    again = s.generate(make_image(21), QUESTIONS[2], max_new_tokens=2)
    assert len(calls) == 1 and not first.timings.image_cache_hit and again.timings.image_cache_hit
    # the timings stay consistent; the prefill rate is over the tokens actually prefilled
    t = again.timings
    assert t.cached_tokens > 0 and t.prefill_tok_s == pytest.approx(
        (t.prompt_tokens - t.cached_tokens) / (t.prefill_ms / 1e3), rel=1e-9)
    assert sum(t.parts_ms().values()) == pytest.approx(t.total_ms, rel=1e-9, abs=1e-6)
    assert t.to_dict()["image_cache_hit"] is True and t.to_dict()["cached_tokens"] == t.cached_tokens


@pytest.mark.parametrize("graph", GRAPHS)
def test_an_abandoned_stream_leaves_the_next_request_correct(tmp_path_factory, graph):
    cold, warm = _session(tmp_path_factory, graph, False), _session(tmp_path_factory, graph, True)
    img = make_image(31)
    st = warm.stream(img, QUESTIONS[0], max_new_tokens=12, ignore_eos=True)
    next(st)                                          # one delta, then the client goes away
    st._gen.close()
    for q in (QUESTIONS[0], QUESTIONS[1]):
        want = cold.generate(img, q, max_new_tokens=8)
        got = warm.generate(img, q, max_new_tokens=8)
        assert got.tokens == want.tokens and got.timings.cached_tokens > 0


def test_caches_can_be_turned_on_on_a_loaded_session_and_errors_keep_it_sane(tmp_path_factory):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph="portable")
    s = Session.from_bundle(path, backend="ort", threads=1, hash_stamps=None)
    assert s.cache_stats()["image"]["max_bytes"] == 0 and not s.prefix_cache       # off by default
    s.configure_caches(image_cache_mib=1, prefix_cache=True)
    assert s.image_cache.max_bytes == 2**20 and s.prefix_cache
    with pytest.raises(ValueError, match="image_cache_mib"):
        s.configure_caches(image_cache_mib=-1)
    a = s.generate(make_image(41), QUESTION, max_new_tokens=4)
    with pytest.raises(ValueError):
        s.generate(make_image(41), QUESTION * 200, max_new_tokens=4)                 # over the context
    b = s.generate(make_image(41), QUESTION, max_new_tokens=4)
    assert b.tokens == a.tokens and b.timings.image_cache_hit and b.timings.cached_tokens > 0
    s.configure_caches(prefix_cache=False)
    c = s.generate(make_image(41), QUESTION, max_new_tokens=4)
    assert c.tokens == a.tokens and c.timings.cached_tokens == 0
    s.close()


def test_tensorrt_runner_rewinds_and_refuses_a_prefill_after_a_past_without_a_profile():
    from test_trt_backend import D, _decoder, reference_logits

    from edgevlm.runtime.decoders import Decoder

    runner, _ = _decoder()
    assert isinstance(runner, Decoder)
    rng = np.random.default_rng(5)
    e = rng.standard_normal((5, D)).astype(np.float32)
    runner.prefill(e)
    runner.step(rng.standard_normal(D).astype(np.float32))
    runner.rewind(3)                                                 # keep 3 rows (repacked)
    assert runner.length == 3
    assert not runner.accepts(2, 3) and runner.accepts(1, 3) and runner.accepts(4, 0)
    with pytest.raises(KVReuseUnsupported, match="profile"):         # the prefill profile has past = 0 only
        runner.extend(e[3:])
    assert runner.length == 3
    logits = runner.extend(e[3:4])                                   # one token after a past: the decode profile
    np.testing.assert_allclose(logits, reference_logits(e[:4], np.arange(4)), rtol=1e-5)
    with pytest.raises(Exception, match="rewind"):
        runner.rewind(9)
    runner.rewind(0)
    assert runner.length == 0
    np.testing.assert_allclose(runner.extend(e), reference_logits(e, np.arange(5)), rtol=1e-5)
    runner.close()
