"""Calibration sources and readers: what the readers feed is exactly what the graphs declare, decode samples carry
past KV of the right length, user folders and LLaVA JSON files work, empty/missing sources are typed errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgevlm.errors import DataError
from tests.fixtures_bundles import tiny_bundle, write_png

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgevlm.bundle import read_bundle

    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph="portable")   # concat KV: zero-length pasts
    return read_bundle(path)


@pytest.fixture(scope="module")
def ctx(bundle):
    from edgevlm.quant.calibration import BundleContext

    return BundleContext.from_manifest(bundle.root, bundle.manifest)


def _declared(path):
    """(name -> (numpy dtype, dims)) straight from the ONNX file, independently of edgevlm.quant."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out = {}
    for v in m.graph.input:
        if v.name in inits:
            continue
        dt = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        out[v.name] = (np.dtype(dt), dims)
    return out


def _check_feed(feed, declared):
    assert set(feed) == set(declared), (sorted(feed), sorted(declared))
    for name, arr in feed.items():
        dt, dims = declared[name]
        assert arr.dtype == dt, (name, arr.dtype, dt)
        assert arr.ndim == len(dims), (name, arr.shape, dims)
        for got, want in zip(arr.shape, dims):
            if isinstance(want, int) and want > 0:
                assert got == want, (name, arr.shape, dims)


# ---- the embedded set -------------------------------------------------------------------------------------------
def test_embedded_spec_is_disjoint_from_train_val_test():
    from edgevlm.quant.calibration import CalibrationSpec, embedded_items
    from edgevlm.train.synthetic import generate_samples

    spec = CalibrationSpec.load()
    assert spec.split not in ("train", "val", "test") and spec.heldout_split not in ("train", "val", "test")
    assert (spec.split, spec.seed) != (spec.heldout_split, spec.heldout_seed)
    calib = embedded_items(6, spec=spec, image_size=32)
    held = embedded_items(6, heldout=True, spec=spec, image_size=32)
    test = generate_samples(6, split="test", seed=0, image_size=32)
    arrays = lambda items: [np.asarray(i.image).tobytes() for i in items]  # noqa: E731
    a, b, c = arrays(calib), arrays(held), arrays(test)
    assert not set(a) & set(b) and not set(a) & set(c) and not set(b) & set(c)
    assert all(i.answer for i in calib) and all(i.question for i in calib)


def test_calibration_set_records_its_sources():
    from edgevlm.quant.calibration import calibration_set

    cs = calibration_set(None, 3, heldout_samples=2, image_size=56)
    assert len(cs.items) == 3 and len(cs.heldout) == 2
    assert cs.info["calibration"]["kind"] == "embedded" and cs.info["calibration"]["num_samples"] == 3
    assert cs.info["heldout"]["kind"] == "embedded" and cs.info["heldout"]["seed"] != cs.info["calibration"]["seed"]


# ---- readers ----------------------------------------------------------------------------------------------------
def test_vision_reader_feeds_what_the_graph_declares(bundle, ctx):
    from edgevlm.quant.calibration import VisionCalibrationReader, embedded_items

    items = embedded_items(3, image_size=56)
    path = bundle.component_path("vision")
    reader = VisionCalibrationReader(items, ctx.preprocess, path)
    declared = _declared(path)
    feeds = []
    while (f := reader.get_next()) is not None:
        _check_feed(f, declared)
        assert f["pixel_values"].shape[0] == 1
        feeds.append(f)
    assert len(feeds) == 3
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess.run(None, feeds[0])
    reader.rewind()
    assert reader.get_next() is not None


def test_decoder_reader_prefill_and_decode_samples(bundle, ctx):
    from edgevlm.quant.calibration import DecoderCalibrationReader, embedded_items

    items = embedded_items(3, image_size=56)
    dec = bundle.component_path("decoder")
    reader = DecoderCalibrationReader(ctx, items, bundle.component_path("vision"), dec, decode_steps=3)
    declared = _declared(dec)
    samples = list(reader.samples())
    sess = onnxruntime.InferenceSession(str(dec), providers=["CPUExecutionProvider"])
    by_item: dict[str, list] = {}
    for s in samples:
        _check_feed(s.feed, declared)
        by_item.setdefault(s.item, []).append(s)
    assert len(by_item) == 3
    v = bundle.visual_tokens
    for item in items:
        seq = by_item[item.id]
        prefill, decodes = seq[0], seq[1:]
        t = len(ctx.prompt_ids(item.question)) - 1 + v                     # spliced prompt length
        assert prefill.kind == "prefill" and prefill.past_length == 0
        assert prefill.feed["inputs_embeds"].shape[1] == t
        assert all(prefill.feed[n].shape[2] == 0 for n in prefill.feed if n.startswith("past_key_values."))
        np.testing.assert_array_equal(prefill.feed["position_ids"], np.arange(t)[None])
        assert prefill.feed["attention_mask"].shape == (1, t)
        teacher = ctx.continuation_ids(item.question, item.answer)
        assert 1 <= len(decodes) <= 3 and len(decodes) == min(3, len(teacher))
        for k, s in enumerate(decodes):
            assert s.kind == "decode" and s.past_length == t + k
            assert s.feed["inputs_embeds"].shape[1] == 1
            assert s.token == teacher[k]                                   # teacher forcing with the answer
            np.testing.assert_allclose(s.feed["inputs_embeds"][0, 0], ctx.embed([teacher[k]])[0])
            for n, a in s.feed.items():
                if n.startswith("past_key_values."):
                    assert a.shape[2] == t + k and np.abs(a).sum() > 0        # real KV, not zeros
            assert s.feed["attention_mask"].shape == (1, t + k + 1)
            np.testing.assert_array_equal(s.feed["position_ids"], [[t + k]])
    # the samples run, and the decode sample's past is the fp32 decoder's own present after the prefill
    first = by_item[items[0].id]
    outs = sess.run(None, first[0].feed)
    names = [o.name for o in sess.get_outputs()]
    present = dict(zip(names, outs))
    np.testing.assert_allclose(first[1].feed["past_key_values.0.key"], present["present.0.key"], rtol=1e-5, atol=1e-6)
    sess.run(None, first[1].feed)
    # the ORT CalibrationDataReader protocol yields the same number of feeds
    n = 0
    while reader.get_next() is not None:
        n += 1
    assert n == len(samples)


def test_decoder_reader_drives_a_shared_buffer_decoder(tmp_path_factory):
    """GroupQueryAttention graph: fixed-length past buffers, no position_ids, the mask carries the positions; a
    decode sample's past is the graph's own present after the prefill (rows 0..t-1), and its logits equal a prefill
    of the whole sequence."""
    pytest.importorskip("onnxruntime_genai")
    from edgevlm.bundle import read_bundle
    from edgevlm.quant.calibration import BundleContext, DecoderCalibrationReader, embedded_items

    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph="gqa")
    b = read_bundle(path)
    assert b.component("decoder")["kv_cache"]["mode"] == "shared_buffer"
    gctx = BundleContext.from_manifest(b.root, b.manifest)
    items = embedded_items(2, image_size=56)
    dec = b.component_path("decoder")
    reader = DecoderCalibrationReader(gctx, items, b.component_path("vision"), dec, decode_steps=2)
    samples = list(reader.samples())
    first = [s for s in samples if s.item == items[0].id]
    prefill, step = first[0], first[1]
    t = prefill.feed["inputs_embeds"].shape[1]
    assert "position_ids" not in prefill.feed and prefill.feed["attention_mask"].shape == (1, t)
    pasts = [n for n in prefill.feed if n.startswith("past_key_values.")]
    assert pasts and all(prefill.feed[n].shape[2] == t + 3 for n in pasts)       # prompt + decode steps + 1
    assert step.feed["attention_mask"].shape == (1, t + 1)
    sess = onnxruntime.InferenceSession(str(dec), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, prefill.feed)))
    np.testing.assert_allclose(step.feed["past_key_values.0.key"][:, :, :t], outs["present.0.key"][:, :, :t],
                               rtol=1e-5, atol=1e-6)
    got = dict(zip(names, sess.run(None, step.feed)))["logits"][0, -1]
    whole = np.concatenate([prefill.feed["inputs_embeds"], step.feed["inputs_embeds"]], axis=1)
    full = {**prefill.feed, "inputs_embeds": whole, "attention_mask": np.ones((1, t + 1), np.int64)}
    want = dict(zip(names, sess.run(None, full)))["logits"][0, -1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_decoder_reader_without_answers_uses_greedy_tokens(bundle, ctx, tmp_path):
    from edgevlm.quant.calibration import DecoderCalibrationReader, folder_items

    for i in range(2):
        write_png(tmp_path / f"img{i}.png", seed=i)
    items = folder_items(tmp_path, 2)
    assert all(i.answer is None for i in items)
    reader = DecoderCalibrationReader(ctx, items, bundle.component_path("vision"), bundle.component_path("decoder"),
                                      decode_steps=2)
    samples = list(reader.samples())
    assert [s.kind for s in samples].count("prefill") == 2
    assert any(s.kind == "decode" and s.past_length > 0 for s in samples)


# ---- user sources -----------------------------------------------------------------------------------------------
def test_user_folder_of_images(tmp_path, ctx):
    from edgevlm.quant.calibration import CalibrationSpec, VisionCalibrationReader, calibration_items, calibration_set

    for i in range(5):
        write_png(tmp_path / f"{i:02d}.png", seed=i)
    (tmp_path / "notes.txt").write_text("not an image")
    items = calibration_items(tmp_path, 3)
    assert [i.id for i in items] == ["00", "01", "02"]
    prompts = CalibrationSpec.load().prompts
    assert [i.question for i in items] == [prompts[k % len(prompts)] for k in range(3)]
    reader = VisionCalibrationReader(items, ctx.preprocess)
    assert reader.get_next()["pixel_values"].shape == (1, 3, ctx.preprocess.image_size, ctx.preprocess.image_size)
    cs = calibration_set(tmp_path, 3, heldout_samples=4)
    assert len(cs.items) == 3 and [i.id for i in cs.heldout] == ["03", "04"]     # the rest, disjoint
    assert cs.info["heldout"]["kind"] == "folder"


def test_llava_json(tmp_path, ctx):
    from edgevlm.quant.calibration import calibration_items, calibration_set

    (tmp_path / "images").mkdir()
    recs = []
    for i in range(4):
        write_png(tmp_path / "images" / f"{i}.png", seed=i)
        recs.append({"id": f"r{i}", "image": f"images/{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nWhat shape is shown?"},
                                       {"from": "gpt", "value": "circle"}]})
    (tmp_path / "calib.json").write_text(json.dumps(recs))
    items = calibration_items(tmp_path / "calib.json", 2)
    assert [i.id for i in items] == ["r0", "r1"]
    assert items[0].question == "What shape is shown?" and items[0].answer == "circle"
    assert Path(items[0].image).is_file()
    cs = calibration_set(tmp_path / "calib.json", 2, heldout_samples=5)
    assert [i.id for i in cs.heldout] == ["r2", "r3"] and cs.info["calibration"]["kind"] == "llava"


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "no_images", "empty_json", "not_json", "zero"])
def test_empty_or_missing_source_is_a_typed_error(tmp_path, kind):
    from edgevlm.quant.calibration import calibration_items

    if kind == "missing":
        src, n = tmp_path / "nope", 4
    elif kind == "empty_dir":
        src, n = tmp_path, 4
    elif kind == "no_images":
        (tmp_path / "a.txt").write_text("x")
        src, n = tmp_path, 4
    elif kind == "empty_json":
        src, n = tmp_path / "c.json", 4
        src.write_text("[]")
    elif kind == "not_json":
        src, n = tmp_path / "c.csv", 4
        src.write_text("a,b")
    else:
        src, n = None, 0
    with pytest.raises(DataError) as e:
        calibration_items(src, n)
    assert str(e.value)
