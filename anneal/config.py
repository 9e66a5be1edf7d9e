"""The typed config schema behind the Hydra recipes.

Hydra composes `conf/config.yaml` (+ a recipe + command-line overrides) on top of this schema,
so a misspelt key or a wrong type fails once, at start-up, with the key's full name.
Token counts are strings or ints ("20B", 1_000_000) and are parsed by `anneal.train.schedule.parse_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelCfg:
    experts_backend: str = "torch"         # torch | grouped_mm | triton (moe.experts)
    aux_loss_coef: float = 0.0             # sequence-wise balance loss; 0 = aux-loss-free only
    bias_update_rate: float = 1e-3         # aux-loss-free bias step per optimizer step (DeepSeek-V3)
    gradient_checkpointing: bool = False
    compile: Optional[bool] = None         # torch.compile each decoder layer + the loss head; null = on for CUDA
    arch: Optional[dict] = None            # HF config.json fields; only used when checkpoint is null
    init_seed: int = 0


@dataclass
class DataCfg:
    mixture: str = "demo"                  # bundled mixture name or a path to a mixture YAML
    seq_len: int = 256
    eval_seqs: int = 4                     # held-out sequences per source for eval loss
    tokenizer: Optional[str] = None        # null: the checkpoint's; "train": train a BPE on the mixture
    tokenizer_vocab_size: int = 4096
    num_workers: Optional[int] = None      # background tokenization processes (0 = in the trainer); null = 1 on CUDA, 0 on CPU
    shards: Optional[int] = None           # disjoint data streams, split over the ranks (mixtures/shards.py); null = one per rank


@dataclass
class StageCfg:
    name: str = "???"
    tokens: str = "???"
    lr_end: float = "???"  # type: ignore[assignment]
    lr_start: Optional[float] = None
    shape: str = "linear"
    allow_rise: bool = False


@dataclass
class ScheduleCfg:
    start_lr: Optional[float] = None       # null: the checkpoint's LR (catalog entry or its anneal_meta.json)
    stages: list[StageCfg] = field(default_factory=list)
    batch_tokens: Any = 4096               # tokens per optimizer step: a count, or a ramp [{from, batch_tokens}]


@dataclass
class TrainerCfg:
    engine: str = "native"                 # native (one process) | deepspeed (launch with deepspeed/torchrun)
    device: str = "auto"                   # auto | cpu | cuda
    micro_batch_size: int = 8              # sequences per forward/backward
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = True                      # bf16 compute weights, fp32 masters/grads/optimizer (anneal.model.precision); CUDA only
    grad_accum_dtype: str = "fp32"         # fp32 | bf16: dtype gradients are summed in over a step's micro-batches
    eval_every: str = "0"                  # tokens between evals; 0 = only at stage ends
    ckpt_every: str = "0"                  # tokens between resumable checkpoints; 0 = stage ends only
    keep_checkpoints: int = 2
    log_every: int = 1                     # optimizer steps between metric logs
    stop_after_steps: Optional[int] = None  # stop early (as if killed after that step's checkpoint)
    threads: Optional[int] = None          # torch CPU threads; null = torch's default
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed config keys (engine=deepspeed); see docs/deepspeed.md


@dataclass
class ParallelCfg:
    ep_size: int = 1                       # expert-parallel size; divides the expert count and the world size
    zero_stage: int = 1                    # ZeRO stage of the DeepSpeed engine: 1 or 2


@dataclass
class LoggingCfg:
    wandb: bool = True
    project: str = "anneal"
    entity: Optional[str] = None
    mode: str = "offline"                  # offline (sync later with `wandb sync`) | online | disabled
    progress: bool = True
    plots: bool = True


@dataclass
class RunCfg:
    root: str = "runs"
    name: str = "???"
    dir: str = "${hydra:runtime.output_dir}"
    resume: bool = False                   # continue from the newest checkpoint in run.dir
    overwrite: bool = False                # start over in a run folder that already holds a run


@dataclass
class ExportCfg:
    enabled: bool = True
    dir: Optional[str] = None              # null: <run.dir>/hf
    dtype: str = "bfloat16"
    max_shard_size: str = "2GB"
    overwrite: bool = False


@dataclass
class Config:
    checkpoint: Optional[str] = "tiny-stable"   # catalog name, local HF folder, or null (random init)
    catalog_files: list[str] = field(default_factory=list)
    seed: int = 1234
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    parallel: ParallelCfg = field(default_factory=ParallelCfg)
    logging: LoggingCfg = field(default_factory=LoggingCfg)
    run: RunCfg = field(default_factory=RunCfg)
    export: ExportCfg = field(default_factory=ExportCfg)


def register_schema() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
