"""The anneal trainer: one process, CPU or one GPU.

It turns a composed config into: a model (from a checkpoint or random init), a tokenizer, a
token-indexed schedule, a mixture stream, and an optimizer, then runs optimizer steps until the
schedule's token budget is spent. Everything that decides the next batch or update (step, tokens,
data cursor, optimizer, RNG, router biases) is in the checkpoint, so a resumed run repeats the
uninterrupted one exactly. The optimizer step is behind `Engine`, the seam where the DeepSpeed
engine plugs in for expert parallelism.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from anneal.checkpoints import training_state
from anneal.errors import AnnealError
from anneal.checkpoints.export import META_FILE
from anneal.model.dots1 import Dots1ForCausalLM
from anneal.model.config import Dots1Config
from anneal.model.precision import MasterWeights, PrecisionPolicy
from anneal.train.batch_ramp import BatchRamp
from anneal.train.schedule import Schedule, format_tokens, parse_tokens
from anneal.train.start_lr import resolve_start_lr

RUN_MARKER = "config.yaml"  # a folder holding this file holds a run
WSD_PHASES = ("warmup", "stable", "stage1", "stage2")


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Prepared:
    """Everything the loop needs, built from the config before the first step."""
    model: Dots1ForCausalLM
    hf_config: dict
    tokenizer: object
    tokenizer_dir: Path
    schedule: Schedule
    ramp: BatchRamp
    stream: object
    spec: object
    checkpoint_name: str | None
    meta: dict = field(default_factory=dict)


# Dense bf16 peak (TFLOP/s, no sparsity) by GPU name, for MFU; unknown devices log no MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AnnealError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu or auto")
    return torch.device(name)


def compile_enabled(setting: bool | None, device: torch.device) -> bool:
    """model.compile: null = on for CUDA (measured faster: bench/RESULTS.md), off on CPU, where
    compiling costs more start-up time than a short run saves."""
    return device.type == "cuda" if setting is None else bool(setting)


def data_workers(setting: int | None, device: torch.device) -> int:
    """data.num_workers: null = 1 background tokenizer on CUDA, 0 on CPU. On a GPU the main process
    must keep launching kernels: tokenizing in it would stall the GPU between micro-batches, and one
    worker (1-2M tokens/s) stays ahead of a GPU step (bench/RESULTS.md). On CPU a worker only takes
    cores from the training threads."""
    return (1 if device.type == "cuda" else 0) if setting is None else setting


def build_model_and_tokenizer(cfg: DictConfig, run_dir: Path, device: torch.device):
    """-> (model, hf_config dict, tokenizer, tokenizer_dir, checkpoint name, start-LR hint, folder meta)."""
    from transformers import AutoTokenizer

    backend = cfg.model.experts_backend
    tokenizer_dir = run_dir / "tokenizer"
    if cfg.checkpoint is None:  # random init (e.g. the recipe that makes the tiny checkpoint)
        if not cfg.model.arch:
            raise AnnealError("checkpoint is null (random init) but model.arch is empty; "
                              "use model=tiny or give model.arch fields")
        arch = OmegaConf.to_container(cfg.model.arch, resolve=True)
        mcfg = Dots1Config.from_hf_dict(arch, source="model.arch")
        model = Dots1ForCausalLM(mcfg, backend, cfg.model.aux_loss_coef, cfg.model.gradient_checkpointing)
        model.init_weights(seed=cfg.model.init_seed)
        tokenizer = _tokenizer_for_random_init(cfg, tokenizer_dir)
        mcfg.eos_token_id = tokenizer.eos_token_id  # model.arch cannot know the trained tokenizer's ids
        return model.to(device), mcfg, tokenizer, tokenizer_dir, None, None, {}

    from anneal.checkpoints.catalog import Catalog
    from anneal.checkpoints.hf_load import load_hf_checkpoint

    resolved = Catalog.load(list(cfg.catalog_files)).resolve(cfg.checkpoint)
    model, mcfg = load_hf_checkpoint(resolved.path, dtype=torch.float32, experts_backend=backend,
                                     device=str(device), expert_range=rank_expert_range(cfg, resolved.path))
    model.set_aux_loss_coef(cfg.model.aux_loss_coef)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    folder_meta_path = Path(resolved.path) / META_FILE
    folder_meta = json.loads(folder_meta_path.read_text()) if folder_meta_path.exists() else {}
    tok_src = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(resolved.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise AnnealError(f"checkpoint {cfg.checkpoint!r}: no usable tokenizer in {tok_src} ({e}). "
                          "Put the tokenizer files in the checkpoint folder or set data.tokenizer=<folder>") from None
    if not tokenizer_dir.exists():
        tokenizer.save_pretrained(str(tokenizer_dir))
    entry_lr = getattr(resolved.entry, "lr", None) if resolved.entry is not None else None
    return model, mcfg, tokenizer, tokenizer_dir, resolved.name, entry_lr, folder_meta


def rank_expert_range(cfg: DictConfig, folder) -> tuple[int, int] | None:
    """Under expert parallelism each rank reads only its own experts from the safetensors files
    (DeepSpeed's layout: EP groups are consecutive ranks, so EP rank = rank % ep_size)."""
    if cfg.trainer.engine != "deepspeed" or cfg.parallel.ep_size <= 1:
        return None
    rank, world = rank_and_world()
    n_experts = Dots1Config.from_json(Path(folder) / "config.json").n_routed_experts
    if n_experts % cfg.parallel.ep_size or world % cfg.parallel.ep_size:
        raise AnnealError(f"parallel.ep_size={cfg.parallel.ep_size} must divide the expert count ({n_experts}) "
                          f"and the number of ranks ({world})")
    n_local = n_experts // cfg.parallel.ep_size
    ep_rank = rank % cfg.parallel.ep_size
    return ep_rank * n_local, (ep_rank + 1) * n_local


def peak_host_memory_gb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _tokenizer_for_random_init(cfg: DictConfig, tokenizer_dir: Path):
    from transformers import AutoTokenizer

    if tokenizer_dir.exists():  # resumed run: reuse the tokenizer it trained
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if cfg.data.tokenizer == "train":
        from mixtures import build_tokenizer_from_corpus, load_mixture

        tokenizer = build_tokenizer_from_corpus(load_mixture(cfg.data.mixture), vocab_size=cfg.data.tokenizer_vocab_size)
    elif cfg.data.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    else:
        raise AnnealError("checkpoint is null (random init): set data.tokenizer=train or a tokenizer folder")
    tokenizer.save_pretrained(str(tokenizer_dir))
    return tokenizer


def build_schedule(cfg: DictConfig, start_lr: float) -> tuple[Schedule, BatchRamp]:
    sched_cfg = OmegaConf.to_container(cfg.schedule, resolve=True)
    sched_cfg.pop("batch_tokens", None)
    sched_cfg["start_lr"] = start_lr
    for stage in sched_cfg["stages"]:
        if stage.get("lr_start") is None:
            stage.pop("lr_start", None)
    schedule = Schedule.from_config(sched_cfg)
    bt = cfg.schedule.batch_tokens
    ramp = BatchRamp.from_config(OmegaConf.to_container(bt, resolve=True) if OmegaConf.is_config(bt) else bt)
    return schedule, ramp


def check_batch_shape(ramp: BatchRamp, seq_len: int, micro_batch_size: int, world_size: int = 1) -> None:
    for start, batch_tokens in ramp.points:
        per_micro = seq_len * micro_batch_size * world_size
        if batch_tokens % per_micro:
            ranks = f" × {world_size} ranks" if world_size > 1 else ""
            raise AnnealError(
                f"schedule.batch_tokens: {batch_tokens} tokens (from token {start}) is not a multiple of "
                f"data.seq_len × trainer.micro_batch_size{ranks} = {per_micro}; "
                "change one of them so each step is a whole number of micro-batches on every rank")


# ---------------------------------------------------------------------------------------------- ranks
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def rank0_first(fn, others=None):
    """Run fn() on rank 0, then `others` (default fn) on the other ranks, so rank 0 creates shared
    files first. An AnnealError on rank 0 is raised on every rank (one message, all ranks exit
    non-zero)."""
    d = _dist()
    if d is None:
        return fn()
    msg, out = [None], None
    if d.get_rank() == 0:
        try:
            out = fn()
        except AnnealError as e:
            msg[0] = str(e)
    d.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise AnnealError(msg[0])
    return (others or fn)() if d.get_rank() != 0 else out


class NullTracker:
    """The tracker of ranks other than 0: no console, no W&B, no files."""

    def __init__(self, history=None):
        self.history, self.wandb_dir = list(history or []), None

    def log(self, row: dict, step: int) -> None:
        self.history.append({"step": step, **row})

    def print(self, *a, **k) -> None:
        pass

    def update_progress(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- engine
class Engine:
    """AdamW + clipping for one process, under the mixed-precision policy (anneal.model.precision): with a
    bf16 policy the optimizer steps fp32 masters fed by fp32 gradient accumulators and the model
    holds bf16 compute weights. Same interface as the DeepSpeed engine: backward(loss),
    step(lr) -> grad_norm, state_dict()/load_state_dict(), model_state_dict()."""

    def __init__(self, model: torch.nn.Module, tcfg, policy: PrecisionPolicy = PrecisionPolicy()):
        self.model, self.grad_clip = model, tcfg.grad_clip
        self.masters = MasterWeights(model, policy) if policy.mixed else None
        named = (list(zip(self.masters.names, self.masters.masters)) if self.masters
                 else [(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.params = [p for _, p in named]
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        fused = self.params[0].is_cuda
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.0, betas=tuple(tcfg.betas), eps=tcfg.eps, fused=fused or None)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.masters:
            self.masters.before_step()
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        if self.masters:
            self.masters.after_step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def reduce_expert_load(self, routers: dict) -> None:
        """One process: the local expert load is the global one."""

    def model_state_dict(self) -> dict:
        """Weights to checkpoint: the fp32 masters under a bf16 policy."""
        return self.masters.state_dict(self.model) if self.masters else self.model.state_dict()

    def full_precision_model(self) -> torch.nn.Module:
        """The model with its fp32 weights (the masters put back): for the final export."""
        if self.masters:
            self.masters.restore_fp32(self.model)
        return self.model

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------- loss
def to_device(batch: dict, device: torch.device) -> dict:
    """Host batch -> device without blocking the host (pinned memory, asynchronous copies)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def token_losses(model: Dots1ForCausalLM, batch: dict) -> torch.Tensor:
    """Per-token next-token cross-entropy [B, S] (fp32) for a packed batch of S+1 tokens per row
    already on the model's device."""
    ids = batch["input_ids"]
    return model.token_losses(ids[:, :-1], ids[:, 1:], position_ids=batch["position_ids"][:, :-1])


def accumulate(model: Dots1ForCausalLM, engine, batches, n_micro: int, n_sources: int, device: torch.device) -> dict:
    """Forward + backward over the `n_micro` micro-batches that `batches` yields (gradients
    accumulate, no optimizer step).
    Nothing here waits on the GPU: per-source loss sums and token counts stay on the device
    (tested under CUDA's sync debug mode); the caller reads them once, after the step."""
    loss_sum = torch.zeros(n_sources, device=device, dtype=torch.float64)
    count = torch.zeros(n_sources, device=device, dtype=torch.float64)
    aux_sum = torch.zeros((), device=device)
    has_aux = False
    for batch in batches:
        batch = to_device(batch, device)
        losses = token_losses(model, batch)
        loss = losses.mean()
        aux = model.aux_loss()
        if aux is not None:
            has_aux = True
            aux_sum += aux.detach()
            loss = loss + aux
        engine.backward(loss / n_micro)
        src = batch["source_ids"][:, 1:].reshape(-1)
        loss_sum.scatter_add_(0, src, losses.detach().reshape(-1).double())
        count.scatter_add_(0, src, torch.ones_like(src, dtype=torch.float64))
    return {"loss_sum": loss_sum, "count": count, "aux_sum": aux_sum if has_aux else None}


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_root = self.run_dir / "ckpt"

    # -- run folder ----------------------------------------------------------------------------
    def _claim_run_dir(self) -> Path | None:
        """Refuse to write over an existing run unless asked; return the checkpoint to resume."""
        cfg, marker = self.cfg, self.run_dir / RUN_MARKER
        if marker.exists() and not cfg.run.resume:
            if not cfg.run.overwrite:
                raise AnnealError(
                    f"run folder {self.run_dir} already holds a run. Pass run.resume=true to continue it, "
                    "run.overwrite=true to start it over, or another run.name")
            for name in ("ckpt", "tokenizer", "metrics.jsonl", "wandb", "wandb_id", "hf", RUN_MARKER):
                p = self.run_dir / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_from = training_state.latest_checkpoint(self.ckpt_root) if cfg.run.resume else None
        if not marker.exists():
            marker.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        return resume_from

    # -- main ----------------------------------------------------------------------------------
    def run(self) -> dict:
        from anneal.train.tracking import Tracker

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        device = self._setup_processes(pick_device(cfg.trainer.device))
        resume_from = rank0_first(self._claim_run_dir, lambda: training_state.latest_checkpoint(self.ckpt_root)
                                  if cfg.run.resume else None)
        p = rank0_first(lambda: self.prepare(device))
        load_peak_gb = self._gather_peak_memory()
        state = training_state.load_checkpoint(resume_from, p.model) if resume_from is not None else None
        notes: list[str] = []
        policy = PrecisionPolicy.for_device(cfg.trainer.bf16, device, note=notes.append,
                                            grad_accum=cfg.trainer.grad_accum_dtype)
        engine = self._make_engine(p.model, policy)  # casts the model to the policy's compute dtype
        if compile_enabled(cfg.model.compile, device):
            if cfg.model.experts_backend == "grouped_mm" and not policy.mixed:
                raise AnnealError("model.compile with model.experts_backend=grouped_mm needs bf16 compute "
                                  "(torch._grouped_mm traces only in bf16): set trainer.bf16=true, or "
                                  "model.compile=false, or another experts backend")
            p.model.compile_layers()
        step, tokens, history = 0, 0, []
        if state is not None:
            step, tokens, history = self._restore(state, engine, p.stream)

        run_config = OmegaConf.to_container(cfg, resolve=True)
        if self.rank == 0:
            tracker = Tracker(self.run_dir, cfg.logging, run_config, p.schedule.total_tokens, tokens, history)
        else:
            tracker = NullTracker(history)
        for note in notes:
            tracker.print(note)
        if resume_from is not None:
            tracker.print(f"resumed from {resume_from} (step {step}, {format_tokens(tokens)} tokens)")
        tracker.print(f"model ready: peak host memory per rank {', '.join(f'{g:.2f}' for g in load_peak_gb)} GB")
        try:
            result = self._loop(p, engine, tracker, device, step, tokens)
            tracker.print(p.stream.format_accounting(), markup=False, highlight=False)
        finally:
            tracker.close()
            p.stream.close()
        result["wandb_dir"] = tracker.wandb_dir
        return result

    def _setup_processes(self, device: torch.device) -> torch.device:
        """Under DeepSpeed: join the process group, pick this rank's GPU, and share rank 0's run
        folder (Hydra's timestamped name may differ between ranks). Sets self.rank/self.world."""
        cfg = self.cfg
        if cfg.trainer.engine == "deepspeed":
            from anneal.parallel import ds_engine

            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(device)
            ds_engine.init_distributed(device)
            folder = [str(self.run_dir)]
            _dist().broadcast_object_list(folder, src=0)
            self.run_dir, self.ckpt_root = Path(folder[0]), Path(folder[0]) / "ckpt"
        elif cfg.trainer.engine != "native":
            raise AnnealError(f"trainer.engine={cfg.trainer.engine!r}: use native or deepspeed")
        self.rank, self.world = rank_and_world()
        return device

    def _make_engine(self, model: Dots1ForCausalLM, policy: PrecisionPolicy):
        cfg = self.cfg
        if cfg.trainer.engine != "deepspeed":
            return Engine(model, cfg.trainer, policy)
        from anneal.parallel import ds_engine

        return ds_engine.DeepSpeedEngine(
            model, cfg.trainer, ep_size=cfg.parallel.ep_size, zero_stage=cfg.parallel.zero_stage, policy=policy,
            extra_config=OmegaConf.to_container(cfg.trainer.deepspeed, resolve=True) or None)

    def _restore(self, state: dict, engine, stream) -> tuple[int, int, list]:
        """Optimizer, data cursor and RNG from a checkpoint (weights are already loaded)."""
        if self.cfg.trainer.engine == "deepspeed":
            from anneal.parallel import ds_engine

            engine.load_state_dict(ds_engine.load_rank_state(self.ckpt_root, state["step"], self.rank))
        else:
            engine.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        training_state.set_rng_state(state["rng"])
        return state["step"], state["tokens"], state["history"]

    def _gather_peak_memory(self) -> list[float]:
        """Peak host memory of every rank after loading the model (what sharded loading saves)."""
        mine = peak_host_memory_gb()
        d = _dist()
        if d is None:
            return [mine]
        out = [None] * d.get_world_size()
        d.all_gather_object(out, mine)
        return out

    def prepare(self, device: torch.device) -> Prepared:
        from mixtures import PackedMixtureStream, load_mixture

        cfg = self.cfg
        model, mcfg, tokenizer, tok_dir, ckpt_name, entry_lr, folder_meta = \
            build_model_and_tokenizer(cfg, self.run_dir, device)
        if len(tokenizer) > mcfg.vocab_size:
            raise AnnealError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                              f"{mcfg.vocab_size}; use the checkpoint's own tokenizer")
        start_lr = resolve_start_lr(cfg, entry_lr, folder_meta)
        schedule, ramp = build_schedule(cfg, start_lr)
        check_batch_shape(ramp, cfg.data.seq_len, cfg.trainer.micro_batch_size, rank_and_world()[1])
        spec = load_mixture(cfg.data.mixture)
        # A mixture may also weight the standard WSD phases a recipe does not run (one mixture file
        # serves pretraining and anneal); any other stage name must be one of the schedule's.
        spec.check_stages(list(schedule.stage_names) + [s for s in WSD_PHASES if s not in schedule.stage_names],
                          active_stages=schedule.stage_names)
        stream = PackedMixtureStream(spec, tokenizer, seq_len=cfg.data.seq_len, seed=cfg.seed,
                                     stage=schedule.stage_names[0], num_workers=data_workers(cfg.data.num_workers, device))
        model.train()
        return Prepared(model, mcfg.to_hf_dict(), tokenizer, tok_dir, schedule, ramp, stream, spec,
                        ckpt_name, folder_meta)

    def _loop(self, p: Prepared, engine: Engine, tracker, device: torch.device, step: int, tokens: int) -> dict:
        cfg, model, schedule, stream = self.cfg, p.model, p.schedule, p.stream
        seq_len, mbs = cfg.data.seq_len, cfg.trainer.micro_batch_size
        eval_every = parse_tokens(cfg.trainer.eval_every, "trainer.eval_every")
        ckpt_every = parse_tokens(cfg.trainer.ckpt_every, "trainer.ckpt_every")
        total = schedule.total_tokens
        stage_ends = {schedule.stage_end(n) for n in schedule.stage_names}
        routers = model.routers()
        flops_per_token = Dots1Config.from_hf_dict(p.hf_config).train_flops_per_token(seq_len)
        peak_tflops = device_peak_tflops(device)
        if step == 0 and not tracker.history:
            tracker.log({"tokens": 0, **self.evaluate(p, device)}, step=0)

        t_last, tokens_last, stopped_early = time.perf_counter(), tokens, False
        while tokens < total:
            stage = schedule.stage_at(tokens)
            stream.set_stage(stage.name)
            lr = schedule.lr_at(tokens)
            n_seqs = p.ramp.batch_at(tokens) // seq_len
            n_micro = n_seqs // mbs

            metrics = self._train_step(p, engine, device, n_micro, lr)
            moe_stats = self._update_router_biases(routers, engine)
            step += 1
            tokens += n_seqs * seq_len
            train_loss = metrics["loss"]

            now = time.perf_counter()
            tps = (tokens - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens
            device_tflops = tps * flops_per_token / 1e12 / self.world
            row = {"tokens": tokens, "lr": lr, "stage": stage.name, "tokens_per_s": tps,
                   "model_tflops_per_device": device_tflops,
                   **({"mfu": device_tflops / peak_tflops} if peak_tflops else {}),
                   "batch_tokens": n_seqs * seq_len, **metrics, **moe_stats}
            if device.type == "cuda":
                row["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            crossed = lambda every: every > 0 and tokens // every != (tokens - n_seqs * seq_len) // every  # noqa: E731
            at_stage_end = tokens in stage_ends or tokens >= total or \
                schedule.stage_at(tokens).name != stage.name
            if crossed(eval_every) or at_stage_end:
                row.update(self.evaluate(p, device))
                row["data"] = stream.accounting()
            if step % cfg.trainer.log_every == 0 or "eval_loss" in row:
                tracker.log(row, step=step)
            tracker.update_progress(tokens, stage.name, train_loss, lr, tps)

            stop_now = cfg.trainer.stop_after_steps is not None and step >= cfg.trainer.stop_after_steps
            if crossed(ckpt_every) or at_stage_end or stop_now:
                self.save(p, engine, step, tokens, tracker.history, stage.name, schedule.lr_at(tokens))
            if stop_now and tokens < total:
                stopped_early = True
                break

        result = {"step": step, "tokens": tokens, "run_dir": str(self.run_dir), "history": tracker.history,
                  "stopped_early": stopped_early, "export_dir": None}
        if not stopped_early:
            result["export_dir"] = self.finish(p, engine, tracker, tokens)
        return result

    # -- pieces --------------------------------------------------------------------------------
    def _train_step(self, p: Prepared, engine: Engine, device: torch.device, n_micro: int, lr: float) -> dict:
        """Gradient accumulation over `n_micro` global micro-batches, then one optimizer step; the
        step's statistics are read from the device once, after the step."""
        mbs = self.cfg.trainer.micro_batch_size
        rank, world = rank_and_world()
        n_micro //= world
        n_src = len(p.spec.source_names)

        def batches():
            # Every rank reads the same stream (same seed, same state: one data cursor in the
            # checkpoint) and keeps its own rows of each global micro-batch.
            for _ in range(n_micro):
                batch = p.stream.next_batch(mbs * world)
                yield {k: v[rank * mbs:(rank + 1) * mbs] for k, v in batch.items()} if world > 1 else batch

        sums = accumulate(p.model, engine, batches(), n_micro, n_src, device)
        grad_norm = engine.step(lr)
        aux = sums["aux_sum"]
        stats = torch.stack([sums["loss_sum"], sums["count"],
                             (aux.double() if aux is not None else sums["count"].new_zeros(())).expand(n_src)])
        if world > 1:
            stats = stats.cpu()
            _dist().all_reduce(stats)
            stats[2] /= world
        loss_sum, count, aux_mean = stats.tolist()
        out = {"loss": sum(loss_sum) / sum(count), "grad_norm": grad_norm,
               **{f"loss/{name}": s / c for name, s, c in zip(p.spec.source_names, loss_sum, count) if c}}
        if aux is not None:
            out["aux_loss"] = aux_mean[0] / n_micro
        return out

    def _update_router_biases(self, routers: dict, engine) -> dict:
        """Aux-loss-free balancing after each optimizer step, from the global expert load (summed
        over ranks by the engine); returns per-layer load statistics (one device read)."""
        if not routers:
            return {}
        engine.reduce_expert_load(routers)
        ratios, spreads = [], []
        for router in routers.values():
            load = router.expert_load
            ratios.append(load.max() / load.mean().clamp_min(1e-9))
            router.update_bias(self.cfg.model.bias_update_rate, load)
            bias = router.e_score_correction_bias
            spreads.append(bias.max() - bias.min())
        ratios, spreads = torch.stack(ratios).tolist(), torch.stack(spreads).tolist()
        stats = {}
        for layer, ratio, spread in zip(routers, ratios, spreads):
            stats[f"moe/load_max_over_mean/layer{layer}"] = ratio
            stats[f"moe/bias_spread/layer{layer}"] = spread
        stats["moe/load_max_over_mean"] = max(ratios)
        return stats

    @torch.no_grad()
    def evaluate(self, p: Prepared, device: torch.device) -> dict:
        model = p.model
        model.eval()
        out, means = {}, []
        for name in p.spec.source_names:
            batch = p.stream.heldout_batches(name, self.cfg.data.eval_seqs, self.cfg.data.seq_len)
            if batch is None or batch["input_ids"].numel() == 0:
                continue
            losses = token_losses(model, to_device(batch, device))
            out[f"eval_loss/{name}"] = float(losses.mean())
            means.append(out[f"eval_loss/{name}"])
        if means:
            out["eval_loss"] = sum(means) / len(means)
        model.train()
        return out

    def save(self, p: Prepared, engine: Engine, step: int, tokens: int, history: list, stage: str, lr: float) -> Path:
        meta = {"step": step, "tokens": tokens, "stage": stage, "lr": lr, "checkpoint": p.checkpoint_name,
                "tokens_seen_total": p.meta.get("tokens_seen_total", 0) + tokens}
        if self.cfg.trainer.engine == "deepspeed":
            return self._save_distributed(p, engine, step, tokens, history, meta)
        state = {"step": step, "tokens": tokens, "optimizer": engine.state_dict(), "data": p.stream.state_dict(),
                 "rng": training_state.rng_state(), "history": list(history)}
        return training_state.save_checkpoint(self.ckpt_root, step, _StateDictView(engine.model_state_dict()),
                                             p.hf_config, state, meta, keep=self.cfg.trainer.keep_checkpoints)

    def _save_distributed(self, p: Prepared, engine, step: int, tokens: int, history: list, meta: dict) -> Path:
        """Each rank writes its ZeRO partition (ckpt/zero/step_N/rank_R.pt); then rank 0 writes the
        step folder (experts gathered into the unsharded layout) atomically: the commit point."""
        from anneal.parallel import ds_engine
        from moe import ep

        d = _dist()
        ds_engine.save_rank_state(self.ckpt_root, step, self.rank, engine.state_dict())
        full = ep.full_state_dict(p.model, engine.groups)  # collective
        d.barrier()
        final = self.ckpt_root / f"step_{step:08d}"
        if self.rank == 0:
            state = {"step": step, "tokens": tokens, "optimizer": None, "layout": engine.layout(),
                     "data": p.stream.state_dict(), "rng": training_state.rng_state(), "history": list(history)}
            final = training_state.save_checkpoint(self.ckpt_root, step, _StateDictView(full), p.hf_config, state,
                                                  meta, keep=self.cfg.trainer.keep_checkpoints)
            ds_engine.prune_rank_states(self.ckpt_root)
        d.barrier()
        return final

    def finish(self, p: Prepared, engine, tracker, tokens: int) -> str | None:
        """Export the annealed model (fp32 masters, cast to export.dtype) as an HF folder, and draw
        the loss/schedule plots."""
        if self.cfg.trainer.engine == "deepspeed":
            return self._finish_distributed(p, tracker, tokens)
        return self._plot_and_export(Prepared(**{**p.__dict__, "model": engine.full_precision_model()}), tracker, tokens)

    def _plot_and_export(self, p: Prepared, tracker, tokens: int) -> str | None:
        cfg = self.cfg
        if cfg.logging.plots:
            from anneal.train.plots import plot_losses, plot_schedule

            plot_losses(tracker.history, self.run_dir / "losses.png", schedule=p.schedule)
            plot_schedule(p.schedule, p.ramp, self.run_dir / "schedule.png")
        if not cfg.export.enabled:
            return None
        from anneal.checkpoints.hf_export import export_hf_checkpoint

        export_dir = Path(cfg.export.dir) if cfg.export.dir else self.run_dir / "hf"
        last_stage = p.schedule.stage_names[-1]
        meta = {"stage": last_stage, "lr": p.schedule.lr_at(tokens),
                "tokens_seen_total": p.meta.get("tokens_seen_total", 0) + tokens,
                "started_from": p.checkpoint_name, "schedule": p.schedule.to_config()}
        export_hf_checkpoint(p.model, export_dir, tokenizer_dir=p.tokenizer_dir,
                             dtype=getattr(torch, cfg.export.dtype), max_shard_size=cfg.export.max_shard_size,
                             overwrite=cfg.export.overwrite, extra_files={META_FILE: json.dumps(meta, indent=2)})
        return str(export_dir)

    def _finish_distributed(self, p: Prepared, tracker, tokens: int) -> str | None:
        """Gather the experts (collective), then rank 0 plots and exports an unsharded model."""
        from moe import ep

        full = ep.full_state_dict(p.model, p.model.ep_groups)
        out = None
        if self.rank == 0:
            from anneal.model.config import Dots1Config

            whole = Dots1ForCausalLM(Dots1Config.from_hf_dict(dict(p.hf_config)))
            whole.load_state_dict(full, strict=True)
            out = self._plot_and_export(Prepared(**{**p.__dict__, "model": whole}), tracker, tokens)
        folder = [out]
        _dist().broadcast_object_list(folder, src=0)
        return folder[0]


class _StateDictView:
    """Something with a state_dict(): what checkpointing/export read from a model."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    return Trainer(cfg, Path(run_dir)).run()
