"""The tokenizer of the small presets: a BPE trained on the rendered training conversations, plus tokenizer I/O.

The small presets (``tiny-*``: vocab 384, ``demo``: 512) cannot afford LLaMA's 32000-token vocabulary, so their
tokenizer is trained on the text they will see: every training conversation rendered with the Vicuna v1 template
(``edgevlm.prompt.build_conversation``, system prompt included) and split on ``<image>`` exactly as
``prompt.tokenize_prompt`` splits it, so the template words and the answers become single tokens.

It behaves like LLaMA's SentencePiece tokenizer where it matters: ``<unk>`` = 0, ``<s>`` = 1 (BOS), ``</s>`` = 2
(EOS), pad = unk; a Metaspace pre-tokenizer (spaces become ``▁``, one is prepended to every chunk); ``"</s>"`` in
the text encodes to the single EOS id; unknown characters become ``<unk>``; ``decode`` gives back the text (the
prepended ``▁`` is dropped), so a decoded answer compares exactly with the reference answer.

    >>> from edgevlm.train.synthetic import generate_samples
    >>> from edgevlm.train.tokenizer import train_tokenizer_on_samples, save_tokenizer, load_tokenizer
    >>> tok = train_tokenizer_on_samples(generate_samples(2000), vocab_size=512)
    >>> save_tokenizer(tok, "out/tokenizer")            # tokenizer.json + tokenizer_config.json + special_tokens_map
    >>> tok = load_tokenizer("out/tokenizer")            # also converts a checkpoint's SentencePiece tokenizer.model

The saved directory loads with ``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import string
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from edgevlm.errors import CheckpointError, ConfigError, DataError, MissingDependency
from edgevlm.prompt import IMAGE_PLACEHOLDER, STOP_STRING, build_conversation

log = logging.getLogger(__name__)

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
PAD_ID = UNK_ID
PAD_TOKEN = UNK_TOKEN
METASPACE = "\u2581"                                  # "▁"
#: Characters always in the vocabulary, so any ASCII question tokenizes without <unk>.
BASE_ALPHABET = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\n") | {METASPACE})
DEFAULT_MODEL_MAX_LENGTH = 2048


class HasTurns(Protocol):
    """A synthetic ``Sample`` or a ``llava_data.LlavaRecord``."""

    @property
    def turns(self) -> Sequence[tuple[str, str]]: ...


def conversation_chunks(items: Iterable[Any], template_name: str = "vicuna_v1",
                        include_captions: bool = True) -> Iterator[str]:
    """The text the model will see, in the chunks ``tokenize_prompt`` encodes separately.

    Each conversation is rendered with ``build_conversation`` and split on ``<image>``; ``</s>`` (a special token,
    never split) is removed. Captions, when present, are yielded as the stage-1 "plain" chunk ``caption + "\\n"``.
    """
    for item in items:
        text, _ = build_conversation(item.turns, template_name)
        for chunk in text.split(IMAGE_PLACEHOLDER):
            chunk = chunk.replace(STOP_STRING, "")
            if chunk:
                yield chunk
        caption = getattr(item, "caption", None)
        if include_captions and caption:
            yield caption + "\n"


def new_tokenizer() -> Tokenizer:
    """An untrained BPE with the LLaMA-style special tokens, Metaspace pre-tokenizer/decoder and BOS template."""
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a BPE on ``texts`` with at most ``vocab_size`` entries (special tokens and base alphabet included)."""
    floor = len(SPECIAL_TOKENS) + len(BASE_ALPHABET)
    if vocab_size < floor:
        raise ConfigError(f"tokenizer vocab_size {vocab_size} is too small: the special tokens and the base "
                          f"alphabet alone take {floor}; ask for at least {floor + 64}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=BASE_ALPHABET,
                                  show_progress=False)
    texts = list(texts)
    if not texts:
        raise DataError("no text to train the tokenizer on; the training set is empty")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS_ID)])
    check_tokenizer(tok, vocab_size)
    log.info("trained a %d-token BPE tokenizer on %d text chunks", tok.get_vocab_size(), len(texts))
    return tok


def train_tokenizer_on_samples(items: Iterable[HasTurns], vocab_size: int, template_name: str = "vicuna_v1",
                               min_frequency: int = 2) -> Tokenizer:
    """Train on the rendered conversations (and captions) of synthetic samples or LLaVA records."""
    return train_tokenizer(conversation_chunks(items, template_name), vocab_size, min_frequency)


def check_tokenizer(tok: Tokenizer, model_vocab_size: int | None = None) -> None:
    """The special ids the model relies on, and that every token id fits the model's embedding table."""
    for token, want in zip(SPECIAL_TOKENS, (UNK_ID, BOS_ID, EOS_ID)):
        got = tok.token_to_id(token)
        if got != want:
            raise DataError(f"tokenizer maps '{token}' to id {got}, but edgevlm's small presets need {want} "
                            f"(LLaMA layout <unk>=0, <s>=1, </s>=2); retrain it with edgevlm.train.tokenizer")
    if model_vocab_size is not None and tok.get_vocab_size() > model_vocab_size:
        raise ConfigError(f"tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is "
                          f"{model_vocab_size}; retrain the tokenizer with vocab_size <= {model_vocab_size}")


def save_tokenizer(tok: Tokenizer, directory: str | Path,
                   model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> Path:
    """Write the HF layout: ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN, "pad_token": PAD_TOKEN}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": model_max_length,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "padding_side": "right", "legacy": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return directory


def _auto_tokenizer_without_model_config(auto_tokenizer: Any, directory: Path) -> Any:
    """``AutoTokenizer.from_pretrained`` on the tokenizer files only. A MobileVLM checkpoint's config.json says
    ``model_type: mobilevlm``, which transformers does not know: read from the checkpoint itself it warns ("a model
    of type mobilevlm ...") and trips deprecations of that config's fields. The tokenizer does not depend on it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="edgevlm-tok-") as tmp:
        for f in directory.iterdir():
            if f.is_file() and f.name != "config.json" and (f.name.startswith(("tokenizer", "special_tokens"))
                                                            or f.name == "added_tokens.json"):
                os.symlink(f.resolve(), Path(tmp) / f.name)
        return auto_tokenizer.from_pretrained(tmp)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a tokenizer or checkpoint directory.

    Uses ``tokenizer.json`` when present; otherwise converts a SentencePiece ``tokenizer.model`` (the released
    MobileVLM checkpoints) through ``transformers.AutoTokenizer`` (needs the ``export`` extra).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"tokenizer directory '{directory}' does not exist; pass a checkpoint or bundle "
                              f"directory that holds tokenizer.json or tokenizer.model")
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"'{path}' cannot be read as a tokenizer ({exc}); re-save it with "
                                  f"save_tokenizer or copy it again from the checkpoint") from exc
    if (directory / "tokenizer.model").is_file():
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise MissingDependency("transformers", "export",
                                    "converting a SentencePiece tokenizer.model to tokenizer.json") from exc
        try:
            hf = _auto_tokenizer_without_model_config(AutoTokenizer, directory)
        except (OSError, ValueError, TypeError, ImportError) as exc:
            raise CheckpointError(f"cannot convert '{directory / 'tokenizer.model'}' to a fast tokenizer "
                                  f"({type(exc).__name__}: {exc}); check tokenizer_config.json or install "
                                  f"sentencepiece and protobuf (pip install 'edgevlm[export]')") from exc
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise CheckpointError(f"transformers loaded '{directory}' as a slow {type(hf).__name__} with no "
                                  f"fast (tokenizers) counterpart; add a tokenizer.json to the directory")
        return backend
    raise CheckpointError(f"'{directory}' holds no tokenizer: expected tokenizer.json (fast tokenizer) or "
                          f"tokenizer.model (SentencePiece); copy them from the checkpoint or train one with "
                          f"`edgevlm synth --tokenizer-vocab N`")


__all__ = ["train_tokenizer", "train_tokenizer_on_samples", "conversation_chunks", "new_tokenizer",
           "check_tokenizer", "save_tokenizer", "load_tokenizer", "SPECIAL_TOKENS", "UNK_ID", "BOS_ID", "EOS_ID",
           "PAD_ID", "UNK_TOKEN", "BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN"]
