"""The training loop: one process, or every rank of a DeepSpeed launch.

`train(cfg, run_dir)` turns a composed config into a model (from a checkpoint or random init), a
tokenizer, a token-indexed schedule, a mixture stream and an engine (`anneal.train.build`), then
runs optimizer steps until the schedule's token budget is spent. Each step is micro-batches of
forward + backward and one `engine.step` (`anneal.train.step`); the engine runs the router-bias
update as its post-step hook (`anneal.train.balance`). Evaluation, metrics, checkpoints, plots and
the export are callbacks (`anneal.train.callbacks`). Native vs DeepSpeed is the engine's business
(`anneal.train.engine`): nothing here branches on it.

Everything that decides the next batch or update (step, tokens, data cursor, optimizer, RNG,
router biases) is in the checkpoint, so a resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from anneal.checkpoints.run_checkpoints import RunCheckpoints
from anneal.model.config import Dots1Config
from anneal.model.precision import PrecisionPolicy
from anneal.train.balance import RouterBalance
from anneal.train.build import engine_class, prepare
from anneal.config import profile_window, validate_config
from anneal.evals.callback import BenchmarkEval
from anneal.train.callbacks import Checkpoint, Eval, Export, Metrics, Plots, Run, StepInfo, global_accounting
from anneal.parallel.parallelize import parallelize
from anneal.train.devices import device_peak_tflops, peak_host_memory_gb, pick_device, set_deterministic
from anneal.train.guards import StepGuard
from anneal.train.paired_schedule import PairedSchedule
from anneal.train.preemption import PreemptionRequest
from anneal.train.profiling import Profile
from anneal.train.resume import validate_trainer_state
from anneal.train.run_dir import claim_run_dir, resume_command, wandb_group
from anneal.train.schedule import format_tokens, parse_tokens
from anneal.train.step import train_step
from anneal.train.tracking import NullTracker, Tracker


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    # from the start a SIGTERM/SIGUSR1/SIGINT asks for a stop after the next step, with a checkpoint
    with PreemptionRequest() as preemption:
        validate_config(cfg)
        torch.manual_seed(cfg.seed)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        engine_cls = engine_class(cfg.trainer.engine)
        device = pick_device(cfg.trainer.device)
        set_deterministic(cfg.trainer.deterministic, device)
        device, layout = engine_cls.launch(cfg, device)
        run_dir = Path(layout.broadcast(str(run_dir)))  # Hydra's timestamped folder may differ between ranks
        claim = layout.rank0_first(lambda: claim_run_dir(cfg, run_dir), lambda: None)
        try:
            return _train_claimed(cfg, run_dir, device, layout, engine_cls, claim, preemption)
        finally:
            if claim is not None:
                claim.lock.release()


def _train_claimed(cfg, run_dir: Path, device, layout, engine_cls, claim, preemption) -> dict:
    resume_from = layout.broadcast(str(claim.resume_from) if claim and claim.resume_from else None)
    resume_from = Path(resume_from) if resume_from else None
    p = layout.rank0_first(lambda: prepare(cfg, run_dir, device, layout))
    load_peak_gb = layout.all_gather(peak_host_memory_gb())  # what sharded loading saves
    checkpoints = RunCheckpoints.for_run(run_dir, keep=cfg.trainer.keep_checkpoints, gather=layout.all_gather)
    resumed = None
    if resume_from is not None:  # the weights now, before the engine casts the model; the rest in fit
        def check(st):
            validate_trainer_state(st, resume_from, cfg.data.seq_len, [b for _, b in p.ramp.points],
                                   checkpoints.step_number(resume_from), p.schedule.total_tokens)
        resumed = checkpoints.load(resume_from, p.model, check_state=check)

    notes: list[str] = list(claim.notes) if claim is not None else []
    notes += list(p.schedule.notes)
    policy = PrecisionPolicy.for_device(cfg.trainer.bf16, device, note=notes.append,
                                        grad_accum=cfg.trainer.grad_accum_dtype,
                                        fusion=cfg.trainer.grad_accum_fusion)
    parallelize(p.model, layout, cfg, device)  # EP -> activation checkpointing -> compile
    engine = engine_cls.from_config(p.model, cfg, policy, layout)  # casts the model to the compute dtype
    step, tokens, history = (resumed.step, resumed.tokens, resumed.history) if resumed else (0, 0, [])

    if layout.is_rank0:
        tracker = Tracker(run_dir, cfg.logging, OmegaConf.to_container(cfg, resolve=True),
                          p.schedule.total_tokens, tokens, history, group=wandb_group(cfg, run_dir))
    else:
        tracker = NullTracker(history)
    for note in notes:
        tracker.print(note, markup=False, highlight=False, soft_wrap=True)
    if resume_from is not None:
        tracker.print(f"resumed from {resume_from} (step {step}, {format_tokens(tokens)} tokens)", markup=False,
                      soft_wrap=True)
    tracker.print(f"model ready: peak host memory per rank {', '.join(f'{g:.2f}' for g in load_peak_gb)} GB")
    tracker.print(engine.describe(), markup=False, highlight=False, soft_wrap=True)
    run = Run(cfg, p, engine, tracker, layout, device, run_dir, checkpoints, policy)
    try:
        result = fit(run, step, tokens, stop_requested=lambda: bool(preemption))
        tracker.print(p.stream.format_accounting(global_accounting(run)), markup=False, highlight=False)
        result["resume_command"] = resume_command(cfg, run_dir)
        if result["preempted"] and checkpoints_off(cfg):
            tracker.print(f"{preemption.received}: stopped after step {result['step']} (trainer.ckpt_every=off: "
                          f"nothing to resume from)", markup=False, highlight=False)
        elif result["preempted"]:
            tracker.print(f"{preemption.received}: stopped after step {result['step']} with a checkpoint; resume with:",
                          markup=False, highlight=False)
            tracker.print(result["resume_command"], markup=False, highlight=False, soft_wrap=True)
    finally:
        tracker.close()
        p.stream.close()
    result["wandb_dir"] = tracker.wandb_dir
    result["wandb_group"] = getattr(tracker, "group", None)
    return result


def checkpoints_off(cfg) -> bool:
    """trainer.ckpt_every=off: no checkpoint at all, not even at stage ends (benchmarks whose
    checkpoint would not fit the disk); the export is then written from memory."""
    return str(cfg.trainer.ckpt_every).strip().lower() == "off"


def fit(run: Run, step: int, tokens: int, stop_requested=lambda: False) -> dict:
    """Optimizer steps from (step, tokens) to the end of the schedule, to trainer.stop_after_steps,
    or to the step after `stop_requested()` turned true on any rank (preemption). The parts a
    checkpoint holds are attached to `run.checkpoints` here (after a resume they take its state)."""
    cfg, p, engine, layout = run.cfg, run.p, run.engine, run.layout
    schedule, seq_len = p.schedule, cfg.data.seq_len
    balance = RouterBalance(p.model.routers(), cfg.model.bias_update_rate)
    engine.add_post_step_hook(balance)
    bench = BenchmarkEval(run)  # reads and checks eval.tasks before the first step
    guard = StepGuard(run)
    callbacks = [guard,  # first: a failed step stops the run before anything is written from it
                 Eval(run, parse_tokens(cfg.trainer.eval_every, "trainer.eval_every"), balance.take_interval_load,
                      bench.scores),
                 Metrics(run, cfg.trainer.log_every)]
    if checkpoints_off(cfg):
        run.tracker.print("trainer.ckpt_every=off: no checkpoint is written, so this run cannot be resumed")
    else:
        callbacks.append(Checkpoint(run, parse_tokens(cfg.trainer.ckpt_every, "trainer.ckpt_every")))
    callbacks += [Plots(run), Export(run), bench]
    window = profile_window(cfg.trainer.profile_steps)
    if window:
        callbacks.append(Profile(run, window))  # last: a window starts after the step's other callbacks
    run.checkpoints.attach(engine=engine, data=p.stream, callbacks={"StepGuard": guard})

    paired = PairedSchedule(p.model, engine) if cfg.parallel.a2a_overlap else None

    def before_update(row: dict) -> str | None:
        return next((r for cb in callbacks if (r := cb.before_update(stage.name, row)) is not None), None)
    total = schedule.total_tokens
    stage_ends = {schedule.stage_end(n) for n in schedule.stage_names}
    flops_per_token = Dots1Config.from_hf_dict(p.hf_config).train_flops_per_token(seq_len)
    peak_tflops = device_peak_tflops(run.device)
    for cb in callbacks:
        cb.on_train_start(step)

    t_last, tokens_last, stopped_early, preempted = time.perf_counter(), tokens, False, False
    while tokens < total:
        stage = schedule.stage_at(tokens)
        p.stream.set_stage(stage.name)
        lr = schedule.lr_at(tokens)
        n_seqs = p.ramp.batch_at(tokens) // seq_len
        n_micro = n_seqs // cfg.trainer.micro_batch_size

        metrics = train_step(p.model, engine, p.stream, p.spec.source_names, layout, run.device,
                             n_micro, cfg.trainer.micro_batch_size, lr, before_update, stop_requested, paired)
        preempted = metrics.pop("stop_requested")
        step += 1
        tokens += n_seqs * seq_len

        now = time.perf_counter()
        tps = (tokens - tokens_last) / max(now - t_last, 1e-9)
        t_last, tokens_last = now, tokens
        device_tflops = tps * flops_per_token / 1e12 / layout.world
        row = {"tokens": tokens, "lr": lr, "stage": stage.name, "tokens_per_s": tps,
               "model_tflops_per_device": device_tflops,
               **({"mfu": device_tflops / peak_tflops} if peak_tflops else {}),
               "batch_tokens": n_seqs * seq_len, **metrics, **balance.stats}
        if run.device.type == "cuda":
            row["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        at_stage_end = tokens in stage_ends or tokens >= total or schedule.stage_at(tokens).name != stage.name
        stop_now = preempted or (cfg.trainer.stop_after_steps is not None and step >= cfg.trainer.stop_after_steps)
        info = StepInfo(step, tokens, tokens - n_seqs * seq_len, stage.name, lr, at_stage_end, stop_now)
        for cb in callbacks:
            cb.on_step_end(info, row)
        if stop_now and tokens < total:
            stopped_early = True
            break

    if not stopped_early:
        for cb in callbacks:
            cb.on_train_end(tokens)
    return {"step": step, "tokens": tokens, "run_dir": str(run.run_dir), "history": run.tracker.history,
            "stopped_early": stopped_early, "preempted": preempted and stopped_early, "export_dir": run.export_dir}
