"""The ORT-CPU contrib-op decoder (onnxruntime-genai builder): I/O contract, shared-buffer KV driver, parity.

Tiny config (2 layers, d=64): the fp32 graph reproduces ``LlamaForCausalLM`` logits (given ``inputs_embeds``) for a
prefill and three decode steps; the int4 graph stays close (cosine) and mostly agrees on greedy tokens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from edgevlm.model.hf_compat import cache_of, with_cache
from edgevlm.errors import ConfigError

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]


def _genai_or_skip():
    pytest.importorskip("onnxruntime_genai",
                        reason="onnxruntime-genai is not installed (pip install 'edgevlm[export]'); "
                               "the ORT-CPU decoder is built with its model builder")


def _driver_module():
    spec = importlib.util.spec_from_file_location("ort_decoder_bench", ROOT / "benchmarks" / "ort_decoder_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_llm():
    from edgevlm.config import get_model_config
    from edgevlm.model.vlm import build_model

    return build_model(get_model_config("tiny-ldpnetv2"), seed=0).llm.eval()


@pytest.fixture(scope="module")
def built(tiny_llm, tmp_path_factory):
    _genai_or_skip()
    from edgevlm.exporter.ort_decoder import build_ort_decoder

    out = {}
    for prec in ("fp32", "int4"):
        d = tmp_path_factory.mktemp(f"ortdec-{prec}")
        out[prec] = (d, build_ort_decoder(tiny_llm, d, precision=prec, max_context=64))
    return out


def _session(d: Path, entry: dict, threads: int = 1):
    bench = _driver_module()
    sess = ort.InferenceSession(str(d / entry["file"]), bench.session_options(threads),
                                providers=["CPUExecutionProvider"])
    kv = entry["kv_cache"]
    return bench.SharedKVDecoder(sess, num_layers=kv["num_layers"], kv_heads=kv["num_kv_heads"],
                                 head_dim=kv["head_dim"], max_length=kv["max_length"])


def _reference(llm, prompt: np.ndarray, steps: list[np.ndarray]) -> list[np.ndarray]:
    """PyTorch logits of the last position: prefill, then one per decode embedding."""
    out = []
    with torch.no_grad():
        r = llm(inputs_embeds=torch.from_numpy(prompt), use_cache=True)
        out.append(r.logits[0, -1].numpy())
        past = cache_of(r)
        for e in steps:
            r = llm(inputs_embeds=torch.from_numpy(e), **with_cache(past), use_cache=True)
            past = cache_of(r)
            out.append(r.logits[0, -1].numpy())
    return out


def test_bad_arguments_are_config_errors(tiny_llm, tmp_path):
    from edgevlm.exporter.ort_decoder import build_ort_decoder

    with pytest.raises(ConfigError, match="precision"):
        build_ort_decoder(tiny_llm, tmp_path, precision="int3")
    with pytest.raises(ConfigError, match="block_size"):
        build_ort_decoder(tiny_llm, tmp_path, block_size=48)
    with pytest.raises(ConfigError, match="lm_head"):
        build_ort_decoder(tiny_llm, tmp_path, precision="fp32", lm_head="int4")


def test_entry_describes_the_contract(built, tiny_llm):
    d, entry = built["int4"]
    c = tiny_llm.config
    assert (d / "decoder.onnx").is_file() and (d / "decoder.onnx.data").is_file()
    assert entry["contrib_ops"] is True and entry["logits"] == "last_position"
    hist = entry["op_histogram"]
    assert hist["com.microsoft::GroupQueryAttention"] == c.num_hidden_layers
    assert hist["com.microsoft::MatMulNBits"] == 5 * c.num_hidden_layers + 1      # qkv, o, gate, up, down + lm_head
    assert entry["recipe"]["block_size"] == 32 and entry["recipe"]["accuracy_level"] == 4
    kv = entry["kv_cache"]
    assert kv["mode"] == "shared_buffer" and kv["max_length"] == 64 and kv["layout"] == "batch,heads,seq,head_dim"
    ins = {t["name"]: t for t in entry["inputs"]}
    outs = {t["name"]: t for t in entry["outputs"]}
    assert set(ins) == {"inputs_embeds", "attention_mask"} | {
        f"past_key_values.{i}.{k}" for i in range(c.num_hidden_layers) for k in ("key", "value")}
    assert ins["inputs_embeds"]["shape"] == ["batch", "seq", c.hidden_size]
    assert ins["attention_mask"]["dtype"] == "int64"
    assert outs["logits"]["shape"] == ["batch", 1, c.vocab_size]
    assert ins["past_key_values.0.key"]["shape"][1:] == [c.num_key_value_heads, "past_seq", 16]
    fp32 = built["fp32"][1]
    assert "com.microsoft::MatMulNBits" not in fp32["op_histogram"] and fp32["precision"] == "fp32"


def test_fp32_matches_pytorch_prefill_and_decode(built, tiny_llm):
    d, entry = built["fp32"]
    rng = np.random.default_rng(0)
    D = tiny_llm.config.hidden_size
    prompt = rng.standard_normal((1, 11, D), dtype=np.float32)
    steps = [rng.standard_normal((1, 1, D), dtype=np.float32) for _ in range(3)]
    ref = _reference(tiny_llm, prompt, steps)
    dec = _session(d, entry)
    got = [dec.prefill(prompt)[0]] + [dec.step(e)[0] for e in steps]
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=1e-4)
    # a second request on the same buffers starts over (prefill ignores the old cache contents)
    np.testing.assert_allclose(dec.prefill(prompt)[0], ref[0], atol=1e-4, rtol=1e-4)
    assert dec.length == prompt.shape[1]


def test_int4_stays_close_and_greedy_mostly_agrees(built, tiny_llm):
    d, entry = built["int4"]
    table = tiny_llm.model.embed_tokens.weight.detach().numpy()
    rng = np.random.default_rng(1)
    prompt = table[rng.integers(3, table.shape[0], size=9)][None]
    dec = _session(d, entry)
    tokens, _ = dec.generate(prompt, table, 6)
    # PyTorch greedy from the same prompt
    ref_tokens, cos = [], []
    with torch.no_grad():
        r = tiny_llm(inputs_embeds=torch.from_numpy(prompt), use_cache=True)
        past, logits = cache_of(r), r.logits[0, -1]
        dec2 = _session(d, entry)
        q = dec2.prefill(prompt)[0]
        for t in range(6):
            cos.append(float(np.dot(q, logits.numpy()) / np.linalg.norm(q) / np.linalg.norm(logits.numpy())))
            ref_tokens.append(int(logits.argmax()))
            nxt = ref_tokens[-1]                       # teacher-force the reference token into both
            r = tiny_llm(inputs_embeds=torch.from_numpy(table[nxt][None, None]), **with_cache(past), use_cache=True)
            past, logits = cache_of(r), r.logits[0, -1]
            q = dec2.step(table[nxt][None, None])[0]
    assert min(cos) > 0.99, cos
    agree = sum(a == b for a, b in zip(tokens, ref_tokens))
    assert agree >= 4, (tokens, ref_tokens)


def test_fp32_chunked_prefill_continues_the_cache(built, tiny_llm):
    """Batch 1: a prompt fed in two chunks (seq > 1 with a non-empty cache) equals the one-shot prefill."""
    d, entry = built["fp32"]
    prompt = np.random.default_rng(2).standard_normal((1, 11, tiny_llm.config.hidden_size), dtype=np.float32)
    ref = _reference(tiny_llm, prompt, [])[0]
    dec = _session(d, entry)
    dec.prefill(prompt[:, :6])
    np.testing.assert_allclose(dec.step(prompt[:, 6:])[0], ref, atol=1e-4, rtol=1e-4)
    assert dec.length == 11
