"""Guards that keep a diverging run from destroying its own work.

`StepGuard` is a callback. Before each update it sees the step's global loss (read once, after the
last micro-batch: no extra sync per micro-batch) and may veto the update:
- a non-finite loss always vetoes it; a non-finite gradient norm makes the engine drop the update
  by itself (`Engine.step`, DeepSpeed's overflow path);
- with `trainer.spike.enabled`, a loss above mean + k·std of the last `window` applied steps of the
  same stage vetoes it too (the window restarts at each stage: a new mixture moves the loss level).
After the step, `trainer.on_nonfinite` decides: `stop` ends the run with one message (exit status
3) before any checkpoint is written from the step; `skip` counts and logs the dropped step and
goes on. Any run of `trainer.max_skipped_steps` dropped steps in a row stops the run.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

from anneal.errors import AnnealError
from anneal.train.callbacks import Callback, Run, StepInfo
from anneal.train.run_dir import resume_command
from anneal.train.schedule import format_tokens
from anneal.train.step import NONFINITE_GRAD

NONFINITE_LOSS = "non-finite loss"


class RunStopped(AnnealError):
    """A guard ended the run: the weights of the step that failed were not written anywhere."""
    exit_code = 3


class StepGuard(Callback):
    def __init__(self, run: Run):
        super().__init__(run)
        t = run.cfg.trainer
        self.on_nonfinite, self.max_skipped = t.on_nonfinite, t.max_skipped_steps
        self.spike = t.spike if t.spike.enabled else None
        self.window: deque = deque(maxlen=t.spike.window)
        self.stage: str | None = None
        self.skipped_total = self.skipped_in_a_row = 0
        self.last_good_checkpoint: str | None = None

    # -- before the update ------------------------------------------------------------------------
    def before_update(self, stage: str, row: dict) -> str | None:
        loss = row["loss"]
        if not math.isfinite(loss):
            return NONFINITE_LOSS
        if stage != self.stage:
            self.stage = stage
            self.window.clear()
        if self.spike is not None and len(self.window) == self.window.maxlen:
            mean, std = statistics.fmean(self.window), statistics.pstdev(self.window)
            limit = mean + self.spike.k * std
            if loss > limit:
                return f"loss spike ({loss:.4g} > mean {mean:.4g} + {self.spike.k:g} std {std:.3g})"
        return None

    # -- after the step ---------------------------------------------------------------------------
    def on_step_end(self, info: StepInfo, row: dict) -> None:
        reason = row.get("skipped")
        if reason is None:
            self.skipped_in_a_row = 0
            self.window.append(row["loss"])
        else:
            self.skipped_total += 1
            self.skipped_in_a_row += 1
            nonfinite = reason in (NONFINITE_LOSS, NONFINITE_GRAD)
            if nonfinite and self.on_nonfinite == "stop":
                raise RunStopped(self._message(info, row, reason))
            if self.skipped_in_a_row >= self.max_skipped:
                raise RunStopped(self._message(info, row, f"{self.skipped_in_a_row} steps in a row dropped "
                                               f"(trainer.max_skipped_steps={self.max_skipped}); the last: {reason}"))
            self.run.tracker.print(f"step {info.step}: update dropped ({reason}); "
                                   f"{self.skipped_total} dropped so far", markup=False)
        row["skipped_steps"] = self.skipped_total

    def _message(self, info: StepInfo, row: dict, reason: str) -> str:
        run = self.run
        per_source = ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in row.items() if k.startswith("loss/"))
        start_lr = run.p.schedule.lr_at(0)
        last = self.run.last_checkpoint
        where = (f"The last good checkpoint is {last.name}; continue from it with a lower LR, e.g.:\n  "
                 + resume_command(run.cfg, run.run_dir, f"schedule.start_lr={start_lr / 10:.3g}")
                 if last is not None else
                 "No checkpoint was written in this run yet: start it over with a lower schedule.start_lr "
                 f"(this one started at {start_lr:.3g}) and run.overwrite=true")
        return (f"training stopped at step {info.step} ({format_tokens(info.tokens)} tokens, LR {info.lr:.3g}): "
                f"{reason}. Loss {row['loss']:.4g}, grad norm {row.get('grad_norm', float('nan')):.4g}"
                + (f"; per source: {per_source}" if per_source else "")
                + ". The update of this step was not applied and nothing was written from it"
                + (" (trainer.on_nonfinite=skip drops such steps and goes on). " if self.on_nonfinite == "stop"
                   else ". ") + where)

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"window": list(self.window), "stage": self.stage, "skipped_total": self.skipped_total,
                "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, sd: dict) -> None:
        self.window.clear()
        self.window.extend(sd["window"])
        self.stage, self.skipped_total, self.skipped_in_a_row = sd["stage"], sd["skipped_total"], sd["skipped_in_a_row"]
