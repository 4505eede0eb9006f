"""Training speed: per-stage throughput / MFU summary for ``train_log.json``, and the optional torch.profiler trace.

``stage_throughput`` splits a stage's step times into a warm-up (the first ``warmup_steps`` steps: CUDA context,
kernel selection and allocator growth for each new padded shape) and the steady state after it, and reports for
the steady state (all steps when the stage is shorter than the warm-up):

==========================  ==================================================================================
key                         meaning
==========================  ==================================================================================
``warmup_steps``            steps counted as warm-up
``warmup_s``                their total wall time
``step_s_median``           median wall time of a steady-state step (``step_s_p90``: 90th percentile)
``steps_per_s``             1 / ``step_s_median``
``tokens_per_s``            real LLM tokens (text + visual, all ranks) per second of steady state
``supervised_tokens_per_s`` tokens that carry a loss, per second
``samples_per_s``           examples per second
``model_flops_per_token``   model FLOPs of a step / its real LLM tokens (``flops.py`` says what is counted)
``model_tflops_per_s``      achieved model TFLOPS (all ranks together)
``mfu``                     achieved / (GPUs x dense bf16 peak); null on CPUs and unknown GPUs
``peak_tflops``             the peak used, with ``peak_source`` saying where it comes from
``distinct_shapes``         padded micro-batch shapes seen (``new_shape_steps``: the steps that met a new one)
==========================  ==================================================================================

The profiler (``profile = true`` / ``--profile``) records ``profile_steps`` steady-state steps of every stage on
rank 0 and writes ``{out}/profile/{N}-{stage}.trace.json`` (chrome://tracing or https://ui.perfetto.dev) and
``{N}-{stage}.top20.txt`` (the 20 operators with the most self time, on the GPU when there is one).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

from edgevlm.train.flops import mfu


def stage_throughput(step_s: Sequence[float], tokens: Sequence[int], supervised: Sequence[int],
                     samples: Sequence[int], flops: Sequence[float], warmup_steps: int, peak: float | None,
                     peak_source: str, devices: int, shapes: Sequence[Any]) -> dict[str, Any]:
    """The throughput summary of one stage (all sequences per step, summed over ranks)."""
    n = len(step_s)
    w = min(warmup_steps, max(n - 1, 0)) if n > warmup_steps else 0
    steady = slice(w, n)
    t = sum(step_s[steady]) or 1e-12
    ss = sorted(step_s[steady])
    med = statistics.median(ss) if ss else 0.0
    seen: set = set()
    new_shape_steps = []
    for i, shape in enumerate(shapes):
        if shape not in seen:
            seen.add(shape)
            new_shape_steps.append(i + 1)
    tok, fl = sum(tokens[steady]), sum(flops[steady])
    achieved = fl / t
    util = mfu(fl, t, peak, devices)
    return {
        "warmup_steps": w, "warmup_s": round(sum(step_s[:w]), 4),
        "step_s_median": round(med, 5), "step_s_p90": round(ss[min(len(ss) - 1, int(0.9 * len(ss)))], 5) if ss
        else 0.0, "steps_per_s": round(1 / med, 3) if med else None,
        "tokens_per_s": round(tok / t, 1), "supervised_tokens_per_s": round(sum(supervised[steady]) / t, 1),
        "samples_per_s": round(sum(samples[steady]) / t, 2),
        "model_flops_per_token": round(fl / tok) if tok else None,
        "model_tflops_per_s": round(achieved / 1e12, 4), "mfu": round(util, 4) if util is not None else None,
        "peak_tflops": peak, "peak_source": peak_source, "devices": devices,
        "distinct_shapes": len(seen), "new_shape_steps": new_shape_steps,
    }


class StepProfiler:
    """torch.profiler over steps ``[start, start + steps)`` of a stage; ``step()`` after every optimizer step."""

    def __init__(self, out: Path, name: str, start: int, steps: int, cuda: bool) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out, self.name, self.cuda = out, name, cuda
        self.start, self.steps = start, steps
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof = profile(activities=acts, schedule=schedule(wait=max(start - 1, 0), warmup=min(start, 1),
                                                               active=steps, repeat=1),
                            on_trace_ready=self._write, record_shapes=True, with_stack=False)
        self.written: dict[str, str] = {}
        self.prof.__enter__()

    def _write(self, prof: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"{self.name}.trace.json"
        prof.export_chrome_trace(str(trace))
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=20)
        top = self.out / f"{self.name}.top20.txt"
        top.write_text(f"{self.steps} steady-state steps from step {self.start + 1}, sorted by {sort}\n{table}\n")
        self.written = {"trace": str(trace), "top20": str(top), "steps": [self.start + 1, self.start + self.steps]}

    def step(self) -> None:
        self.prof.step()

    def close(self) -> dict[str, str]:
        self.prof.__exit__(None, None, None)
        return self.written


def cuda_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["stage_throughput", "StepProfiler", "cuda_sync"]
