"""Training recipe: loss mask, frozen parts per stage, LoRA merge, batched eval, bad data, CLI end to end.

Tiny preset (tiny-ldpnetv2: 56 px, 16 patches, 2-layer LLaMA), a couple of dozen synthetic samples, a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevlm.config import get_model_config
from edgevlm.errors import ConfigError, DataError
from edgevlm.model import build_model, load_checkpoint
from edgevlm.preprocess import preprocess
from edgevlm.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX, build_conversation, build_prompt, tokenize_prompt
from edgevlm.train.dataset import VLMDataset, encode_conversation, encode_plain
from edgevlm.train.evaluate import generate_batch, preprocess_config
from edgevlm.train.llava_data import load_dataset
from edgevlm.train.recipe import LossModule, make_config, set_trainable, train
from edgevlm.train.synthetic import write_dataset
from edgevlm.train.tokenizer import EOS_ID, load_tokenizer

MODEL = "tiny-ldpnetv2"
FAST = dict(model=MODEL, batch_size=4, threads=1, bf16="off", progress=False, eval_split="none")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(d, train=16, val=0, test=6, image_size=56, tokenizer_vocab=384, progress=False)
    return d


@pytest.fixture(scope="module")
def tok(data):
    return load_tokenizer(data / "tokenizer")


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- loss mask ----------------------------------------------------------------------------------------------------
def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    turns = [("<image>\nWhat shape is shown?", "circle"), ("Where is the shape?", "top left")]
    ex = encode_conversation(turns, tok, bos_token_id=1)
    text, _ = build_conversation(turns)
    before, after = text.split("<image>")
    # Independent expectation: tokenize the pieces separately (questions / role tags vs. answers + </s>).
    q1 = "\nWhat shape is shown? ASSISTANT:"
    a1 = " circle</s>"
    q2 = " USER: Where is the shape? ASSISTANT:"
    a2 = " top left</s>"
    assert after == q1 + a1 + q2 + a2

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False).ids

    pieces = [([1] + enc(before), False), ([IMAGE_TOKEN_INDEX], False), (enc(q1), False), (enc(a1), True),
              (enc(q2), False), (enc(a2), True)]
    exp_ids = [i for ids, _ in pieces for i in ids]
    exp_labels = [i if sup else IGNORE_INDEX for ids, sup in pieces for i in ids]
    assert ex.input_ids == exp_ids
    assert ex.labels == exp_labels
    assert ex.input_ids == tokenize_prompt(text, tok, 1)                 # same ids as inference tokenization
    supervised = [i for i in ex.labels if i != IGNORE_INDEX]
    assert supervised.count(EOS_ID) == 2 and supervised[-1] == EOS_ID
    assert tok.decode(enc(a1)[:-1]) == "circle"


def test_plain_template_supervises_only_the_caption(tok):
    ex = encode_plain("a small red circle in the center", tok, bos_token_id=1)
    cap = tok.encode("a small red circle in the center\n", add_special_tokens=False).ids
    assert ex.input_ids == [1, IMAGE_TOKEN_INDEX] + cap
    assert ex.labels == [IGNORE_INDEX, IGNORE_INDEX] + cap


def test_dataset_batch_and_pixels_match_preprocess(data, tok):
    cfg = get_model_config(MODEL)
    recs = load_dataset(data / "train.json")
    ds = VLMDataset(recs, tok, preprocess_config(cfg))
    batch = ds.collate([0, 1, 2])
    for row in range(3):
        ref = preprocess(recs[row].image_path, preprocess_config(cfg))
        assert torch.equal(batch["pixel_values"][row], torch.from_numpy(ref))       # bit-identical
        n = len(ds.examples[row].input_ids)
        assert batch["attention_mask"][row].sum() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    # The model's splice keeps the mask: visual positions are never supervised.
    model = build_model(cfg)
    out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])
    for row in range(3):
        p = int((batch["input_ids"][row] == IMAGE_TOKEN_INDEX).nonzero())
        assert (out.spliced_labels[row, p:p + cfg.visual_tokens] == IGNORE_INDEX).all()


@pytest.mark.filterwarnings("error::FutureWarning")   # transformers' cache-keyword deprecation
def test_shared_prefix_loss_and_grads_equal_plain_forward(data, tok):
    cfg = get_model_config(MODEL)
    model = build_model(cfg)
    ds = VLMDataset(load_dataset(data / "train.json"), tok, preprocess_config(cfg))
    batch = ds.collate(range(6))
    results = []
    for share in (False, True):
        model.zero_grad()
        lm = LossModule(model, share_prefix=share)
        assert (lm.shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"]) > 0) == share
        loss = lm(**batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert results[0][1].keys() == results[1][1].keys()
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-5, rtol=1e-4)


# ---- frozen parts -------------------------------------------------------------------------------------------------
def _split(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "projector": {}, "llm": {}}
    for k, v in sd.items():
        part = "vision" if k.startswith("vision_tower.") else "projector" if k.startswith("mm_projector.") else "llm"
        parts[part][k] = v
    return parts


def test_stage1_trains_only_the_projector_and_stage2_keeps_the_tower(data, tmp_path):
    init = _split(_params(build_model(get_model_config(MODEL), seed=0)))
    train(data=str(data), out=str(tmp_path / "s1"), stages=["align"], steps=3, lr=1e-2, **FAST)
    s1 = _split(_params(load_checkpoint(tmp_path / "s1" / "checkpoint")[0]))
    for part in ("vision", "llm"):
        for k, v in init[part].items():
            assert torch.equal(s1[part][k], v), f"stage 1 changed {k}"
    assert any(not torch.equal(s1["projector"][k], v) for k, v in init["projector"].items())

    train(data=str(data), out=str(tmp_path / "s2"), stages=["instruct"], steps=3, lr=1e-2, **FAST)
    s2 = _split(_params(load_checkpoint(tmp_path / "s2" / "checkpoint")[0]))
    for k, v in init["vision"].items():
        assert torch.equal(s2["vision"][k], v), f"stage 2 changed {k}"
    assert any(not torch.equal(s2["llm"][k], v) for k, v in init["llm"].items())
    assert any(not torch.equal(s2["projector"][k], v) for k, v in init["projector"].items())


def test_tower_stage_trains_tower_and_projector_only_and_keeps_the_format(data, tmp_path):
    """Stage 0 ('tower', labels objective): the LLM is untouched, the tower and projector learn, the heads are
    dropped (the checkpoint loads strictly as a plain MobileVLM)."""
    init = _split(_params(build_model(get_model_config(MODEL), seed=0)))
    res = train(data=str(data), out=str(tmp_path / "t"), stages=["tower"], steps=3, lr=1e-2, **FAST)
    model, _ = load_checkpoint(res.checkpoint)                   # strict: no head keys, nothing missing
    sd = _split(_params(model))
    assert set(sd["llm"]) == set(init["llm"])
    for k, v in init["llm"].items():
        assert torch.equal(sd["llm"][k], v), f"tower stage changed {k}"
    assert any(not torch.equal(sd["vision"][k], v) for k, v in init["vision"].items())
    assert any(not torch.equal(sd["projector"][k], v) for k, v in init["projector"].items())
    stage = res.log["stages"][0]
    assert stage["template"] == "labels" and stage["parameters"]["heads"]["trainable"] > 0
    assert set(stage["head_accuracy_train"]) == {"shape", "color", "count", "position", "size"}


def test_attribute_labels_from_single_and_multi_turn_records(tmp_path):
    from edgevlm.train.tower import AttributeLabels
    from edgevlm.train.synthetic import answer_vocabulary

    d = tmp_path / "mt"
    write_dataset(d, train=12, val=0, test=0, image_size=56, multi_turn=True, progress=False)
    recs = load_dataset(d / "train.json")
    lab = AttributeLabels.from_records(recs)
    vocab = answer_vocabulary()
    for row, r in enumerate(recs):                              # independent: every turn's answer, by its type
        for (q, a), t in zip(r.turns, r.extra["question_types"]):
            assert lab.answers[t][int(lab.matrix[row, lab.types.index(t)])] == a
        asked = set(r.extra["question_types"])
        for t in set(lab.types) - asked:
            assert int(lab.matrix[row, lab.types.index(t)]) == IGNORE_INDEX
    assert all(set(lab.answers[t]) <= set(vocab[t]) for t in lab.types)
    single = AttributeLabels.from_records(load_dataset(data_dir_single(tmp_path) / "train.json"))
    assert single.num_labels == 12                              # one typed answer per single-question record


def data_dir_single(tmp_path: Path) -> Path:
    d = tmp_path / "single"
    write_dataset(d, train=12, val=0, test=0, image_size=56, progress=False)
    return d


def test_tower_stage_refuses_untyped_data_and_writes_nothing(data, tmp_path):
    src = json.loads((data / "train.json").read_text())
    d = tmp_path / "untyped"
    (d / "images").mkdir(parents=True)
    for r in src:
        (d / r["image"]).write_bytes((data / r["image"]).read_bytes())
        r.pop("question_type", None)
    (d / "train.json").write_text(json.dumps(src))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="question type"):
        train(data=str(d), out=str(out), stages=["tower"], steps=1, **FAST)
    assert not out.exists()
    with pytest.raises(ConfigError, match="LLM"):
        make_config(model=MODEL, stages=[{"name": "t", "preset": "tower", "train": ["vision", "llm"], "steps": 1}])


def test_vision_stage_trains_the_used_tower_layers_only():
    model = build_model(get_model_config(MODEL))
    set_trainable(model, ("vision", "projector", "llm"))
    clip = model.vision_tower.clip
    vm = clip.vision_model if hasattr(clip, "vision_model") else clip
    used = model.vision_tower.num_used_layers
    assert all(p.requires_grad for p in vm.encoder.layers[used - 1].parameters())
    assert not any(p.requires_grad for p in vm.encoder.layers[used:].parameters())
    assert not any(p.requires_grad for p in vm.post_layernorm.parameters())


def test_lora_is_merged_into_a_standard_checkpoint(data, tmp_path):
    init = _split(_params(build_model(get_model_config(MODEL), seed=0)))
    res = train(data=str(data), out=str(tmp_path / "lora"), stages=["instruct"], steps=2, lr=1e-2, lora_r=4,
                lora_alpha=8, **FAST)
    model, _ = load_checkpoint(res.checkpoint)                     # strict: no lora_* keys, nothing missing
    sd = _split(_params(model))
    assert not any("lora" in k for k in model.state_dict())
    changed = [k for k, v in init["llm"].items() if not torch.equal(sd["llm"][k], v)]
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj")) for k in changed)
    assert all(torch.equal(sd["vision"][k], v) for k, v in init["vision"].items())
    stage = res.log["stages"][0]
    assert 0 < stage["parameters"]["llm"]["lora_adapters"] < stage["parameters"]["llm"]["total"]


def test_grad_accumulation_matches_one_big_batch(data, tmp_path):
    # adam_eps 1e-6: Adam divides by |g|, so float-rounding noise on near-zero gradients would otherwise be amplified.
    kw = dict(FAST, data=str(data), stages=["vision"], steps=2, lr=1e-3, batch_size=8, adam_eps=1e-6)
    a = train(out=str(tmp_path / "a"), grad_accum=1, **kw)
    b = train(out=str(tmp_path / "b"), grad_accum=4, **kw)
    sa, sb = _params(load_checkpoint(a.checkpoint)[0]), _params(load_checkpoint(b.checkpoint)[0])
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=0)
    assert [s["loss"] for s in a.log["steps"]] == pytest.approx([s["loss"] for s in b.log["steps"]], rel=1e-5)


# ---- evaluation ---------------------------------------------------------------------------------------------------
def test_batched_greedy_equals_one_by_one_generate(data, tok):
    cfg = get_model_config(MODEL)
    model = build_model(cfg, seed=1).eval()
    recs = load_dataset(data / "test.json")
    questions = [r.turns[0][0] + " Answer briefly." * (i % 3) for i, r in enumerate(recs)]   # ragged lengths
    prompts = [tokenize_prompt(build_prompt(q), tok, 1) for q in questions]
    px = torch.from_numpy(np.stack([preprocess(r.image_path, preprocess_config(cfg)) for r in recs]))
    batched = generate_batch(model, prompts, px, max_new_tokens=5)
    for i, p in enumerate(prompts):
        assert batched[i] == model.generate(p, px[i:i + 1], max_new_tokens=5)


# ---- bad data -----------------------------------------------------------------------------------------------------
def _bad_dataset(root: Path, kind: str, src: Path) -> Path:
    d = root / kind
    (d / "images").mkdir(parents=True)
    records = json.loads((src / "train.json").read_text())[:4]
    for r in records:
        (d / r["image"]).write_bytes((src / r["image"]).read_bytes())
    if kind == "missing_image":
        records[2]["image"] = "images/nope.png"
    elif kind == "no_image_token":
        records[1]["conversations"][0]["value"] = "What shape is shown?"
    elif kind == "corrupt_image":
        (d / records[3]["image"]).write_bytes(b"not a png")
    text = json.dumps(records)
    if kind == "bad_json":
        text = text[:-10]
    (d / "train.json").write_text(text)
    return d


@pytest.mark.parametrize("kind", ["missing_image", "bad_json", "no_image_token", "corrupt_image"])
def test_bad_data_raises_typed_error_and_writes_nothing(data, tmp_path, kind):
    bad = _bad_dataset(tmp_path, kind, data)
    out = tmp_path / "out"
    with pytest.raises(DataError):
        train(data=str(bad), out=str(out), stages=["instruct"], steps=1, **FAST)
    assert not out.exists()


def test_config_errors_are_typed(tmp_path):
    with pytest.raises(ConfigError):
        make_config(model=MODEL, stages=["nope"])
    with pytest.raises(ConfigError):
        make_config(model=MODEL, bf16="maybe")
    with pytest.raises(ConfigError):
        make_config(model=MODEL, stages=[{"name": "x", "train": ["eyes"], "steps": 1}])
    (tmp_path / "r.toml").write_text('model = "demo"\nbatchsize = 3\n')
    with pytest.raises(ConfigError, match="batchsize"):
        make_config(tmp_path / "r.toml")


def test_recipe_files_parse_and_flags_win():
    files = sorted(Path(__file__).resolve().parents[1].glob("configs/train/*.toml"))
    assert files
    for f in files:
        cfg = make_config(f)
        assert cfg.stages
    demo = make_config(Path(__file__).resolve().parents[1] / "configs/train/demo.toml", lr=1e-4, steps=3,
                       stages=["instruct"], data="somewhere")
    assert [s.name for s in demo.stages] == ["instruct"]
    assert demo.stages[0].lr == 1e-4 and demo.stages[0].steps == 3
    assert demo.data == "somewhere" and not demo.synthetic


# ---- CLI end to end -------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("error::FutureWarning")   # transformers' cache-keyword deprecation
def test_cli_train_then_eval(data, tmp_path, capsys):
    from edgevlm.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--model", MODEL, "--data", str(data), "--stages", "vision", "instruct", "--steps", "2",
               "--batch-size", "4", "--threads", "1", "--bf16", "off", "--no-progress", "--out", str(out)])
    assert rc == 0
    model, cfg = load_checkpoint(out / "checkpoint")
    assert cfg.projector_type == "ldpnetv2"
    assert (out / "checkpoint" / "tokenizer.json").is_file()
    tlog = json.loads((out / "train_log.json").read_text())
    assert len(tlog["steps"]) == 4 and [s["name"] for s in tlog["stages"]] == ["vision", "instruct"]
    assert tlog["eval"]["total"] == 6 and "cpu" in tlog["environment"]
    assert "exact match" in capsys.readouterr().out

    rc = main(["eval", "--checkpoint", str(out / "checkpoint"), "--data", str(data), "--out",
               str(tmp_path / "eval.json"), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "exact match" in printed and "shape" in printed
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["total"] == 6 and set(res["per_type"]) <= {"shape", "color", "count", "position", "size"}

    # A second run into the same directory needs --overwrite.
    assert main(["train", "--model", MODEL, "--data", str(data), "--steps", "1", "--out", str(out),
                 "--no-progress"]) == 2
