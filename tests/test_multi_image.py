"""Several images per request: image k's visual tokens are spliced at the k-th ``<image>``, in order (issue 18).

On the tiny bundle: the prefill embeddings of a 2-image request equal the manual splice; swapping the images changes
the logits; one image gives the same tokens as before (a list of one too); the placeholder count must match the
images; the prefix cache keys each image. Torch-free.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_bundles import QUESTION, make_image, tiny_bundle

from edgevlm.errors import ConfigError, PromptError
from edgevlm.preprocess import preprocess
from edgevlm.prompt import IMAGE_TOKEN_INDEX, build_prompt, check_prompt_ids
from edgevlm.runtime import Session
from edgevlm.runtime.caches import spliced_identity


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2")
    s = Session.from_bundle(path, threads=1, hash_stamps=None)
    yield s
    s.close()


def _capture_prefill(s: Session) -> list[np.ndarray]:
    seen: list[np.ndarray] = []
    dec = s.decoder
    orig = dec.prefill

    def prefill(embeds, *a, **k):
        seen.append(np.array(embeds, copy=True))
        return orig(embeds, *a, **k)

    dec.prefill = prefill
    return seen


def test_two_images_are_spliced_in_order(session):
    s = session
    a, b = make_image(0), make_image(5)
    seen = _capture_prefill(s)
    try:
        r = s.generate([a, b], QUESTION, max_new_tokens=3, temperature=1.0, seed=0)
        logits_ab = s.last_logits
    finally:
        del s.decoder.prefill
    ids = r.prompt_ids
    places = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    assert len(places) == 2
    assert r.prompt.count("<image>") == 2
    v = s.visual_tokens
    ea = s.encode_image(preprocess(a, s.preprocess_config)[None])[0]
    eb = s.encode_image(preprocess(b, s.preprocess_config)[None])[0]
    p0, p1 = places
    want = np.concatenate([s.embed(ids[:p0]), ea, s.embed(ids[p0 + 1:p1]), eb, s.embed(ids[p1 + 1:])])[None]
    assert seen[0].shape == want.shape == (1, len(ids) - 2 + 2 * v, s.hidden_size)
    np.testing.assert_array_equal(seen[0], want.astype(seen[0].dtype))
    t = r.timings
    assert t.images == 2 and t.visual_tokens == 2 * v
    assert t.prompt_tokens == len(ids) - 2 + 2 * v and t.text_tokens == t.prompt_tokens - 2 * v
    assert not t.image_cache_hit

    s.generate([b, a], QUESTION, max_new_tokens=3, temperature=1.0, seed=0)
    assert not np.allclose(s.last_logits, logits_ab)                    # order matters
    s.generate([a, b], QUESTION, max_new_tokens=3, temperature=1.0, seed=0)
    np.testing.assert_allclose(s.last_logits, logits_ab, rtol=0, atol=1e-5)


def test_pixel_values_batch_and_splice_list(session):
    s = session
    a, b = make_image(1), make_image(2)
    pv = np.stack([preprocess(a, s.preprocess_config), preprocess(b, s.preprocess_config)])       # [2, 3, S, S]
    r1 = s.generate(None, QUESTION, pixel_values=pv, max_new_tokens=4)
    r2 = s.generate((a, b), QUESTION, max_new_tokens=4)
    assert r1.tokens == r2.tokens and r1.timings.images == 2


def test_one_image_unchanged(session):
    s = session
    img = make_image(3)
    r = s.generate(img, QUESTION, max_new_tokens=8)
    assert r.prompt_ids.count(IMAGE_TOKEN_INDEX) == 1 and r.timings.images == 1
    assert r.timings.visual_tokens == s.visual_tokens
    assert s.generate([img], QUESTION, max_new_tokens=8).tokens == r.tokens
    # the single-image splice is the old one: text, the image at the placeholder, text
    ids = r.prompt_ids
    p = ids.index(IMAGE_TOKEN_INDEX)
    e = s.encode_image(preprocess(img, s.preprocess_config)[None])
    want = np.concatenate([s.embed(ids[:p]), e[0], s.embed(ids[p + 1:])])[None]
    np.testing.assert_array_equal(s.splice(ids, e), want.astype(s.splice(ids, e).dtype))


def test_placeholder_count_must_match(session):
    s = session
    a, b = make_image(0), make_image(1)
    with pytest.raises(PromptError, match="1 '<image>' placeholders but 2 image"):
        s.generate([a, b], "USER: <image>\nhi ASSISTANT:", raw_prompt=True, max_new_tokens=2)
    with pytest.raises(PromptError, match="2 '<image>' placeholders but 1 image"):
        s.generate(a, "USER: <image>\n<image>\nhi ASSISTANT:", raw_prompt=True, max_new_tokens=2)
    with pytest.raises(ConfigError):
        s.generate([], QUESTION, max_new_tokens=2)
    with pytest.raises(PromptError, match="3 '<image>' placeholders but 2"):
        check_prompt_ids([1, -200, 2, -200, -200], 4, 100, images=2)
    assert check_prompt_ids([1, -200, 2, -200], 4, 100, images=2) == 2 + 2 * 4
    assert build_prompt("q", images=2).count("<image>\n") == 2
    assert build_prompt("q").count("<image>") == 1


def test_too_long_counts_all_visual_tokens():
    with pytest.raises(PromptError, match=r"prompt is 13 tokens \(12 visual \+ 1 text\)"):
        check_prompt_ids([1, -200, -200, -200], 4, 10, images=3)


def test_prefix_identity_keys_each_image():
    ids = [1, -200, 2, -200, 3]
    ident = spliced_identity(ids, ["ka", "kb"], 2)
    assert ident == [1, ("ka", 0), ("ka", 1), 2, ("kb", 0), ("kb", 1), 3]
    assert spliced_identity([1, -200, 2], "k", 2) == [1, ("k", 0), ("k", 1), 2]          # the single-key form


def test_caches_per_image(session):
    s = session
    a, b = make_image(6), make_image(7)
    s.configure_caches(image_cache_mib=8, prefix_cache=True)
    try:
        cold = s.generate([a, b], QUESTION, max_new_tokens=4)
        assert not cold.timings.image_cache_hit
        half = s.generate([a, make_image(9)], QUESTION, max_new_tokens=4)
        assert not half.timings.image_cache_hit                       # only one of the two hit
        warm = s.generate([a, b], QUESTION, max_new_tokens=4)
        assert warm.timings.image_cache_hit and warm.tokens == cold.tokens
        again = s.generate([a, b], QUESTION, max_new_tokens=4)
        assert again.timings.cached_tokens > 0 and again.tokens == cold.tokens
        swapped = s.generate([b, a], QUESTION, max_new_tokens=4)
        p = swapped.prompt_ids.index(IMAGE_TOKEN_INDEX)
        assert swapped.timings.cached_tokens <= p                      # nothing of image a reused at b's place
    finally:
        s.configure_caches(image_cache_mib=0, prefix_cache=False)
        s.clear_caches()
