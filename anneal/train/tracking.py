"""Where metrics go: W&B (offline by default), a JSONL file in the run folder, and the console.
Only this module talks to wandb/rich, so the trainer stays readable.

The console: on a terminal, a rich live progress bar (and a line per eval above it); without one
(nohup, SLURM, `> log`), one plain line every `trainer.log_every` steps and one per eval, as
torchtitan and OLMo-core print them, never wrapped (a job log is grepped, not read at 80 columns)."""
from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from anneal.train.schedule import format_tokens

console = Console(stderr=False, soft_wrap=True)

# the W&B x-axis: tokens make runs with different batch sizes (and batch ramps) comparable
WANDB_STEP_METRIC = "tokens"


def step_line(step: int, row: dict, total_tokens: int, eta_s: float | None) -> str:
    """One job-log line of a training step's metrics row."""
    parts = [f"step {step}", f"tokens {format_tokens(row['tokens'])}/{format_tokens(total_tokens)}",
             row.get("stage", "?"), f"loss {row['loss']:.4f}", f"lr {row['lr']:.3e}"]
    if "grad_norm" in row:
        parts.append(f"grad_norm {row['grad_norm']:.3f}")
    parts.append(f"{format_tokens(int(row['tokens_per_s']))} tok/s")
    if "mfu" in row:
        parts.append(f"mfu {row['mfu']:.1%}")
    if "gpu_mem_peak_gb" in row:
        parts.append(f"mem {row['gpu_mem_peak_gb']:.1f} GiB" + (f", host peak {row['host_mem_peak_gb']:.1f} GiB"
                                                                  if "host_mem_peak_gb" in row else ""))
    elif "host_mem_gb" in row:
        parts.append(f"host mem {row['host_mem_gb']:.2f} GiB")
    parts.append("eta " + (str(timedelta(seconds=round(eta_s))) if eta_s is not None else "?"))
    return " | ".join(parts)


def eval_line(step: int, row: dict) -> str:
    """One job-log line of an eval: the mean held-out loss, then each source's."""
    per_source = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in row.items() if k.startswith("eval_loss/")]
    return " | ".join([f"eval step {step}", f"tokens {format_tokens(row.get('tokens', 0))}",
                       f"eval_loss {row['eval_loss']:.4f}", *per_source])


def smoothed_losses(history: list[dict], key: str = "loss", frac: float = 0.1) -> tuple[float, float, int] | None:
    """(mean of the first, mean of the last, window) of `key` over a window of `frac` of the rows
    that have it, at least min(10, a quarter of them): a summary one noisy step cannot flip."""
    values = [r[key] for r in history if key in r]
    if not values:
        return None
    n = max(round(frac * len(values)), min(10, len(values) // 4), 1)
    return sum(values[:n]) / n, sum(values[-n:]) / n, n


class Tracker:
    def __init__(self, run_dir: Path, logging_cfg, run_config: dict, total_tokens: int, start_tokens: int,
                 history: list[dict] | None = None, group: str | None = None):
        self.run_dir, self.cfg, self.group = run_dir, logging_cfg, group
        self.total_tokens = total_tokens
        self._t0, self._tokens0 = time.perf_counter(), start_tokens   # for the ETA
        self.metrics_path = run_dir / "metrics.jsonl"
        self.history: list[dict] = list(history or [])
        # Rewrite the JSONL from the checkpoint's history so a resumed run has no duplicate rows.
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.wandb_run = None
        if logging_cfg.wandb and logging_cfg.mode != "disabled":
            self.wandb_run = self._init_wandb(run_config)
        self.progress = None
        # logging.progress: the live bar on a terminal, the job-log lines without one
        self.lines = logging_cfg.progress and not console.is_terminal
        if logging_cfg.progress and console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.fields[stage]:>7}"), BarColumn(bar_width=None),
                TextColumn("{task.fields[tok]} tok"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False, refresh_per_second=4, expand=True)
            self.task = self.progress.add_task("anneal", total=total_tokens, completed=start_tokens, stage="",
                                               tok=self._tok(start_tokens), loss="-", lr="-", tps="-")
            self.progress.start()

    def _tok(self, tokens: int) -> str:
        return f"{format_tokens(tokens)}/{format_tokens(self.total_tokens)}"

    def _init_wandb(self, run_config: dict):
        import uuid

        import wandb

        id_file = self.run_dir / "wandb_id"  # same W&B run across resumes
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project=self.cfg.project, entity=self.cfg.entity, mode=self.cfg.mode,
                         dir=str(self.run_dir), config=run_config, id=run_id, resume="allow",
                         name=f"{self.group}/{self.run_dir.name}" if self.group else self.run_dir.name,
                         group=self.group, settings=wandb.Settings(console="wrap"))  # files/output.log
        run.define_metric(WANDB_STEP_METRIC)
        run.define_metric("*", step_metric=WANDB_STEP_METRIC)
        run.define_metric("loss", summary="min")
        return run

    @property
    def wandb_dir(self) -> str | None:
        return getattr(self.wandb_run, "dir", None) and str(Path(self.wandb_run.dir).parent)

    def log(self, row: dict, step: int) -> None:
        row = {"step": step, **row}
        self.history.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(row, step=step)
        if "eval_loss" in row and self.cfg.progress:
            self.print(eval_line(step, row), markup=False, highlight=False)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """A PNG into W&B (the file itself stays in the run folder)."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path)), WANDB_STEP_METRIC: self._last_tokens()}, step=step)

    def _last_tokens(self) -> int:
        return next((r["tokens"] for r in reversed(self.history) if "tokens" in r), 0)

    def update_progress(self, step: int, row: dict, log_line: bool) -> None:
        """The bar on a terminal; else a job-log line when `log_line`."""
        tokens = row["tokens"]
        if self.progress is not None:
            self.progress.update(self.task, completed=tokens, stage=row.get("stage", ""), tok=self._tok(tokens),
                                 loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                 tps=format_tokens(int(row["tokens_per_s"])))
        elif self.lines and log_line:
            elapsed = time.perf_counter() - self._t0
            rate = (tokens - self._tokens0) / elapsed if elapsed > 0 else 0.0
            eta = (self.total_tokens - tokens) / rate if rate > 0 else None
            self.print(step_line(step, row, self.total_tokens, eta), markup=False, highlight=False)

    def print(self, *args, **kwargs) -> None:
        kwargs.setdefault("soft_wrap", True)   # paths and commands are copied: never wrapped
        (self.progress.console if self.progress else console).print(*args, **kwargs)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.wandb_run is not None:
            smooth = smoothed_losses(self.history)
            if smooth is not None:
                self.wandb_run.summary["loss_smoothed_first"], self.wandb_run.summary["loss_smoothed_last"] = smooth[:2]
            self.wandb_run.finish()


class NullTracker:
    """The tracker of ranks other than 0: no console, no W&B, no files."""

    def __init__(self, history=None):
        self.history, self.wandb_dir = list(history or []), None

    def log(self, row: dict, step: int) -> None:
        self.history.append({"step": step, **row})

    def print(self, *a, **k) -> None:
        pass

    def log_image(self, *a, **k) -> None:
        pass

    def update_progress(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass
