"""``edgevlm train`` and ``edgevlm eval``: the MobileVLM training recipe and exact-match evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


def train(config: str | None = None, model: str | None = None, init: str | None = None, data: str | None = None,
          synthetic: bool = False, multi_turn: bool = False, out: str | None = None, stages: list[str] | None = None,
          steps: int | None = None, epochs: float | None = None, lr: float | None = None,
          projector_lr: float | None = None, warmup: float | None = None, batch_size: int | None = None,
          grad_accum: int | None = None, weight_decay: float | None = None, lora_r: int | None = None,
          lora_alpha: float | None = None, lora_dropout: float | None = None, train_vision_tower: bool = False,
          bf16: Literal["auto", "on", "off"] | None = None, seed: int | None = None, threads: int | None = None,
          tokenizer: str | None = None, max_samples: int | None = None, eval_split: str | None = None,
          eval_samples: int | None = None, save_stage_checkpoints: bool = False,
          device: Literal["auto", "cpu", "cuda"] | None = None, overwrite: bool = False,
          shard: Literal["ddp", "fsdp"] | None = None, group_by_length: int | None = None,
          pad_multiple: int | None = None, workers: int | None = None, profile: bool = False,
          profile_steps: int | None = None, peak_tflops: float | None = None, progress: bool = True) -> int:
    """Train a MobileVLM with the two-stage recipe (plus a tower stage for random-init presets).

    Stages (presets; a recipe TOML lists them as [[stages]] tables, run in order):
      tower     stage 0, edgevlm only, for small presets whose CLIP tower starts from random weights: pre-trains
                vision tower + projector on typed QA (one linear head per question type reads the visual tokens
                and classifies the answer; heads dropped afterwards). Needs records with question types (the
                synthetic set writes them). The demo recipe: tower, then instruct.
      vision    stage 0 alternative for untyped data: vision tower + projector + LLM end to end, vicuna_v1.
      align     stage 1 (feature alignment): projector only; vision tower and LLM frozen; "plain" template
                (<image> + caption + newline, caption supervised).
      instruct  stage 2 (instruction tuning): projector + LLM (or LoRA adapters with --lora-r); vision tower
                frozen; Vicuna v1 template, loss only on the assistant answers and their </s>.
    The tower's layers after the selected hidden state are always frozen. Trainable parameter counts per part
    are logged at each stage start.

    Flags override the --config file (configs/train/*.toml); per-stage flags (--steps, --epochs, --lr,
    --projector-lr, --warmup, --lora-*) apply to every stage. Writes OUT/checkpoint (MobileVLM HF format, with
    the tokenizer), OUT/tokenizer, OUT/train_log.json and OUT/eval.json. Small presets get a BPE tokenizer trained
    on the training split. Bad data fails before anything is written.

    DDP: torchrun --standalone --nproc-per-node 2 -m edgevlm train ... (gloo on CPU, nccl on CUDA); the global
    --batch-size is split across ranks; rank 0 writes. FSDP2 (parameters, gradients and AdamW states sharded
    across ranks, for models that do not fit DDP): add --shard fsdp. docs/training.md has a per-GPU memory table.

    Speed: batches are grouped by length and padded to a multiple of --pad-multiple tokens (few distinct shapes);
    DataLoader workers collate them (pinned memory on CUDA); AdamW is fused on CUDA. train_log.json reports per
    stage the steady-state step time, tokens/s, model FLOPs per token and MFU (GPUs with a known bf16 peak);
    --profile writes a torch.profiler trace and a top-20 operator table of a few steady-state steps.

    Examples:
      edgevlm train --config configs/train/demo.toml --out runs/demo
      edgevlm train --model tiny-ldpnetv2 --synthetic --stages tower instruct --steps 20 --out runs/tiny
      edgevlm train --init MobileVLM_V2-1.7B --data my_llava --stages instruct --lora-r 128 --lr 1e-4

    Args:
        config: recipe TOML file (e.g. configs/train/demo.toml).
        model: registry model to train from random weights (e.g. demo, tiny-ldpnetv2).
        init: MobileVLM checkpoint directory to start from (instead of --model).
        data: LLaVA-format data directory (DATA/train.json, DATA/test.json, images relative to DATA).
        synthetic: generate the synthetic shapes set into OUT/data and train on it.
        multi_turn: with --synthetic: every question of a training image in one conversation (demo recipe).
        out: output directory.
        stages: which stages to run, in order (names from the recipe file, or presets tower/vision/align/instruct).
        steps: optimizer steps per stage (replaces epochs).
        epochs: epochs per stage.
        lr: learning rate of every stage.
        projector_lr: separate projector learning rate (MobileVLM V2's mm_projector_lr).
        warmup: warm-up: a fraction of the stage's steps (< 1) or a number of steps.
        batch_size: global batch size (all ranks and accumulation steps together).
        grad_accum: gradient-accumulation steps.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        lora_r: LoRA rank for stages that train the LLM (0 = full fine-tuning); merged before saving.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        train_vision_tower: also train the vision tower in every stage.
        bf16: bf16 autocast: auto = only where supported and measurably faster.
        seed: random seed (weights, shuffling).
        threads: torch threads per process (0 = the available cores divided among local ranks).
        tokenizer: tokenizer directory (default: the init checkpoint's, DATA/tokenizer, or trained).
        max_samples: train on the first N records only.
        eval_split: split evaluated after training ("none" to skip).
        eval_samples: evaluate on the first N records only.
        save_stage_checkpoints: also write OUT/stages/N-NAME checkpoints after each stage.
        device: auto (CUDA when available), cpu or cuda.
        overwrite: reuse OUT when it holds an earlier `edgevlm train` run (its checkpoint, tokenizer and logs are
            replaced); a non-empty folder that train did not write is refused.
        shard: under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: each rank holds 1/N of the
            parameters, gradients and optimizer states).
        group_by_length: sort runs of N global batches by length before cutting batches (0 = plain shuffle).
        pad_multiple: pad each micro-batch so its LLM sequence is a multiple of this (default 64 on CUDA, 8 on CPU).
        workers: DataLoader worker processes collating batches (default 2 on CUDA, 0 on CPU).
        profile: write OUT/profile/<stage>.trace.json (torch.profiler, chrome trace) and .top20.txt.
        profile_steps: steady-state steps profiled per stage.
        peak_tflops: the GPU's dense bf16 peak, for MFU on GPUs missing from the built-in table.
        progress: show progress bars.
    """
    import os

    # Padded batches of a few lengths reuse freed blocks better with expandable segments (read at the first CUDA
    # allocation; a value the user set wins).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from edgevlm.train.evaluate import format_result
    from edgevlm.train.recipe import train as run

    result = run(config, model=model, init=init, data=data, synthetic=synthetic or None,
                 synthetic_multi_turn=multi_turn or None, out=out, stages=stages,
                 steps=steps, epochs=epochs, lr=lr, projector_lr=projector_lr, warmup=warmup, batch_size=batch_size,
                 grad_accum=grad_accum, weight_decay=weight_decay, lora_r=lora_r, lora_alpha=lora_alpha,
                 lora_dropout=lora_dropout, train_vision_tower=train_vision_tower or None, bf16=bf16, seed=seed,
                 threads=threads, tokenizer=tokenizer, max_samples=max_samples, eval_split=eval_split,
                 eval_samples=eval_samples, save_stage_checkpoints=save_stage_checkpoints or None, device=device,
                 overwrite=overwrite or None, shard=shard, group_by_length=group_by_length,
                 pad_multiple=pad_multiple, workers=workers, profile=profile or None, profile_steps=profile_steps,
                 peak_tflops=peak_tflops, progress=progress)
    if result.checkpoint is None:          # DDP rank > 0
        return 0
    t = result.timings
    print(f"checkpoint: {result.checkpoint}")
    print(f"train log:  {result.log_path}")
    for s in result.log["stages"]:
        sp = s["speed"]
        mfu = f", MFU {sp['mfu']:.1%}" if sp.get("mfu") is not None else ""
        print(f"stage {s['name']:<9} {s['steps']:>5} steps  {s['seconds']:7.1f} s  loss {s['first_loss']:.4f} -> "
              f"{s['final_loss']:.4f}  ({sp['step_s_median']:.3f} s/step, {sp['tokens_per_s']:,.0f} tokens/s{mfu})")
        if s.get("profile"):
            print(f"  profile: {s['profile']['trace']} , {s['profile']['top20']}")
    print(f"time: {t['total_s']:.1f} s (data {t.get('data_s', 0):.1f}, tokenizer {t.get('tokenizer_s', 0):.1f}, "
          f"train {t['train_s']:.1f}, save {t['save_s']:.1f})" + (f" + eval {t['eval_s']:.1f} s" if 'eval_s' in t
                                                                   else ""))
    if result.eval is not None:
        print(format_result(result.eval))
    return 0


def evaluate(checkpoint: str, data: str, split: str = "test", out: str | None = None, batch_size: int = 64,
             max_samples: int | None = None, max_new_tokens: int = 16, threads: int | None = None,
             progress: bool = True) -> int:
    """Exact-match accuracy of a checkpoint on held-out LLaVA-format QA, overall and per question type.

    Each record's first question is asked with the Vicuna v1 inference prompt and answered by batched greedy
    decoding until </s>; the answer matches when it equals the reference after stripping, lower-casing and
    dropping a trailing period.

    Args:
        checkpoint: MobileVLM checkpoint directory (with its tokenizer), e.g. runs/demo/checkpoint.
        data: LLaVA-format data directory (DATA/SPLIT.json) or a .json/.jsonl file.
        split: which split of DATA to evaluate.
        out: also write the result (with every prediction) to this JSON file.
        batch_size: questions decoded together.
        max_samples: evaluate the first N records only.
        max_new_tokens: longest answer generated.
        threads: torch threads (default: torch's default).
        progress: show a progress bar.
    """
    import torch

    from edgevlm.train.evaluate import evaluate_checkpoint, format_result

    if threads:
        torch.set_num_threads(threads)
    result = evaluate_checkpoint(checkpoint, data, split, batch_size=batch_size, max_samples=max_samples,
                                 max_new_tokens=max_new_tokens, progress=progress)
    print(f"{result['model']} on {data} [{split}]")
    print(format_result(result))
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


COMMANDS = {"train": train, "eval": evaluate}
