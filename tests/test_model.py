"""The PyTorch MobileVLM: parameter counts, projector semantics, vision feature selection, KV-cached decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgevlm.model.hf_compat import cache_of, with_cache
from edgevlm.config import get_model_config, model_names
from edgevlm.errors import ConfigError, PromptError
from edgevlm.model import MobileVLM, SamplingConfig, build_model, count_parameters_meta
from edgevlm.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX

TINY = ["tiny-ldpnet", "tiny-ldpnetv2", "tiny-mlp2x_gelu"]


def test_reference_parameter_counts_on_meta_device():
    v1 = count_parameters_meta(get_model_config("mobilevlm-1.7b"))
    v2 = count_parameters_meta(get_model_config("mobilevlm-v2-1.7b"))
    assert v1["projector"] == 18_936_832                   # LDP v1, D=2048
    assert v2["projector"] == 6_316_032                    # LDPv2, D=2048
    assert v1["llm"] == 1_364_297_728                      # MobileLLaMA-1.4B, untied head
    assert v1["vision"] == 303_507_456                     # CLIP ViT-L/14-336 (CLIPVisionModel)
    assert v2["vision"] == v1["vision"]


@pytest.mark.parametrize("name", model_names())
def test_analytic_counts_match_the_built_model(name):
    cfg = get_model_config(name)
    assert count_parameters_meta(cfg) == cfg.num_params()


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        get_model_config("mobilevlm-1.7")
    assert "mobilevlm-1.7b" in str(e.value) and "tiny-ldpnet" in str(e.value)


def test_pooled_budget_only_for_ldpnetv2():
    assert get_model_config("mobilevlm-v2-1.7b@64").visual_tokens == 64
    assert get_model_config("mobilevlm-v2-1.7b@36").visual_tokens == 36
    with pytest.raises(ConfigError):
        get_model_config("mobilevlm-1.7b@64")
    with pytest.raises(ConfigError):
        get_model_config("mobilevlm-v2-1.7b@50")


def test_vision_tower_selects_second_to_last_layer_without_cls():
    torch.manual_seed(0)
    model = build_model(get_model_config("tiny-ldpnet")).eval()
    px = torch.randn(2, 3, 56, 56)
    ref = model.vision_tower.clip(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    ours = model.vision_tower(px)
    assert ours.shape == (2, 16, 32)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def _ln2d(x, w, b):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, 1e-5).permute(0, 3, 1, 2)


def _ldp_reference(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """LDP v1 written from the released code's layer list (reference/mobilevlm.md §2.1), key by key."""
    p = "model."
    x = F.linear(x, sd[p + "mlp.1.weight"], sd[p + "mlp.1.bias"])
    x = F.linear(F.gelu(x), sd[p + "mlp.3.weight"], sd[p + "mlp.3.bias"])
    b, n, d = x.shape
    h = math.isqrt(n)
    x = x.permute(0, 2, 1).reshape(b, d, h, h)
    for k, stride in ((1, 1), (2, 2)):
        q = f"{p}mb_block.{k}.block."
        y = F.conv2d(x, sd[q + "0.0.weight"], stride=stride, padding=1, groups=d)
        y = F.hardswish(_ln2d(y, sd[q + "0.1.weight"], sd[q + "0.1.bias"]))
        s = F.adaptive_avg_pool2d(y, 1)
        s = F.relu(F.conv2d(s, sd[q + "1.fc1.weight"], sd[q + "1.fc1.bias"]))
        s = F.hardsigmoid(F.conv2d(s, sd[q + "1.fc2.weight"], sd[q + "1.fc2.bias"]))
        y = y * s
        y = _ln2d(F.conv2d(y, sd[q + "2.0.weight"]), sd[q + "2.1.weight"], sd[q + "2.1.bias"])
        x = x + y if stride == 1 else y
    return x.flatten(2).permute(0, 2, 1)


def _ldpv2_reference(sd: dict, x: torch.Tensor, side: int) -> torch.Tensor:
    x = F.linear(x, sd["mlp.mlp.0.weight"], sd["mlp.mlp.0.bias"])
    x = F.linear(F.gelu(x), sd["mlp.mlp.2.weight"], sd["mlp.mlp.2.bias"])
    b, n, d = x.shape
    h = math.isqrt(n)
    x = F.adaptive_avg_pool2d(x.permute(0, 2, 1).reshape(b, d, h, h), side)
    x = F.conv2d(x, sd["peg.peg.0.weight"], sd["peg.peg.0.bias"], padding=1, groups=d) + x
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("name,expected_tokens", [("tiny-ldpnet", 4), ("tiny-ldpnetv2", 4), ("tiny-mlp2x_gelu", 16)])
def test_projectors_follow_the_released_layers(name, expected_tokens):
    torch.manual_seed(0)
    model = build_model(get_model_config(name)).eval()
    # randomise LayerNorm affine params too, so a wrong order of LN / act / SE shows up
    with torch.no_grad():
        for prm in model.mm_projector.parameters():
            prm.normal_(0, 0.3)
    feats = torch.randn(2, 16, 32)
    out = model.mm_projector(feats)
    assert out.shape == (2, expected_tokens, 64)
    sd = model.mm_projector.state_dict()
    if name == "tiny-ldpnet":
        ref = _ldp_reference(sd, feats)
    elif name == "tiny-ldpnetv2":
        ref = _ldpv2_reference(sd, feats, 2)
    else:
        ref = F.linear(F.gelu(F.linear(feats, sd["0.weight"], sd["0.bias"])), sd["2.weight"], sd["2.bias"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_ldp_v1_full_size_token_grid():
    cfg = get_model_config("mobilevlm-1.7b")
    assert cfg.visual_tokens == 144 and get_model_config("mobilevlm-1.7b-mlp").visual_tokens == 576


def test_pooled_ldpnetv2_budget_in_model():
    from edgevlm.model.projectors import build_projector

    cfg = get_model_config("tiny-ldpnetv2").with_visual_tokens(1)
    proj = build_projector(cfg)
    assert proj(torch.randn(1, 16, 32)).shape == (1, 1, 64)


def _prompt(n_text=(5, 4)):
    a, b = n_text
    return [1] + list(range(10, 10 + a)) + [IMAGE_TOKEN_INDEX] + list(range(40, 40 + b))


def test_splice_places_image_embeddings_and_masks_labels():
    torch.manual_seed(0)
    model = build_model(get_model_config("tiny-ldpnetv2")).eval()
    ids = torch.tensor([_prompt(), _prompt((2, 7))])
    labels = ids.clone()
    img = torch.randn(2, 4, 64)
    s = model.splice(ids, img, labels=labels)
    assert s.inputs_embeds.shape == (2, ids.shape[1] + 3, 64)
    assert s.image_start == [6, 3]
    torch.testing.assert_close(s.inputs_embeds[0, 6:10], img[0])
    torch.testing.assert_close(s.inputs_embeds[1, 3:7], img[1])
    torch.testing.assert_close(s.inputs_embeds[0, 10], model.embed_tokens(torch.tensor(40)))
    assert (s.labels[0, 6:10] == IGNORE_INDEX).all() and s.labels[0, 10] == 40
    with pytest.raises(PromptError):
        model.splice(torch.tensor([[1, 2, 3]]), img[:1])


@pytest.mark.parametrize("name", TINY)
def test_kv_cached_decoding_equals_full_forward(name):
    from transformers import DynamicCache

    torch.manual_seed(0)
    model = build_model(get_model_config(name)).eval()
    ids = torch.tensor([_prompt()])
    px = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        img = model.encode_images(px)
        s = model.splice(ids, img)
        extra = torch.tensor([[7, 8, 9, 11]])
        full_emb = torch.cat([s.inputs_embeds, model.embed_tokens(extra)], dim=1)
        full = model.llm(inputs_embeds=full_emb).logits                          # [1, T+4, V]
        cache = DynamicCache()
        out = model.llm(inputs_embeds=s.inputs_embeds, **with_cache(cache), use_cache=True)
        steps = [out.logits[:, -1]]
        n = s.inputs_embeds.shape[1]
        for j in range(extra.shape[1]):
            o = model.llm(inputs_embeds=model.embed_tokens(extra[:, j:j + 1]), **with_cache(cache),
                          position_ids=torch.tensor([[n + j]]), use_cache=True)
            steps.append(o.logits[:, -1])
    inc = torch.stack(steps, dim=1)                                               # [1, 5, V]
    ref = full[:, n - 1:]
    assert (inc - ref).abs().max().item() <= 1e-5


@pytest.mark.filterwarnings("error::FutureWarning")   # transformers' cache-keyword deprecation
def test_generate_greedy_is_deterministic_and_matches_argmax_rollout():
    torch.manual_seed(0)
    model = build_model(get_model_config("tiny-ldpnetv2")).eval()
    px = torch.randn(1, 3, 56, 56)
    prompt = _prompt()
    a = model.generate(prompt, px, max_new_tokens=6, eos_token_id=-1)
    assert len(a) == 6 and a == model.generate(prompt, px, max_new_tokens=6, eos_token_id=-1)
    # rollout without a cache
    ids = list(prompt)
    with torch.no_grad():
        for tok in a:
            out = model(torch.tensor([ids]), px)
            assert int(out.logits[0, -1].argmax()) == tok
            ids.append(tok)


def test_generate_sampling_is_seeded():
    torch.manual_seed(0)
    model = build_model(get_model_config("tiny-ldpnet")).eval()
    px = torch.randn(1, 3, 56, 56)
    s = SamplingConfig(temperature=1.0, top_k=50, top_p=0.9, seed=3)
    a = model.generate(_prompt(), px, 8, sampling=s, eos_token_id=-1)
    assert a == model.generate(_prompt(), px, 8, sampling=s, eos_token_id=-1)
    assert all(0 <= t < model.cfg.llm.vocab_size for t in a)


def test_training_forward_loss_only_on_labels():
    torch.manual_seed(0)
    model = build_model(get_model_config("tiny-ldpnet"))
    ids = torch.tensor([_prompt()])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -2:] = ids[0, -2:]
    out = model(ids, torch.randn(1, 3, 56, 56), labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert (out.spliced_labels != IGNORE_INDEX).sum() == 2
