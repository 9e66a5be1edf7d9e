"""Where a step's time goes: `trainer.profile_steps=[first, last]` records those optimizer steps of
a run with `torch.profiler` (as torchtitan's `profiling` options and OLMo-core's profiler callback
do) and writes, per rank, into `<run folder>/profile/`:

- `rank<r>_steps<first>-<last>.json`: device time per kind and the top kernels, per step (`kernel_table`);
- `rank<r>_steps<first>-<last>.trace.json.gz`: the Chrome / Perfetto trace of the window.

Rank 0 prints one line per window (ms of kernels per step, by kind). On CUDA the table is device
time per kernel; on CPU, self time per operator. The window is per invocation, like
`trainer.stop_after_steps`: a resume does not replay it. The first profiled step pays the
profiler's start-up; profile a step after warm-up and compile.
"""
from __future__ import annotations

import json

import torch

from anneal.train.callbacks import Callback, Run, StepInfo

# kernel name patterns -> what they are (first match wins); the CUTLASS grouped GEMMs behind
# torch._grouped_mm show as a mangled name holding `GroupProblemShape`
KERNEL_KINDS = [
    ("experts (triton)", ("_gate_up_fwd", "_rows_gemm", "_down_bwd", "_wgrad", "_slot_sum")),
    ("grouped GEMM (cutlass)", ("grouped", "GroupedGemm", "gemm_grouped", "GroupProblemShape")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "triton_tem_")),  # tem: inductor's flex template
    ("optimizer", ("multi_tensor", "fused_adam", "FusedAdam", "adam", "foreach")),
    ("dense GEMM", ("gemm", "nvjet", "xmma", "cutlass", "sm90", "Kernel2", "aten::mm", "aten::addmm", "aten::bmm")),
    ("fused elementwise (inductor)", ("triton_",)),
    ("reduce/copy/elementwise (aten)", ("elementwise", "reduce", "copy", "Copy", "fill", "index", "scatter",
                                        "gather", "sort", "Sort", "cat", "Cat", "radix", "Radix", "scan", "Scan")),
]


def kernel_table(prof, steps: int = 1, top: int = 30) -> dict:
    """Time per kernel and per kind (ms per step over `steps` recorded steps) from a finished
    `torch.profiler.profile`: device kernels when it recorded CUDA, else CPU operators' self time."""
    events = list(prof.events())
    cuda = any(evt.device_type.name == "CUDA" for evt in events)
    per_name: dict[str, list] = {}
    for evt in events:
        if cuda and evt.device_type.name != "CUDA":
            continue
        us = evt.device_time if cuda else evt.self_cpu_time_total
        row = per_name.setdefault(evt.name, [0.0, 0])
        row[0] += us / 1e3 / steps
        row[1] += 1
    kinds: dict[str, float] = {}
    for name, (ms, _) in per_name.items():
        kind = next((k for k, pats in KERNEL_KINDS if any(p in name for p in pats)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"device": "cuda" if cuda else "cpu", "total_ms": sum(v[0] for v in per_name.values()),
            "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:110], "ms": v[0], "calls": v[1]} for n, v in ranked]}  # calls: over all `steps`


class Profile(Callback):
    """Records the optimizer steps of `trainer.profile_steps`. Registered last, so a window starts
    after the previous step's callbacks (evals, checkpoints) have run; the last profiled step's own
    callbacks before this one are inside the window."""

    def __init__(self, run: Run, window: tuple[int, int]):
        super().__init__(run)
        self.first, self.last = window
        self.prof = None

    def on_train_start(self, step: int) -> None:
        if step + 1 == self.first:
            self._start()

    def on_step_end(self, info: StepInfo, row: dict) -> None:
        if self.prof is not None and (info.step >= self.last or info.stop_now):
            self._finish(info.step)
        elif info.step + 1 == self.first and not info.stop_now:
            self._start()

    def on_train_end(self, tokens: int) -> None:
        if self.prof is not None:  # the schedule ended inside the window
            self._finish(self.run.tracker.history[-1]["step"] if self.run.tracker.history else self.last)

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.run.device.type == "cuda" else [])
        self.prof = profile(activities=activities)
        self.prof.__enter__()

    def _finish(self, step: int) -> None:
        if self.run.device.type == "cuda":
            torch.cuda.synchronize(self.run.device)
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        n = step - self.first + 1
        out = self.run.run_dir / "profile"
        out.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.run.layout.rank}_steps{self.first}-{step}"
        table = kernel_table(prof, steps=n)
        (out / f"{stem}.json").write_text(json.dumps({"steps": [self.first, step], **table}, indent=2))
        prof.export_chrome_trace(str(out / f"{stem}.trace.json.gz"))
        unit = "kernels" if table["device"] == "cuda" else "CPU operator self time"
        self.run.tracker.print(
            f"profiled steps {self.first}-{step}: {table['total_ms']:.1f} ms of {unit} per step; by kind: "
            + ", ".join(f"{k} {ms:.1f}" for k, ms in table["by_kind"].items()) + f" ({out / stem}.*)",
            markup=False, highlight=False, soft_wrap=True)
