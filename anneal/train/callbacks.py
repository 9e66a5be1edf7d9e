"""What happens around the optimizer steps, one callback per concern: evaluation, the metrics
row (console, JSONL, W&B), resumable checkpoints, and at the end the plots and the HF export.

The loop (`anneal.train.loop`) calls, in order of registration,
    on_train_start(step)          before the first step of this process (fresh or resumed)
    before_update(stage, row)     after the step's backward, before its update: a reason (str)
                                  vetoes the update (`anneal.train.guards`)
    on_step_end(info, row)        after each optimizer step; `row` is the step's metrics row
    on_train_end(tokens)          once the schedule's token budget is spent (not after an early stop)
    state_dict()/load_state_dict  what a callback needs to resume exactly (None: nothing); kept
                                  under the key the loop attaches it with (`run.checkpoints`)
Every callback sees the same `Run` (config, prepared pieces, engine, tracker, layout).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from anneal.checkpoints.run_checkpoints import RunCheckpoints, anneal_meta, export_meta, export_meta_files
from anneal.model.precision import PrecisionPolicy
from anneal.parallel.layout import ParallelLayout
from anneal.train.build import Prepared
from anneal.train.devices import host_memory_gb, peak_host_memory_gb, pinned_host_memory_gb
from anneal.train.step import to_device, token_losses


@dataclass
class Run:
    """What the loop and its callbacks share for one run."""
    cfg: object
    p: Prepared
    engine: object
    tracker: object
    layout: ParallelLayout
    device: torch.device
    run_dir: Path
    checkpoints: RunCheckpoints
    precision: PrecisionPolicy   # what the run computes in (trainer.bf16 on this device)
    export_dir: str | None = None

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint of this run (written or resumed from)."""
        return self.checkpoints.last


@dataclass
class StepInfo:
    """Where the run stands after an optimizer step."""
    step: int
    tokens: int
    prev_tokens: int     # tokens before this step
    stage: str           # the stage this step trained in
    lr: float
    at_stage_end: bool   # the step ended a stage (or the schedule)
    stop_now: bool       # trainer.stop_after_steps reached, or preemption: checkpoint and stop

    def crossed(self, every: int) -> bool:
        """This step crossed a multiple of `every` tokens (0: never)."""
        return every > 0 and self.tokens // every != self.prev_tokens // every


class Callback:
    def __init__(self, run: Run):
        self.run = run

    def on_train_start(self, step: int) -> None:
        pass

    def before_update(self, stage: str, row: dict) -> str | None:
        return None

    def on_step_end(self, info: StepInfo, row: dict) -> None:
        pass

    def on_train_end(self, tokens: int) -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, sd: dict) -> None:
        pass


@torch.no_grad()
def heldout_losses(model, stream, source_names, eval_seqs: int, seq_len: int, device: torch.device) -> dict:
    """Mean held-out loss per source (`eval_loss/<source>`) and their mean (`eval_loss`) of `model`
    (in eval mode) on `stream`'s held-out batches: one function for the trainer's evals and for
    `anneal-compare --eval`, so an export is scored on exactly what its run was scored on."""
    out, means = {}, []
    for name in source_names:
        batch = stream.heldout_batches(name, eval_seqs, seq_len)
        if batch is None or batch["input_ids"].numel() == 0:
            continue
        losses = token_losses(model, to_device(batch, device))
        out[f"eval_loss/{name}"] = float(losses.mean())
        means.append(out[f"eval_loss/{name}"])
    if means:
        out["eval_loss"] = sum(means) / len(means)
    return out


def evaluate(run: Run) -> dict:
    """The run's held-out losses (`heldout_losses`) at its current weights."""
    model, p, cfg = run.p.model, run.p, run.cfg
    model.eval()
    out = heldout_losses(model, p.stream, p.spec.source_names, cfg.data.eval_seqs, cfg.data.seq_len, run.device)
    model.train()
    return out


def global_accounting(run: Run) -> dict:
    """Tokens/documents per source consumed by all ranks (each rank reads its own data shards)."""
    parts = [a for rank_parts in run.layout.all_gather(run.p.stream.shard_accounting()) for a in rank_parts]
    return run.p.stream.merge_accounting(parts)


class Eval(Callback):
    """Held-out losses at step 0, every `every` tokens and at each stage end (with the data
    accounting of the stream), and with each eval after step 0 the expert-load heatmap of the
    training steps since the previous eval (`expert_load()`: layers x experts; rank 0 draws it to
    expert_load.png in the run folder and logs it to W&B). `extra()` adds more scores to the same
    row (the benchmark evals, `anneal.evals.callback`)."""

    def __init__(self, run: Run, every: int, expert_load=lambda: None, extra=dict):
        super().__init__(run)
        self.every, self.expert_load, self.extra = every, expert_load, extra

    def on_train_start(self, step: int) -> None:
        if step == 0 and not self.run.tracker.history:
            self.run.tracker.log({"tokens": 0, **evaluate(self.run), **self.extra()}, step=0)

    def on_step_end(self, info: StepInfo, row: dict) -> None:
        if info.crossed(self.every) or info.at_stage_end:
            row.update(evaluate(self.run))
            row.update(self.extra())
            row["data"] = global_accounting(self.run)
            self._heatmap(info)

    def _heatmap(self, info: StepInfo) -> None:
        load = self.expert_load()
        if load is None or not self.run.layout.is_rank0:
            return
        from anneal.train.plots import plot_expert_load

        layers = list(self.run.p.model.routers())
        path = plot_expert_load(load.float().cpu().numpy(), layers, self.run.run_dir / "expert_load.png",
                                title=f"expert load / layer mean, steps up to {info.step} ({info.stage})")
        self.run.tracker.log_image("moe/expert_load", path, step=info.step)


class Metrics(Callback):
    """The metrics row to the tracker every `log_every` steps and with every eval; the progress bar
    every step, or without a terminal a job-log line every `log_every` steps, the first and the last."""

    def __init__(self, run: Run, log_every: int):
        super().__init__(run)
        self.log_every = log_every

    def on_step_end(self, info: StepInfo, row: dict) -> None:
        tracker = self.run.tracker
        # with parallel.offload=optimizer the optimizer lives here; the peak also holds start-up's transients
        row["host_mem_peak_gb"], row["host_mem_gb"] = peak_host_memory_gb(), host_memory_gb()
        pinned = pinned_host_memory_gb()
        if pinned is not None:
            row["host_pinned_gb"] = pinned
        periodic = info.step % self.log_every == 0
        last = info.tokens >= self.run.p.schedule.total_tokens or info.stop_now
        tracker.update_progress(info.step, row, log_line=periodic or info.step == 1 or last)
        if periodic or "eval_loss" in row:
            tracker.log(row, step=info.step)


class Checkpoint(Callback):
    """When to checkpoint: every `every` tokens, at each stage end and before an early stop. What a
    checkpoint holds and how it is written is `run.checkpoints`' business (the parts attached to it)."""

    def __init__(self, run: Run, every: int):
        super().__init__(run)
        self.every = every

    def on_step_end(self, info: StepInfo, row: dict) -> None:
        if info.crossed(self.every) or info.at_stage_end or info.stop_now:
            self.save(info)

    def save(self, info: StepInfo) -> Path:
        run, p = self.run, self.run.p
        meta = anneal_meta(started_from=p.checkpoint_name, stage=info.stage, lr=p.schedule.lr_at(info.tokens),
                           tokens_seen_total=p.meta.get("tokens_seen_total", 0) + info.tokens,
                           step=info.step, tokens=info.tokens)
        return run.checkpoints.save(info.step, info.tokens, history=run.tracker.history, hf_config=p.hf_config,
                                    meta=meta)


class Plots(Callback):
    """losses.png and schedule.png in the run folder (rank 0, logging.plots)."""

    def on_train_end(self, tokens: int) -> None:
        run = self.run
        if run.cfg.logging.plots and run.layout.is_rank0:
            from anneal.train.plots import plot_losses, plot_schedule

            plot_losses(run.tracker.history, run.run_dir / "losses.png", schedule=run.p.schedule)
            plot_schedule(run.p.schedule, run.p.ramp, run.run_dir / "schedule.png")


class Export(Callback):
    """The annealed model (full-precision weights, cast to export.dtype) as an HF folder; the folder
    is `run.export_dir` on every rank.

    Which route applies is `run.checkpoints.export_source`'s answer: under several ranks the export
    is streamed from the final checkpoint (the fp32 masters, written at the last step by the
    Checkpoint callback): every rank writes the per-expert shards of its own experts and rank 0 the
    rest (`anneal.checkpoints.sharded_export`); nothing is gathered. Otherwise the model in memory
    is written. The peak host memory per rank is printed."""

    def on_train_end(self, tokens: int) -> None:
        run, cfg, p = self.run, self.run.cfg, self.run.p
        if not cfg.export.enabled:
            return
        export_dir = Path(cfg.export.dir) if cfg.export.dir else run.run_dir / "hf"
        step = run.tracker.history[-1]["step"] if run.tracker.history else None
        meta = anneal_meta(started_from=p.checkpoint_name, stage=p.schedule.stage_names[-1],
                           lr=p.schedule.lr_at(tokens), tokens_seen_total=p.meta.get("tokens_seen_total", 0) + tokens,
                           step=step, tokens=tokens, schedule=p.schedule.to_config())
        if export_meta(export_dir) == json.loads(json.dumps(meta)):
            # `run.resume=true` on a finished run: its export (published whole, by rename) is this
            # very state; keep it rather than refuse the folder or write it again
            run.export_dir = str(export_dir)
            run.tracker.print(f"{export_dir}: already holds this run's export (step {step}); kept", markup=False)
            return
        kwargs = dict(tokenizer_dir=p.tokenizer_dir, dtype=getattr(torch, cfg.export.dtype),
                      max_shard_size=cfg.export.max_shard_size, overwrite=cfg.export.overwrite,
                      extra_files=export_meta_files(meta))
        source = run.checkpoints.export_source(tokens, run.layout.world)
        if source is not None:
            from anneal.checkpoints.sharded_export import export_checkpoint

            export_checkpoint(source, export_dir, ep_size=run.layout.ep_size, **kwargs)
            out = str(export_dir)
        else:
            model = run.engine.export_model()  # collective under expert parallelism

            def write() -> str:
                from anneal.checkpoints.hf_export import export_hf_checkpoint

                export_hf_checkpoint(model, export_dir, **kwargs)
                return str(export_dir)

            # rank 0 writes; its error (a full disk, non-finite weights) stops every rank, none waits
            out = run.layout.rank0_first(write, lambda: None)
        run.export_dir = run.layout.broadcast(out)
        from anneal.train.devices import peak_host_memory_gb

        peaks = run.layout.all_gather(peak_host_memory_gb())
        run.tracker.print(f"exported {run.export_dir}: peak host memory per rank "
                          f"{', '.join(f'{g:.2f}' for g in peaks)} GB")

