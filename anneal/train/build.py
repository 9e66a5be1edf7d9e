"""Everything a run needs before its first step, built from the composed config: the model (from
a checkpoint or random init), the tokenizer, the token-indexed schedule and batch ramp, the
mixture stream, and the engine class. The model comes out as one process's whole model: making
it parallel (experts, recompute, compile) is `anneal.parallel.parallelize`."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from anneal.checkpoints.run_checkpoints import export_meta
from anneal.errors import AnnealError
from anneal.model.config import Dots1Config
from anneal.model.dots1 import Dots1ForCausalLM
from anneal.parallel.layout import ParallelLayout
from anneal.train.batch_ramp import BatchRamp
from anneal.train.devices import available_host_memory_gb, data_workers
from anneal.train.schedule import Schedule, format_tokens
from anneal.train.start_lr import resolve_start_lr

WSD_PHASES = ("warmup", "stable", "stage1", "stage2")


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


def engine_class(name: str):
    """The engine class of `trainer.engine` (the seam of `anneal.train.engine`)."""
    if name == "native":
        from anneal.train.engine import Engine

        return Engine
    if name == "deepspeed":
        from anneal.parallel.ds_engine import DeepSpeedEngine

        return DeepSpeedEngine
    raise AnnealError(f"trainer.engine={name!r}: use native or deepspeed")


def build_model_and_tokenizer(cfg: DictConfig, run_dir: Path, device: torch.device, layout: ParallelLayout):
    """-> (model, hf_config dict, tokenizer, tokenizer_dir, checkpoint name, start-LR hint, folder meta).
    Under expert parallelism each rank reads only its own experts (`layout.expert_range`)."""
    from transformers import AutoTokenizer

    backend = cfg.model.experts_backend
    tokenizer_dir = run_dir / "tokenizer"
    if cfg.checkpoint is None:  # random init (e.g. the recipe that makes the tiny checkpoint)
        if not cfg.model.arch:
            raise AnnealError("checkpoint is null (random init) but model.arch is empty; "
                              "use model=tiny or give model.arch fields")
        arch = OmegaConf.to_container(cfg.model.arch, resolve=True)
        mcfg = Dots1Config.from_hf_dict(arch, source="model.arch")
        model = Dots1ForCausalLM(mcfg, backend, cfg.model.aux_loss_coef, document_mask=cfg.model.document_mask)
        model.init_weights(seed=cfg.model.init_seed)
        tokenizer = _tokenizer_for_random_init(cfg, tokenizer_dir)
        mcfg.eos_token_id = tokenizer.eos_token_id  # model.arch cannot know the trained tokenizer's ids
        return model.to(device), mcfg, tokenizer, tokenizer_dir, None, None, {}

    from anneal.checkpoints.catalog import Catalog
    from anneal.checkpoints.hf_load import load_hf_checkpoint

    resolved = Catalog.load(list(cfg.catalog_files)).resolve(cfg.checkpoint)
    expert_range = None
    if layout.ep_size > 1:
        expert_range = layout.expert_range(Dots1Config.from_json(Path(resolved.path) / "config.json").n_routed_experts)
    model, mcfg = load_hf_checkpoint(resolved.path, dtype=torch.float32, experts_backend=backend,
                                     device=str(device), expert_range=expert_range)
    model.set_aux_loss_coef(cfg.model.aux_loss_coef)
    model.document_mask = cfg.model.document_mask
    folder_meta = export_meta(Path(resolved.path))
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
    ramp = build_ramp(cfg)
    return round_stages_to_steps(Schedule.from_config(sched_cfg), ramp, cfg.data.seq_len), ramp


def round_stages_to_steps(schedule: Schedule, ramp, seq_len: int) -> Schedule:
    """The schedule with every stage a whole number of optimizer steps long (each step takes
    ``ramp.batch_at(tokens)`` rounded down to whole sequences), so a stage's end falls on a step
    boundary and the step after it trains at exactly the stage's ``lr_end``. A stage is rounded to
    the nearer step boundary (at least one step); each change is a line in ``.notes``."""
    froms = [f for f, _ in ramp.points]
    stages, notes, start = [], [], 0
    for st in schedule.stages:
        target, t, last = start + st.tokens, start, start
        while t < target:   # whole steps up to the target, a run of equal batches at a time
            b = max(ramp.batch_at(t) // seq_len, 1) * seq_len
            limit = min([target, *(f for f in froms if f > t)])
            n = -(-(limit - t) // b)
            last, t = t + (n - 1) * b, t + n * b
        end = t if last == start or t - target <= target - last else last
        batch = max(ramp.batch_at(start) // seq_len, 1) * seq_len
        if end != target:
            what = (f"is shorter than one batch ({format_tokens(batch)} tokens)" if st.tokens < batch else
                    f"is not a whole number of {format_tokens(batch)}-token batches")
            notes.append(f"schedule: stage {st.name} ({format_tokens(st.tokens)} tokens) {what}: it runs "
                         f"{format_tokens(end - start)} tokens (whole steps) so that it still ends at its lr_end "
                         f"{st.lr_end:.3g}")
        stages.append(dataclasses.replace(st, tokens=end - start))
        start = end
    rounded = Schedule(stages, start_lr=schedule.start_lr)
    rounded.notes = tuple(notes)
    return rounded


def build_ramp(cfg: DictConfig) -> BatchRamp:
    bt = cfg.schedule.batch_tokens
    return BatchRamp.from_config(OmegaConf.to_container(bt, resolve=True) if OmegaConf.is_config(bt) else bt)


def check_batch_shape(ramp: BatchRamp, seq_len: int, micro_batch_size: int, world_size: int = 1,
                      paired: bool = False) -> None:
    """Every step is a whole number of micro-batches on every rank; `paired` (parallel.a2a_overlap):
    at least two."""
    from anneal.train.paired_schedule import check_micro_batches

    for start, batch_tokens in ramp.points:
        per_micro = seq_len * micro_batch_size * world_size
        ranks = f" × {world_size} ranks" if world_size > 1 else ""
        if batch_tokens % per_micro:
            raise AnnealError(
                f"schedule.batch_tokens: {batch_tokens} tokens (from token {start}) is not a multiple of "
                f"data.seq_len × trainer.micro_batch_size{ranks} = {per_micro}; "
                "change one of them so each step is a whole number of micro-batches on every rank")
        if paired:
            check_micro_batches(batch_tokens // per_micro, f"schedule.batch_tokens={batch_tokens} (from token {start}) "
                                f"/ (data.seq_len × trainer.micro_batch_size{ranks} = {per_micro})")


def data_shards(cfg: DictConfig, layout: ParallelLayout) -> range:
    """The data shards this rank reads (`mixtures.shards`): each rank tokenizes only its own rows."""
    from mixtures import rank_shards

    n, world, mbs = cfg.data.shards or layout.world, layout.world, cfg.trainer.micro_batch_size
    if n < 1 or n % world:
        raise AnnealError(f"data.shards={n} must be a positive multiple of the number of ranks ({world}); "
                          f"leave it null for one shard per rank")
    if mbs % (n // world):
        raise AnnealError(f"trainer.micro_batch_size={mbs} must be a multiple of data.shards / ranks = "
                          f"{n // world}: each micro-batch takes the same number of rows from each shard")
    return rank_shards(n, layout.rank, world)


def check_layout_fits(cfg: DictConfig, layout: ParallelLayout, device: torch.device,
                      gpu_mem_gb: float | None = None, host_mem_gb: float | None = None) -> None:
    """Refuse, with the planner's one-line reason (anneal-plan memory), a layout whose GPU memory
    (CUDA) or, with parallel.offload=optimizer, host memory does not fit this machine. Memory
    defaults to the device's and the host's available memory (checked before any rank has loaded
    weights, so with no node reserve on top)."""
    from anneal.host_plan import HostRates, plan_host, why_not
    from anneal.memory_plan import layout_from_config, model_config_for_plan, plan_memory

    from anneal.memory_plan import BF16_MOMENTS

    if cfg.parallel.offload_moments != "fp32":
        raise AnnealError(BF16_MOMENTS)
    offload = cfg.parallel.offload == "optimizer"
    if gpu_mem_gb is None and device.type == "cuda":
        gpu_mem_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
    reserve = {}
    if host_mem_gb is None and offload:
        host_mem_gb, reserve = available_host_memory_gb(), {"node_reserve_gb": 0.0}
    if gpu_mem_gb is None and host_mem_gb is None:
        return
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", min(layout.world, 8)))
    lay = layout_from_config(cfg, layout.world, per_node, gpu_mem_gb or float("inf"), 6.0,
                             host_mem_gb if offload else None)
    mcfg, source = model_config_for_plan(cfg)
    # the per-rank process, data pipeline and node reserve figures are a GPU node's (CUDA host side,
    # launcher, page cache); on a CPU run (tests, debugging) only the offloaded optimizer state is checked
    rates = HostRates(**reserve) if device.type == "cuda" else HostRates(process_gb=0.0, data_gb=0.0, node_reserve_gb=0.0)
    reason = why_not(plan := plan_memory(mcfg, lay), plan_host(mcfg, plan, rates))
    if reason:
        raise AnnealError(f"this layout does not fit ({source}, {layout.world} rank(s)): {reason} "
                          f"(anneal-plan memory ... --gpus {layout.world} shows the whole plan)")


def prepare(cfg: DictConfig, run_dir: Path, device: torch.device, layout: ParallelLayout) -> Prepared:
    from mixtures import ShardedStream, load_mixture

    # the batch shape and the memory plan first: a bad one is reported before a large checkpoint is read
    check_batch_shape(build_ramp(cfg), cfg.data.seq_len, cfg.trainer.micro_batch_size, layout.world,
                      cfg.parallel.a2a_overlap)
    check_layout_fits(cfg, layout, device)
    model, mcfg, tokenizer, tok_dir, ckpt_name, entry_lr, folder_meta = \
        build_model_and_tokenizer(cfg, run_dir, device, layout)
    if len(tokenizer) > mcfg.vocab_size:
        raise AnnealError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{mcfg.vocab_size}; use the checkpoint's own tokenizer")
    start_lr = resolve_start_lr(cfg, entry_lr, folder_meta)
    schedule, ramp = build_schedule(cfg, start_lr)
    spec = load_mixture(cfg.data.mixture)
    # A mixture may also weight the standard WSD phases a recipe does not run (one mixture file
    # serves pretraining and anneal); any other stage name must be one of the schedule's.
    spec.check_stages(list(schedule.stage_names) + [s for s in WSD_PHASES if s not in schedule.stage_names],
                      active_stages=schedule.stage_names)
    stream = ShardedStream(spec, tokenizer, seq_len=cfg.data.seq_len, seed=cfg.seed, stage=schedule.stage_names[0],
                           shards=data_shards(cfg, layout), n_shards=cfg.data.shards or layout.world,
                           num_workers=data_workers(cfg.data.num_workers, device))
    model.train()
    return Prepared(model, mcfg.to_hf_dict(), tokenizer, tok_dir, schedule, ramp, stream, spec,
                    ckpt_name, folder_meta)
