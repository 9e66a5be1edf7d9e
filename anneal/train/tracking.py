"""Where metrics go: W&B (offline by default), a JSONL file in the run folder, and a rich progress
bar on the console. Only this module talks to wandb/rich, so the trainer stays readable."""
from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from anneal.train.schedule import format_tokens

console = Console(stderr=False)


class Tracker:
    def __init__(self, run_dir: Path, logging_cfg, run_config: dict, total_tokens: int, start_tokens: int,
                 history: list[dict] | None = None, group: str | None = None):
        self.run_dir, self.cfg, self.group = run_dir, logging_cfg, group
        self.metrics_path = run_dir / "metrics.jsonl"
        self.history: list[dict] = list(history or [])
        # Rewrite the JSONL from the checkpoint's history so a resumed run has no duplicate rows.
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.wandb_run = None
        if logging_cfg.wandb and logging_cfg.mode != "disabled":
            self.wandb_run = self._init_wandb(run_config)
        self.progress = None
        if logging_cfg.progress:
            self.progress = Progress(
                TextColumn("[bold]{task.fields[stage]:>7}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("tok"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False, refresh_per_second=4)
            self.task = self.progress.add_task("anneal", total=total_tokens, completed=start_tokens,
                                               stage="", loss="-", lr="-", tps="-")
            self.progress.start()

    def _init_wandb(self, run_config: dict):
        import uuid

        import wandb

        id_file = self.run_dir / "wandb_id"  # same W&B run across resumes
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(project=self.cfg.project, entity=self.cfg.entity, mode=self.cfg.mode,
                          dir=str(self.run_dir), config=run_config, id=run_id, resume="allow",
                          name=f"{self.group}/{self.run_dir.name}" if self.group else self.run_dir.name,
                          group=self.group, settings=wandb.Settings(console="off"))

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

    def log_image(self, key: str, path: Path, step: int) -> None:
        """A PNG into W&B (the file itself stays in the run folder)."""
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def update_progress(self, tokens: int, stage: str, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=tokens, stage=stage, loss=f"{loss:.3f}",
                                 lr=f"{lr:.2e}", tps=format_tokens(int(tokens_per_s)))

    def print(self, *args, **kwargs) -> None:
        (self.progress.console if self.progress else console).print(*args, **kwargs)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.wandb_run is not None:
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
