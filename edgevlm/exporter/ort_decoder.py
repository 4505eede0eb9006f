"""The fast ORT-CPU decoder: a LLaMA decoder graph built with onnxruntime-genai's model builder.

Where the standard exporter (``onnx_export``) produces a portable graph of standard ONNX ops (TensorRT-parsable), this
module produces an **ONNX Runtime CPU only** graph made of ``com.microsoft`` contrib ops, the fastest CPU path ORT has:

* ``MatMulNBits`` (int4 or int8 weights, block-wise, ``accuracy_level=4`` = int8 activations on VNNI / AMX),
  one packed QKV projection per layer;
* ``GroupQueryAttention`` with the rotary embedding fused (cos/sin caches inside the graph) and the KV cache
  **shared between past and present**: the runtime binds one preallocated ``[batch, kv_heads, max_length, head_dim]``
  buffer per layer and tensor to both ``past_key_values.{i}.key`` and ``present.{i}.key``; the kernel writes the new
  rows in place (no per-token concatenation, no copy of the past);
* ``SkipSimplifiedLayerNormalization`` (RMSNorm fused with the residual add);
* the last position's logits only (``logits`` is ``[batch, 1, vocab]``).

The graph is built by ``onnxruntime_genai.models.builder`` (a pure-pip package, pinned: ``onnxruntime-genai==0.18.0``)
with ``exclude_embeds=true`` (``inputs_embeds`` in, the runtime gathers from the embedding table) and
``prune_lm_head=true``. Build (workstation side, needs torch + transformers + onnxruntime-genai)::

    from edgevlm.exporter.ort_decoder import build_ort_decoder
    entry = build_ort_decoder(model.llm, "out/bundle-tmp", precision="int4", block_size=32, accuracy_level=4,
                              max_context=2048)
    # -> out/bundle-tmp/decoder.onnx + decoder.onnx.data; ``entry`` is the manifest's components["decoder"]

The I/O contract (also written into ``entry``; ``benchmarks/ort_decoder_bench.py`` has a numpy + onnxruntime driver):

    inputs   inputs_embeds              float32 [batch, seq, D]
             attention_mask             int64   [batch, past_seq + seq]     (1 = real token; positions and the
                                                                             valid cache length derive from it)
             past_key_values.{i}.key    float32 [batch, kv_heads, max_length, head_dim]   (shared buffer)
             past_key_values.{i}.value  float32 [batch, kv_heads, max_length, head_dim]
    outputs  logits                     float32 [batch, 1, vocab]            (last position only)
             present.{i}.key / .value   float32 [batch, kv_heads, max_length, head_dim]   (same buffer as the past)

There is no ``position_ids`` input: GroupQueryAttention computes positions from ``seqlens_k = sum(attention_mask) - 1``
(first prompt: ``0..seq-1``; decode step: ``past_seq``; a later prompt chunk with batch 1: ``past_seq..``).
The first call (prefill) runs with ``seq == past_seq + seq`` (``attention_mask`` of the prompt's length) and ignores
whatever the buffers hold. ``max_length`` is ``max_context`` (the cos/sin caches are that long); the attention mask's
length must never exceed it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgevlm.errors import ConfigError, ExportError, MissingDependency

log = logging.getLogger(__name__)

from edgevlm.precisions import ORT_BUILDER_PRECISIONS as PRECISIONS  # noqa: E402
LM_HEAD_PRECISIONS = PRECISIONS
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
GENAI_PIN = "onnxruntime-genai==0.18.0"

DECODER_FILE = "decoder.onnx"
PAST_KEY = "past_key_values.{i}.key"
PAST_VALUE = "past_key_values.{i}.value"
PRESENT_KEY = "present.{i}.key"
PRESENT_VALUE = "present.{i}.value"

# The builder's symbolic dims, renamed to the ones the rest of the manifest uses (edgevlm.graphs.spec).
_DIM_RENAMES = {"batch_size": "batch", "sequence_length": "seq", "total_sequence_length": "past_seq + seq",
                "past_sequence_length": "past_seq"}
_ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 16: "bfloat16", 3: "int8", 2: "uint8"}


def _import_builder():
    """Import the model builder (it appends its own folder to ``sys.path``: its modules import each other bare)."""
    try:
        import onnxruntime_genai  # noqa: F401
        from onnxruntime_genai.models import builder
    except ImportError as e:  # pragma: no cover - exercised where the package is absent
        raise MissingDependency("onnxruntime-genai", "export",
                                f"Building the ORT-CPU decoder ({GENAI_PIN}'s model builder)") from e
    return builder


def genai_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("onnxruntime-genai")
    except Exception:  # noqa: BLE001 - metadata lookup only
        return None


def _write_tokenizer_stub(hf_dir: Path) -> None:
    """The builder insists on ``AutoTokenizer.from_pretrained(dir)``; the decoder graph does not depend on it.

    A 3-token WordLevel tokenizer satisfies it (the bundle ships the real tokenizer separately)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}))


def _prepare_hf_dir(llm: Any, hf_dir: Path, max_context: int | None, write_weights: bool) -> Any:
    """config.json (+ weights when asked) + a tokenizer stub. Returns the config the builder will see."""
    import copy

    config = copy.deepcopy(llm.config)
    if max_context is not None:
        # Only the cos/sin cache length depends on it for LLaMA's default RoPE.
        config.max_position_embeddings = int(max_context)
    config.architectures = ["LlamaForCausalLM"]
    if write_weights:
        llm.save_pretrained(str(hf_dir))          # writes llm.config; overwritten below
    config.save_pretrained(str(hf_dir))
    _write_tokenizer_stub(hf_dir)
    return config


@contextlib.contextmanager
def _serve_weights_from_memory(builder_mod: Any, llm: Any):
    """Let the builder read the weights of ``llm`` instead of ``from_pretrained(dir)`` (saves writing and reading
    back the whole checkpoint, and one copy of it in memory). Falls back to the on-disk path when the builder
    class has no ``load_weights`` hook (a future builder version)."""
    base = getattr(builder_mod, "Model", None)
    if base is None or not hasattr(base, "load_weights"):
        yield False
        return
    original = base.load_weights

    def load_weights(self, input_path):  # noqa: ARG001 - same signature as the builder's
        return llm

    base.load_weights = load_weights
    try:
        yield True
    finally:
        base.load_weights = original


def _extra_options(precision: str, block_size: int, accuracy_level: int, symmetric: bool, lm_head: str,
                   last_logits_only: bool, fuse_gate_up: bool = False) -> list[str]:
    opts = ["exclude_embeds=true", f"filename={DECODER_FILE}", "hf_token=false", "hf_remote=false"]
    if fuse_gate_up:
        opts.append("fuse_mlp_gate_up=true")
    if last_logits_only:
        opts.append("prune_lm_head=true")
    if precision in ("int4", "int8"):
        opts += [f"block_size={block_size}", f"accuracy_level={accuracy_level}",
                 f"is_symmetric={'true' if symmetric else 'false'}"]
        if lm_head == "fp32":
            opts.append("nodes_to_exclude=/lm_head/MatMul")
        elif lm_head != precision:
            opts.append(f"matmul_mixed_precision=last_matmul:{lm_head}")
    return opts


def _dims(value_info: Any, head_dim: int) -> list[int | str]:
    out: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.dim_param:
            out.append(head_dim if d.dim_param == "kv_cache_dim" else _DIM_RENAMES.get(d.dim_param, d.dim_param))
        else:
            out.append(int(d.dim_value))
    return out


def _pin_head_dim(path: Path, head_dim: int) -> None:
    """The builder leaves the KV tensors' last dim symbolic (``kv_cache_dim``); pin it to ``head_dim`` so the graph
    declares the contract's static ``[batch, kv_heads, seq, head_dim]`` (graph proto only; weights untouched)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    changed = False
    for vi in list(m.graph.input) + list(m.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == "kv_cache_dim":
                d.ClearField("dim_param")
                d.dim_value = int(head_dim)
                changed = True
    if changed:
        onnx.save(m, str(path))


def inspect_decoder(path: str | os.PathLike, head_dim: int) -> dict[str, Any]:
    """I/O, opsets, op histogram and weight bytes of a built decoder (reads the graph only, not the weights)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    init_names = {t.name for t in g.initializer}
    tensor_bytes: dict[str, int] = {}
    for t in g.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            tensor_bytes[t.name] = int(ext["length"])
        else:
            tensor_bytes[t.name] = len(t.raw_data) if t.raw_data else 0
    hist = collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in g.node)
    # Bytes a decode step reads: every initializer consumed by a MatMul-like op (weights, scales, zero points)
    # plus the small norm weights; the cos/sin caches are read one row per step.
    matmul_bytes = 0
    for n in g.node:
        if n.op_type in ("MatMulNBits", "MatMul", "Gemm"):
            matmul_bytes += sum(tensor_bytes.get(i, 0) for i in n.input if i in init_names)
    rope = sum(b for name, b in tensor_bytes.items() if name in ("cos_cache", "sin_cache"))
    total = sum(tensor_bytes.values())
    mnb = [n for n in g.node if n.op_type == "MatMulNBits"]
    attrs = {}
    if mnb:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mnb[0].attribute
                 if a.name in ("bits", "block_size", "accuracy_level")}
    return {
        "inputs": [{"name": i.name, "dtype": _ONNX_DTYPES.get(i.type.tensor_type.elem_type, "?"),
                    "shape": _dims(i, head_dim)} for i in g.input if i.name not in init_names],
        "outputs": [{"name": o.name, "dtype": _ONNX_DTYPES.get(o.type.tensor_type.elem_type, "?"),
                     "shape": _dims(o, head_dim)} for o in g.output],
        "opset": {(o.domain or "ai.onnx"): int(o.version) for o in m.opset_import},
        "op_histogram": dict(sorted(hist.items(), key=lambda kv: -kv[1])),
        "contrib_ops": any(n.domain == "com.microsoft" for n in g.node),
        "weights_bytes": total,
        "decode_bytes_per_token": total - rope + (rope // max(1, _first_dim(g, "cos_cache"))),
        "matmul_weight_bytes": matmul_bytes,
        "matmulnbits": attrs,
        "lm_head": _lm_head_kind(g),
    }


def _first_dim(g: Any, name: str) -> int:
    for t in g.initializer:
        if t.name == name and t.dims:
            return int(t.dims[0])
    return 1


def _lm_head_kind(g: Any) -> str:
    import onnx

    for n in g.node:
        if n.name.startswith("/lm_head/MatMul"):
            if n.op_type == "MatMulNBits":
                bits = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}.get("bits", 4)
                return f"int{bits}"
            return "fp32"
    return "absent"


def build_ort_decoder(llm: Any, out_dir: str | os.PathLike, *, precision: str = "int4", block_size: int = 32,
                      accuracy_level: int = 4, max_context: int | None = None, symmetric: bool = True,
                      lm_head: str | None = None, last_logits_only: bool = True, fuse_gate_up: bool = False,
                      in_memory: bool = True, work_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build ``decoder.onnx`` (+ ``decoder.onnx.data``) in ``out_dir`` and return its manifest component entry.

    Args:
        llm: a ``transformers.LlamaForCausalLM`` (``MobileVLM.llm``), or the path of a Hugging Face LLaMA directory.
        out_dir: where ``decoder.onnx`` and ``decoder.onnx.data`` are written (created if missing).
        precision: ``int4`` / ``int8`` (MatMulNBits weight-only) or ``fp32``.
        block_size: quantization block along K (16..256, powers of two).
        accuracy_level: MatMulNBits compute type: 4 = int8 activations (fastest on x86 VNNI / ARM dot), 0 = default.
        max_context: KV buffer and RoPE cache length (``max_length``); default ``config.max_position_embeddings``.
        symmetric: symmetric int4/int8 (no zero points).
        lm_head: precision of the 32000 x D output projection (``int4``/``int8``/``fp32``); default = ``precision``.
        last_logits_only: logits for the last position only (``[batch, 1, vocab]``).
        fuse_gate_up: one MatMulNBits for the MLP's gate and up projections (N = 2 x ffn) + Split.
        in_memory: hand the builder the in-memory weights instead of writing and re-reading a checkpoint.
        work_dir: scratch folder (default: a temp dir beside ``out_dir``); removed afterwards.

    Raises:
        ConfigError: unknown precision / block size / accuracy level.
        MissingDependency: onnxruntime-genai is not installed (``pip install 'edgevlm[export]'``).
        ExportError: the builder failed or produced a graph without the expected I/O.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown ORT decoder precision '{precision}'; known: {', '.join(PRECISIONS)}")
    lm_head = lm_head or precision
    if lm_head not in LM_HEAD_PRECISIONS:
        raise ConfigError(f"unknown lm_head precision '{lm_head}'; known: {', '.join(LM_HEAD_PRECISIONS)}")
    if precision == "fp32" and lm_head != "fp32":
        raise ConfigError("a quantized lm_head needs a quantized body: use precision int4/int8 with lm_head "
                          f"'{lm_head}', or lm_head fp32 with precision fp32")
    if block_size not in BLOCK_SIZES:
        raise ConfigError(f"block_size {block_size} unsupported; choose one of {BLOCK_SIZES}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy_level {accuracy_level} unsupported; choose one of {ACCURACY_LEVELS}")
    builder = _import_builder()
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".ort-decoder-", dir=str(work_dir or out_dir)))
    try:
        hf_dir, build_dir, cache_dir = scratch / "hf", scratch / "build", scratch / "cache"
        hf_dir.mkdir()
        if isinstance(llm, (str, os.PathLike)):
            from transformers import AutoConfig

            src = Path(llm)
            if not (src / "config.json").is_file():
                raise ConfigError(f"{src} is not a Hugging Face model directory (no config.json)")
            for f in src.iterdir():
                if f.is_file() and not f.name.startswith("tokenizer"):
                    os.symlink(f.resolve(), hf_dir / f.name)
            config = AutoConfig.from_pretrained(str(src))
            if max_context is not None:
                config.max_position_embeddings = int(max_context)
                (hf_dir / "config.json").unlink()
                config.save_pretrained(str(hf_dir))
            _write_tokenizer_stub(hf_dir)
            model_obj = None
        else:
            held = next(llm.parameters()).dtype
            if held != torch.float32 and not (precision == "fp32" and held in (torch.float16, torch.bfloat16)):
                raise ConfigError(f"build_ort_decoder writes {precision} from float32 weights (or fp32 from fp16 / "
                                  f"bf16 ones, cast per tensor as they are written); got {held}: call llm.float()")
            config = _prepare_hf_dir(llm, hf_dir, max_context, write_weights=not in_memory)
            model_obj = llm
        if config.model_type != "llama":
            raise ConfigError(f"build_ort_decoder handles LLaMA decoders; got model_type '{config.model_type}'")

        opts = _extra_options(precision, block_size, accuracy_level, symmetric, lm_head, last_logits_only,
                              fuse_gate_up)
        log.info("onnxruntime-genai builder: precision=%s options=%s", precision, opts)
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), torch.no_grad():
                serve = (_serve_weights_from_memory(builder, model_obj) if model_obj is not None and in_memory
                         else contextlib.nullcontext(False))
                with serve as served:
                    if model_obj is not None and in_memory and not served:
                        model_obj.save_pretrained(str(hf_dir))   # fallback: the on-disk path
                        config.save_pretrained(str(hf_dir))
                    eo = builder.parse_extra_options(None, str(hf_dir), str(build_dir), precision, "cpu",
                                                     str(cache_dir), opts)
                    builder.create_model(None, str(hf_dir), str(build_dir), precision, "cpu", str(cache_dir), **eo)
        except (ValueError, NotImplementedError, RuntimeError, KeyError, OSError) as e:
            tail = "\n".join(captured.getvalue().splitlines()[-20:])
            raise ExportError(f"onnxruntime-genai builder failed for the decoder ({precision}): {e}\n{tail}") from e
        finally:
            for line in captured.getvalue().splitlines():
                log.debug("builder: %s", line)

        genai_cfg = json.loads((build_dir / "genai_config.json").read_text())
        for name in (DECODER_FILE, DECODER_FILE + ".data"):
            if not (build_dir / name).is_file():
                raise ExportError(f"onnxruntime-genai builder wrote no {name} in {build_dir}")
            dest = out_dir / name
            if dest.exists():
                dest.unlink()
            shutil.move(str(build_dir / name), str(dest))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    n_layers = int(config.num_hidden_layers)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    max_length = int(config.max_position_embeddings)
    _pin_head_dim(out_dir / DECODER_FILE, head_dim)
    info = inspect_decoder(out_dir / DECODER_FILE, head_dim)
    names_in = {t["name"] for t in info["inputs"]}
    names_out = {t["name"] for t in info["outputs"]}
    expected_in = {"inputs_embeds", "attention_mask"} | {
        p.format(i=i) for i in range(n_layers) for p in (PAST_KEY, PAST_VALUE)}
    expected_out = {"logits"} | {p.format(i=i) for i in range(n_layers) for p in (PRESENT_KEY, PRESENT_VALUE)}
    if names_in != expected_in or names_out != expected_out:
        raise ExportError(f"unexpected decoder I/O from the builder: inputs {sorted(names_in ^ expected_in)} / "
                          f"outputs {sorted(names_out ^ expected_out)} differ from the contract")
    share = bool(genai_cfg.get("search", {}).get("past_present_share_buffer", False))
    if not share:
        raise ExportError("the builder did not produce a past/present shared-buffer graph (GroupQueryAttention)")

    recipe: dict[str, Any] = {"builder": "onnxruntime-genai", "builder_version": genai_version(),
                              "options": opts, "execution_provider": "cpu"}
    if precision != "fp32":
        recipe.update({"weights": f"{precision} weight-only (MatMulNBits, RTN)", "block_size": block_size,
                       "accuracy_level": accuracy_level, "symmetric": symmetric, "lm_head": info["lm_head"]})
    return {
        "file": DECODER_FILE,
        "external_data": [DECODER_FILE + ".data"],
        "kind": "onnx",
        "flavor": "ort-cpu-contrib",
        "precision": precision,
        "recipe": recipe,
        "opset": info["opset"],
        "contrib_ops": info["contrib_ops"],
        "execution_providers": ["CPUExecutionProvider"],
        "inputs": info["inputs"],
        "outputs": info["outputs"],
        "op_histogram": info["op_histogram"],
        "weights_bytes": info["weights_bytes"],
        "decode_bytes_per_token": info["decode_bytes_per_token"],
        "logits": "last_position" if last_logits_only else "all_positions",
        "position_ids": "derived",      # no input: GroupQueryAttention derives positions from attention_mask
        "kv_cache": {
            "mode": "shared_buffer",
            "num_layers": n_layers, "num_kv_heads": kv_heads, "head_dim": head_dim,
            "layout": "batch,heads,seq,head_dim", "dtype": "float32",
            "max_length": max_length,
            "past_key": PAST_KEY, "past_value": PAST_VALUE,
            "present_key": PRESENT_KEY, "present_value": PRESENT_VALUE,
            "buffer_shape": ["batch", kv_heads, max_length, head_dim],
            "binding": ("allocate one [batch, kv_heads, L, head_dim] float32 buffer per layer for keys and one for "
                        "values (L <= max_length: the request's prompt + new tokens is enough); bind each to both its "
                        "past_key_values input and its present output; the graph writes the new rows at positions "
                        "past_seq..past_seq+seq-1 in place"),
            "attention_mask": ("int64 [batch, past_seq + seq], all ones for batch 1; its length is the total "
                               "sequence length and sum-1 per row gives the last valid position (seqlens_k); "
                               "must not exceed the buffer length L"),
            "prefill": "first call: seq = prompt length, attention_mask of the same length; buffer contents ignored",
            "decode": "seq = 1, attention_mask length past_seq + 1",
            "chunked_prefill": "batch 1 only: seq > 1 with past_seq > 0 continues a prompt",
            "padding": "right padding only (rows shorter than the mask length must be padded at the end)",
        },
    }
