"""Export to ONNX bundles (tiny presets, every projector): parity with PyTorch, greedy generation through the
exported graphs token for token, manifest I/O, batch 2, zero-length past / single-token steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from edgevlm.model.hf_compat import cache_of, with_cache
from edgevlm.bundle import load_embedding_table, read_bundle  # noqa: E402
from edgevlm.config import PROJECTOR_TYPES, get_model_config  # noqa: E402
from edgevlm.graphs import spec as S  # noqa: E402
from edgevlm.model import build_model  # noqa: E402
from edgevlm.prompt import IMAGE_TOKEN_INDEX, build_prompt, tokenize_prompt  # noqa: E402

PRESETS = [f"tiny-{p}" for p in PROJECTOR_TYPES]
LOGITS_ATOL = 1e-4


#: One bundle is exported for a TensorRT target (same graphs; adds the TensorRT checks and the memory plan to the
#: export). test_export_errors.py reuses it through ``export_tiny`` (one export per preset per test process).
TARGETS = {"tiny-ldpnetv2": "jetson-orin-nano"}
_EXPORTED: dict[str, tuple] = {}


def export_tiny(tmp_path_factory, name: str):
    """``(bundle dir, in-memory model)`` for a tiny preset: random init (seed 0), parity on, portable decoder graph
    (these tests drive the Optimum past/present contract by hand), exported once."""
    if name not in _EXPORTED:
        from edgevlm.pipeline import export_bundle

        model = build_model(get_model_config(name), seed=0).eval()
        path = export_bundle(name, tmp_path_factory.mktemp("export") / name, model=model, random_init=True, seed=0,
                             target=TARGETS.get(name), decoder_graph="portable")    # the Optimum contract
        _EXPORTED[name] = (path, model)
    return _EXPORTED[name]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{preset: (bundle dir, in-memory model)} for every projector type."""
    return {name: export_tiny(tmp_path_factory, name) for name in PRESETS}


def _session(bundle, component):
    return ort.InferenceSession(str(bundle.component_path(component)), providers=["CPUExecutionProvider"])


def _empty_past(cfg, batch):
    c = cfg.llm
    z = np.zeros((batch, c.num_kv_heads, 0, c.head_dim), np.float32)
    return {n: z for n in S.past_names(c.num_layers)}


def _decoder_run(sess, embeds, past, past_len):
    b, t, _ = embeds.shape
    feed = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": np.ones((b, past_len + t), np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + t, dtype=np.int64), (b, t)).copy(),
            **past}
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feed)))
    presents = {p: outs[p.replace("past_key_values", "present")] for p in past}
    return outs["logits"], presents


# ---- manifest ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_manifest_lists_io_kv_and_parity(exported, name):
    path, model = exported[name]
    b = read_bundle(path)                                        # validates schema, files, sha256
    cfg = model.cfg
    m = b.manifest
    assert m["model"]["random_init"] is True and m["model"]["name"] == name
    assert any("random-init" in n for n in m["notes"])
    assert m["tokenizer"]["stand_in"] is True and (path / m["tokenizer"]["file"]).is_file()
    assert m["visual_tokens"] == cfg.visual_tokens and m["preprocess"]["image_size"] == cfg.vision.image_size
    assert m["prompt"]["image_token_index"] == IMAGE_TOKEN_INDEX and m["prompt"]["chunkwise_tokenization"] is True

    vis, emb, dec = (m["components"][k] for k in ("vision", "embed", "decoder"))
    assert vis["inputs"] == [S.vision_spec(cfg).inputs[0].to_dict()]
    assert vis["outputs"][0]["shape"] == ["batch", cfg.visual_tokens, cfg.llm.hidden_size]
    assert [i["name"] for i in dec["inputs"]] == S.decoder_spec(cfg).input_names
    assert [o["name"] for o in dec["outputs"]] == S.decoder_spec(cfg).output_names
    io = {i["name"]: i for i in dec["inputs"] + dec["outputs"]}
    assert io["inputs_embeds"]["shape"] == ["batch", "seq", cfg.llm.hidden_size]
    assert io["attention_mask"] == {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past_seq + seq"]}
    assert io["position_ids"]["dtype"] == "int64"
    kv_shape = ["batch", cfg.llm.num_kv_heads, "past_seq", cfg.llm.head_dim]
    assert io["past_key_values.1.value"]["shape"] == kv_shape
    assert io["present.0.key"]["shape"] == ["batch", cfg.llm.num_kv_heads, "past_seq + seq", cfg.llm.head_dim]
    assert io["logits"]["shape"] == ["batch", 1, cfg.llm.vocab_size]
    assert dec["kv_cache"]["num_layers"] == cfg.llm.num_layers and dec["kv_cache"]["layout"] == S.KV_LAYOUT
    assert dec["logits"] == "last_position"
    for comp in (vis, dec):
        assert comp["opset"] == 20 and comp["precision"] == "fp32" and comp["contrib_ops"] is False
        assert comp["external_data"] == [comp["file"] + ".data"]
        assert comp["nonfinite_constants"] == 0 and sum(comp["op_histogram"].values()) > 0
        assert comp["parity"]["passed"] is True
    assert emb == {**emb, "file": "embed_tokens.npy", "kind": "table", "dtype": "float32",
                   "shape": [cfg.llm.vocab_size, cfg.llm.hidden_size]}
    checks = {c["check"]: c for c in dec["parity"]["checks"]}
    for bsz in (1, 2):
        for check in [f"prefill_b{bsz}"] + [f"decode_b{bsz}_step{k}" for k in (1, 2, 3)]:
            assert checks[check]["output"] == "logits" and checks[check]["max_abs_diff"] <= LOGITS_ATOL
    assert vis["parity"]["checks"][0]["shape"][0] == 2                      # batch 2
    json.dumps(m, allow_nan=False)


# ---- numerics ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_prefill_and_decode_steps_match_pytorch(exported, name):
    """Independent of parity.py: prefill (past 0) then 3 steps feeding ORT's own presents back, batch 2."""
    from transformers import DynamicCache

    path, model = exported[name]
    cfg = model.cfg
    sess = _session(read_bundle(path), "decoder")
    g = torch.Generator().manual_seed(123)
    emb = torch.randn(2, 9, cfg.llm.hidden_size, generator=g)
    with torch.no_grad():
        ref = model.llm(inputs_embeds=emb, **with_cache(DynamicCache()), use_cache=True)
    logits, past = _decoder_run(sess, emb.numpy(), _empty_past(cfg, 2), 0)
    assert logits.shape == (2, 1, cfg.llm.vocab_size)
    assert np.abs(logits - ref.logits[:, -1:].numpy()).max() <= LOGITS_ATOL
    n = 9
    for _ in range(3):
        step = torch.randn(2, 1, cfg.llm.hidden_size, generator=g)
        with torch.no_grad():
            ref = model.llm(inputs_embeds=step, **with_cache(cache_of(ref)), use_cache=True,
                            position_ids=torch.full((2, 1), n))
        logits, past = _decoder_run(sess, step.numpy(), past, n)
        n += 1
        assert np.abs(logits - ref.logits.numpy()).max() <= LOGITS_ATOL
    assert past["past_key_values.0.key"].shape == (2, cfg.llm.num_kv_heads, n, cfg.llm.head_dim)
    want = cache_of(ref).layers[-1].values.numpy()
    assert np.abs(past[f"past_key_values.{cfg.llm.num_layers - 1}.value"] - want).max() <= 1e-4


@pytest.mark.parametrize("name", PRESETS)
def test_greedy_generation_through_graphs_equals_pytorch(exported, name):
    """vision.onnx -> splice with the embedding table (numpy) -> prefill -> decode, token for token."""
    from tokenizers import Tokenizer

    from edgevlm.preprocess import preprocess
    from edgevlm.train.synthetic import make_sample

    path, model = exported[name]
    b = read_bundle(path)
    cfg = b.model_config
    tok = Tokenizer.from_file(str(b.tokenizer_path))
    ids = tokenize_prompt(build_prompt("What color is the shape?"), tok, b.prompt["bos_token_id"])
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    pixels = preprocess(make_sample(3, image_size=64).image, b.preprocess_config)[None]   # [1, 3, S, S]

    steps = 12
    want = model.generate(ids, torch.from_numpy(pixels), max_new_tokens=steps, eos_token_id=-1)

    vision, decoder = _session(b, "vision"), _session(b, "decoder")
    table = load_embedding_table(b)
    image = vision.run(["image_embeds"], {"pixel_values": pixels})[0]                  # [1, V, D]
    p = ids.index(IMAGE_TOKEN_INDEX)
    embeds = np.concatenate([table[ids[:p]], image[0], table[ids[p + 1:]]])[None]      # [1, T, D]
    logits, past = _decoder_run(decoder, embeds, _empty_past(cfg, 1), 0)
    n = embeds.shape[1]
    got = []
    for _ in range(steps):
        nxt = int(np.argmax(logits[0, -1]))
        got.append(nxt)
        logits, past = _decoder_run(decoder, table[[nxt]][None], past, n)
        n += 1
    assert len(want) == steps and got == want


@pytest.mark.parametrize("name", PRESETS)
def test_batch2_vision_and_single_token_with_empty_past(exported, name):
    path, model = exported[name]
    b = read_bundle(path)
    cfg = model.cfg
    s = cfg.vision.image_size
    x = np.random.default_rng(0).standard_normal((2, 3, s, s)).astype(np.float32)
    got = _session(b, "vision").run(["image_embeds"], {"pixel_values": x})[0]
    with torch.no_grad():
        want = model.encode_images(torch.from_numpy(x)).numpy()
    assert got.shape == (2, cfg.visual_tokens, cfg.llm.hidden_size)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())

    sess = _session(b, "decoder")                                               # past_seq = 0, seq = 1, batch 2
    emb = np.random.default_rng(1).standard_normal((2, 1, cfg.llm.hidden_size)).astype(np.float32)
    logits, past = _decoder_run(sess, emb, _empty_past(cfg, 2), 0)
    with torch.no_grad():
        ref = model.llm(inputs_embeds=torch.from_numpy(emb)).logits.numpy()
    assert logits.shape == (2, 1, cfg.llm.vocab_size)
    assert np.abs(logits - ref).max() <= LOGITS_ATOL
    assert past["past_key_values.0.key"].shape == (2, cfg.llm.num_kv_heads, 1, cfg.llm.head_dim)


def test_embedding_table_is_the_models(exported):
    path, model = exported["tiny-ldpnet"]
    table = load_embedding_table(read_bundle(path))
    np.testing.assert_array_equal(table, model.llm.get_input_embeddings().weight.detach().numpy())


def test_parity_detects_a_wrong_graph(exported):
    """The parity checker fails (ExportMismatch with numbers) on graphs that belong to another model."""
    from edgevlm.errors import ExportMismatch
    from edgevlm.exporter import parity as P

    path, _ = exported["tiny-ldpnetv2"]
    other = build_model(get_model_config("tiny-ldpnetv2"), seed=1).eval()
    res = P.check_decoder(path / "decoder.onnx", P.decoder_reference(other, batches=(1,), prompt_len=4,
                                                                      decode_steps=1), S.FP32_TOLERANCES)
    assert not res.passed
    with pytest.raises(ExportMismatch) as e:
        res.raise_if_failed()
    assert e.value.component == "decoder" and e.value.max_abs_diff > e.value.tolerance
    res_v = P.check_vision(path / "vision.onnx", P.vision_reference(other), S.FP32_TOLERANCES)
    assert not res_v.passed


def test_fp16_recipe_passes_loose_parity_only(exported, tmp_path):
    """The fp16 post-processing step (keep_io_types) on copies of the fp32 graphs: float32 I/O, passes the fp16
    tolerances, and the fp32 tolerance is tighter than what fp16 achieves on the decoder."""
    import shutil

    from edgevlm.exporter import parity as P
    from edgevlm.exporter.bundle_export import resolve_recipe
    from edgevlm.exporter.onnx_export import graph_io
    from edgevlm.pipeline import float_hooks

    path, model = exported["tiny-mlp2x_gelu"]
    recipe = resolve_recipe("fp16", "jetson-orin-nano", postprocess=float_hooks())
    assert recipe.embed_dtype == "float16" and recipe.tolerances == S.FP16_TOLERANCES
    for f in ("vision.onnx", "vision.onnx.data", "decoder.onnx", "decoder.onnx.data"):
        shutil.copy(path / f, tmp_path / f)
    for name, comp in (("vision", recipe.vision), ("decoder", recipe.decoder)):
        comp.postprocess(tmp_path / f"{name}.onnx", model.cfg)
    inputs, outputs = graph_io(tmp_path / "decoder.onnx")
    assert inputs[0]["dtype"] == "float32" and outputs[0]["dtype"] == "float32"
    refs = P.decoder_reference(model, batches=(1,), prompt_len=8, decode_steps=2)
    res = P.check_decoder(tmp_path / "decoder.onnx", refs, recipe.tolerances)
    assert res.passed, res.to_dict()
    assert P.check_vision(tmp_path / "vision.onnx", P.vision_reference(model), recipe.tolerances).passed
    strict = P.check_decoder(tmp_path / "decoder.onnx", refs, S.FP32_TOLERANCES)
    assert max(c.max_abs_diff for c in strict.checks) > 1e-6


def test_unsupported_precision_is_a_typed_error(tmp_path):
    from edgevlm.errors import ConfigError, TargetError
    from edgevlm.pipeline import export_bundle

    with pytest.raises(TargetError, match="fp8"):                 # no fp8 on a CPU target
        export_bundle("tiny-ldpnet", tmp_path / "x", random_init=True, precision="fp8")
    with pytest.raises(TargetError, match="fp8"):                 # nor on Orin
        export_bundle("tiny-ldpnet", tmp_path / "x", random_init=True, precision="fp8", target="jetson-orin")
    with pytest.raises(ConfigError, match="unknown"):
        export_bundle("tiny-ldpnet", tmp_path / "x", random_init=True, precision="int3")
    assert not (tmp_path / "x").exists()


# ---- the ONNX Runtime CPU decoder graph (GroupQueryAttention, shared KV buffer) -----------------------------------
def test_cpu_export_writes_the_gqa_decoder_and_checks_it_against_pytorch(tmp_path):
    """``auto`` on the CPU target: the builder's graph, parity-checked against PyTorch (prefill, decode steps and
    the valid KV rows of the shared buffer) and described by its own KV contract in the manifest."""
    pytest.importorskip("onnxruntime_genai")
    import onnx

    from edgevlm.pipeline import export_bundle

    path = export_bundle("tiny-ldpnet", tmp_path / "b", random_init=True, seed=0)
    m = json.loads((path / "manifest.json").read_text())
    dec = m["components"]["decoder"]
    assert dec["graph"] == "gqa" and m["export"]["decoder_graph"] == "gqa"
    assert dec["kv_cache"]["mode"] == "shared_buffer" and dec["position_ids"] == "derived"
    assert dec["kv_cache"]["max_length"] == get_model_config("tiny-ldpnet").context_length
    assert dec["parity"]["passed"] and dec["parity"]["max_abs_diff"] < 1e-4
    checks = {c["check"] for c in dec["parity"]["checks"]}
    assert {"prefill_b1", "decode_b1_step1", "present_b1_final"} <= checks
    ops = {n.op_type for n in onnx.load(str(path / "decoder.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and "Concat" not in ops
    assert {i["name"] for i in dec["inputs"]} >= {"inputs_embeds", "attention_mask"}
    assert "position_ids" not in {i["name"] for i in dec["inputs"]}


def test_decoder_graph_choice_is_checked(tmp_path):
    from edgevlm.errors import ConfigError, TargetError
    from edgevlm.exporter.bundle_export import resolve_decoder_graph, resolve_recipe, resolve_target

    trt = resolve_target("jetson-orin")
    assert resolve_decoder_graph("auto", trt, resolve_recipe("fp32", trt)) == "portable"
    with pytest.raises(TargetError, match="portable"):
        resolve_decoder_graph("gqa", trt, resolve_recipe("fp32", trt))
    cpu = resolve_target("cpu")
    with pytest.raises(ConfigError, match="auto, gqa, portable"):
        resolve_decoder_graph("fused", cpu, resolve_recipe("fp32", cpu))
    assert resolve_decoder_graph("portable", cpu, resolve_recipe("fp32", cpu)) == "portable"
