"""The small presets' tokenizer: LLaMA-style special ids, save/reload both ways, exact answer round trips."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from edgevlm.config import get_model_config
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.prompt import IMAGE_TOKEN_INDEX, build_conversation, build_prompt, tokenize_prompt
from edgevlm.train import synthetic as syn
from edgevlm.train import tokenizer as tk


@pytest.fixture(scope="module")
def samples():
    return (syn.generate_samples(200, "train", seed=0, glyphs=True)
            + syn.generate_samples(60, "train", seed=0, start=200, multi_turn=True, grid=3))


@pytest.fixture(scope="module")
def tok(samples) -> Tokenizer:
    return tk.train_tokenizer_on_samples(samples, vocab_size=get_model_config("tiny-ldpnet").llm.vocab_size)


def test_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() <= 384
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert tok.encode("</s>", add_special_tokens=False).ids == [tk.EOS_ID]
    assert tok.encode(" circle</s>", add_special_tokens=False).ids[-1] == tk.EOS_ID
    assert tok.encode("red", add_special_tokens=True).ids[0] == tk.BOS_ID          # LLaMA: BOS, no EOS
    assert tok.encode("red", add_special_tokens=True).ids[-1] != tk.EOS_ID
    # template words and answers are single tokens
    for word in ("ASSISTANT:", "USER:", "assistant", "circle", "purple", "small", "bottom"):
        assert len(tok.encode(word, add_special_tokens=False).ids) == 1, word
    # unknown characters do not crash
    ids = tok.encode("naïve 😀 circle", add_special_tokens=False).ids
    assert tk.UNK_ID in ids and ids[-1] == tok.token_to_id("\u2581circle")
    tk.check_tokenizer(tok, 384)
    with pytest.raises(ConfigError, match="vocab_size"):
        tk.check_tokenizer(tok, 100)


def test_answers_round_trip_exactly(tok):
    vocab = syn.answer_vocabulary(glyphs=True, grid=3) | {"position2": list(syn.positions(2))}
    for answers in vocab.values():
        for answer in answers:
            _, spans = build_conversation([("<image>\nq?", answer)])
            ids = tok.encode(f" {answer}</s>", add_special_tokens=False).ids
            assert ids[-1] == tk.EOS_ID
            assert tok.decode(ids) == answer                                   # EOS skipped, ▁ prefix dropped
            assert tok.decode(ids[:-1]) == answer


def test_chunks_encode_like_the_whole(tok, samples):
    """Encoding the text between answer spans piece by piece gives the same ids as the whole chunk, so a trainer
    can mask labels by the spans of ``build_conversation``."""
    for s in samples[::10] + samples[-5:]:
        text, spans = build_conversation(s.turns)
        head, tail = text.split("<image>")
        offset = len(head) + len("<image>")
        pieces, prev = [], offset
        for a, b in spans:
            pieces += [text[prev:a], text[a:b]]
            prev = b
        piecewise = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
        assert piecewise == tok.encode(tail, add_special_tokens=False).ids
        assert tk.UNK_ID not in piecewise


def test_tokenize_prompt_works(tok):
    ids = tokenize_prompt(build_prompt("What shape is shown?"), tok, tk.BOS_ID)
    assert ids[0] == tk.BOS_ID and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert tk.UNK_ID not in ids and max(ids) < 384


def test_save_and_reload_both_ways(tok, samples, tmp_path):
    out = tk.save_tokenizer(tok, tmp_path / "tok", model_max_length=512)
    assert sorted(p.name for p in out.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["model_max_length"] == 512
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["pad_token"]) == ("<s>", "</s>", "<unk>",
                                                                                         "<unk>")
    fast = Tokenizer.from_file(str(out / "tokenizer.json"))
    loaded = tk.load_tokenizer(out)
    texts = [build_conversation(s.turns)[0] for s in samples[:20]] + ["\nWhat shape? ASSISTANT: red</s>", "hé"]
    for text in texts:
        want = tok.encode(text, add_special_tokens=False).ids
        assert fast.encode(text, add_special_tokens=False).ids == want
        assert loaded.encode(text, add_special_tokens=False).ids == want

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, 0)
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False).ids
    assert hf.decode(tok.encode(" top left</s>", add_special_tokens=False).ids, skip_special_tokens=True) == "top left"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        tk.load_tokenizer(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="tokenizer.json .* or tokenizer.model"):
        tk.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        tk.load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="too small"):
        tk.train_tokenizer(["a b c"], vocab_size=50)


def test_converts_a_sentencepiece_model(tmp_path, samples, capfd):
    """A checkpoint with only ``tokenizer.model`` (the released MobileVLMs) is converted through transformers,
    without transformers reading the checkpoint's ``model_type: mobilevlm`` config (no warning reaches the user)."""
    import warnings

    from edgevlm.config import get_model_config
    from edgevlm.model.checkpoint import to_hf_config

    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(build_conversation(s.turns)[0].replace("</s>", "") for s in samples))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   byte_fallback=True, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer",
                                                                "legacy": False}))
    (tmp_path / "corpus.txt").unlink()
    (tmp_path / "tokenizer.vocab").unlink()
    (tmp_path / "config.json").write_text(json.dumps({**to_hf_config(get_model_config("mobilevlm-1.7b")),
                                                      "rope_scaling": None}))
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = tk.load_tokenizer(tmp_path)
    err = capfd.readouterr().err
    assert "model of type" not in err and "deprecated" not in err, err
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], caught
    assert isinstance(tok, Tokenizer)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in ("What shape is shown? ASSISTANT: circle", "A chat between a curious user"):
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text)
    assert tok.token_to_id("</s>") == 2
    del transformers
