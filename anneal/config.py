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
    recompute: str = "none"                # none | selective | full: activations recomputed in the backward (anneal.model.recompute)
    gradient_checkpointing: Optional[bool] = None  # replaced by model.recompute (a set value is refused with the new spelling)
    document_mask: bool = False            # attention inside each packed document (README: intra-document attention)
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
class SpikeCfg:
    """The loss-spike guard (anneal.train.guards): off by default."""
    enabled: bool = False
    window: int = 50                       # applied steps of the current stage the mean and std are taken over
    k: float = 6.0                         # drop the update of a step whose loss > mean + k * std


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
    grad_accum_fusion: bool = True         # bf16 + fp32 sums, native engine or DeepSpeed ZeRO 1: weight-gradient GEMMs (dense; triton experts) add into the fp32 sums
    eval_every: str = "0"                  # tokens between evals; 0 = only at stage ends
    ckpt_every: str = "0"                  # tokens between resumable checkpoints; 0 = stage ends only; off = none (a benchmark: the run cannot resume)
    keep_checkpoints: int = 2
    log_every: int = 1                     # optimizer steps between metric logs
    stop_after_steps: Optional[int] = None  # stop early (as if killed after that step's checkpoint)
    profile_steps: list[int] = field(default_factory=list)  # [first, last] optimizer steps to record with torch.profiler (anneal.train.profiling)
    threads: Optional[int] = None          # torch CPU threads; null = torch's default
    deterministic: Optional[bool] = None   # deterministic algorithms; null = on for CPU, off for CUDA (README)
    on_nonfinite: str = "stop"             # stop | skip: what a NaN/inf loss or gradient norm does (the update is never applied)
    max_skipped_steps: int = 10            # this many dropped updates in a row stop the run
    spike: SpikeCfg = field(default_factory=SpikeCfg)
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed config keys (engine=deepspeed); see docs/deepspeed.md


@dataclass
class ParallelCfg:
    ep_size: int = 1                       # expert-parallel size; divides the expert count and the world size
    zero_stage: int = 1                    # ZeRO stage of the DeepSpeed engine: 1 or 2
    offload: str = "none"                  # none | optimizer: fp32 masters + AdamW state in host memory (DeepSpeed CPU Adam)
    offload_moments: str = "fp32"          # dtype of AdamW's m and v on the host: fp32 (bf16 is refused with the reason: CPU Adam would need bf16 masters)
    offload_chunk_mb: int = 256            # ZeRO 2 offload: the update streams the fp32 gradient down, steps it and uploads the bf16
                                           # weights this many MiB (of fp32) at a time: no whole-partition host copies (12 B per
                                           # parameter of host memory instead of 18); 0 = DeepSpeed's own step
    a2a_overlap: bool = False              # paired 1F1B schedule: one micro-batch's all-to-all hides behind
                                           # another's compute (docs/overlap.md); needs >= 2 micro-batches per rank


@dataclass
class LoggingCfg:
    wandb: bool = True
    project: str = "anneal"
    group: Optional[str] = None            # W&B group; null = the sweep's name under --multirun (branches side by side)
    entity: Optional[str] = None
    mode: str = "offline"                  # offline (sync later with `wandb sync`) | online | disabled
    progress: bool = True
    plots: bool = True


@dataclass
class RunCfg:
    root: str = "runs"
    name: str = "???"
    dir: Optional[str] = "${hydra:runtime.output_dir}"  # null outside a run (anneal --cfg job --resolve)
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
class EvalTaskCfg:
    task: str = "???"                      # a bundled task (gsm8k, humaneval, chnsenticorp) or a task YAML path
    limit: Optional[int] = None            # score a seeded sample of this many items; null = the task's
    shots: Optional[int] = None            # k-shot; null = the task's


@dataclass
class EvalCfg:
    """Benchmark evals (anneal.evals): in the loop with the held-out losses, and on the export."""
    tasks: list[EvalTaskCfg] = field(default_factory=list)
    batch_tokens: int = 8192               # tokens per eval forward (rows x padded length)
    after_export: bool = False             # run anneal-eval (lm-evaluation-harness) on the export at the end
    harness_tasks: Optional[list[str]] = None  # tasks for after_export; null = eval.tasks' (their limit, shots)
    harness_limit: Optional[int] = None    # caps after_export's items per task; null = no cap
    backend: str = "hf"                    # hf | vllm: lm-evaluation-harness's model backend
    allow_code_execution: bool = False     # after_export: run model-written code (HumanEval pass@1, sandboxed)


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
    eval: EvalCfg = field(default_factory=EvalCfg)


def register_schema() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


# ------------------------------------------------------------------------------------ validation
# Sign and range of the numeric fields (Hydra checks only the types), and the allowed words.
_RANGES = {  # key: (lowest allowed, lowest is exclusive, what it means)
    "seed": (0, False, "a random seed"),
    "model.aux_loss_coef": (0, False, "0 turns the balance loss off"),
    "model.bias_update_rate": (0, False, "0 freezes the router biases"),
    "model.init_seed": (0, False, "a random seed"),
    "data.seq_len": (2, False, "tokens per training sequence"),
    "data.eval_seqs": (0, False, "held-out sequences per source; 0 turns eval off"),
    "data.tokenizer_vocab_size": (1, False, "BPE vocabulary size"),
    "data.num_workers": (0, False, "background tokenizer processes"),
    "schedule.start_lr": (0, False, "a learning rate; 0 starts a warm-up from zero"),
    "trainer.micro_batch_size": (1, False, "sequences per forward/backward"),
    "trainer.eps": (0, True, "AdamW epsilon"),
    "trainer.weight_decay": (0, False, "AdamW weight decay"),
    "trainer.grad_clip": (0, False, "max gradient norm; 0 turns clipping off"),
    "trainer.keep_checkpoints": (1, False, "checkpoints kept; the newest is never deleted"),
    "trainer.log_every": (1, False, "optimizer steps between logged rows"),
    "trainer.stop_after_steps": (1, False, "optimizer steps before stopping"),
    "trainer.threads": (1, False, "CPU threads"),
    "trainer.max_skipped_steps": (1, False, "dropped updates in a row before the run stops"),
    "trainer.spike.window": (2, False, "steps the loss mean and std are taken over"),
    "trainer.spike.k": (0, True, "standard deviations above the mean"),
    "parallel.ep_size": (1, False, "expert-parallel size"),
    "parallel.offload_chunk_mb": (0, False, "MiB of fp32 gradient per streamed chunk (0: DeepSpeed's own step)"),
    "eval.batch_tokens": (1, False, "tokens per benchmark-eval forward"),
    "eval.harness_limit": (1, False, "items per task"),
}
_CHOICES = {
    "model.recompute": ("none", "selective", "full"),
    "parallel.offload": ("none", "optimizer"),
    "parallel.offload_moments": ("fp32", "bf16"),
    "trainer.engine": ("native", "deepspeed"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.grad_accum_dtype": ("fp32", "bf16"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "logging.mode": ("offline", "online", "disabled"),
    "export.dtype": ("bfloat16", "float16", "float32"),
    "eval.backend": ("hf", "vllm"),
}
# subtrees whose keys are the user's (HF config fields, DeepSpeed keys, list items)
_FREE_FORM = ("model.arch.", "trainer.deepspeed.", "schedule.stages.", "schedule.batch_tokens.",
              "catalog_files.", "trainer.betas.", "eval.tasks.", "eval.harness_tasks.")
# names other trainers use for what lives elsewhere here
_ELSEWHERE = {"lr": "schedule.start_lr", "learning_rate": "schedule.start_lr", "batch_size": "schedule.batch_tokens",
              "global_batch_size": "schedule.batch_tokens", "max_steps": "trainer.stop_after_steps"}
CONFIG_GROUPS = ("model", "data", "schedule", "trainer", "parallel", "logging", "recipe")


def validate_config(cfg) -> None:
    """One AnnealError naming the key for a number out of range or a word not allowed."""
    from omegaconf import OmegaConf

    from anneal.errors import AnnealError

    for key, (low, exclusive, what) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AnnealError(f"{key}={value!r}: must be a number ({what})")
        if value < low or (exclusive and value == low):
            bound = f"> {low}" if exclusive else f">= {low}"
            raise AnnealError(f"{key}={value}: must be {bound} ({what})")
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise AnnealError(f"{key}={value!r}: must be one of {', '.join(allowed)}")
    old = OmegaConf.select(cfg, "model.gradient_checkpointing")
    if old is not None:
        raise AnnealError(f"model.gradient_checkpointing={old} is replaced by model.recompute: use "
                          f"model.recompute={'full' if old else 'none'} (or selective: README, 'Activation recompute')")
    betas = list(cfg.trainer.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise AnnealError(f"trainer.betas={betas}: must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    profile_window(OmegaConf.select(cfg, "trainer.profile_steps"))
    _check_compile_backend(cfg)


def profile_window(steps) -> tuple[int, int] | None:
    """`trainer.profile_steps` as (first, last), or None when empty; one error naming the key."""
    from anneal.errors import AnnealError

    steps = list(steps or [])
    if not steps:
        return None
    if len(steps) > 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps) \
            or steps[0] > steps[-1]:
        raise AnnealError(f"trainer.profile_steps={steps}: give [first] or [first, last] optimizer steps, "
                          f"1 <= first <= last (e.g. trainer.profile_steps=[5,6])")
    return steps[0], steps[-1]


def compile_enabled(setting: bool | None, device) -> bool:
    """model.compile: null = on for CUDA (measured faster: bench/RESULTS.md), off on CPU, where
    compiling costs more start-up time than a short run saves."""
    return device.type == "cuda" if setting is None else bool(setting)


def _check_compile_backend(cfg) -> None:
    """model.compile with the grouped_mm experts backend needs bf16 compute (torch._grouped_mm
    traces only in bf16) and cannot take selective recompute (below). Compile and bf16 compute both
    follow the device the run will pick (`model.compile` null and `trainer.bf16` apply on CUDA only)."""
    import torch

    from anneal.errors import AnnealError

    on_cuda = cfg.trainer.device in ("auto", "cuda") and torch.cuda.is_available()
    compiled = compile_enabled(cfg.model.compile, torch.device("cuda" if on_cuda else "cpu"))
    if not (compiled and cfg.model.experts_backend == "grouped_mm"):
        return
    if cfg.model.recompute == "selective":
        # measured on H100 and H200 (torch 2.11, bench/RESULTS.md "Activation recompute"); Inductor (as
        # its CPU code shows) lays the recomputed, expert-sorted rows out column-major for the weight
        # gradient, and CUDA's _grouped_mm asserts that a contiguous grouped dimension is a multiple
        # of 16 bytes
        raise AnnealError("model.recompute=selective with model.experts_backend=grouped_mm under model.compile "
                          "aborts on CUDA (a device-side assert in torch._grouped_mm's weight gradient): use "
                          "model.experts_backend=triton, or model.recompute=none|full, or model.compile=false")
    if not (cfg.trainer.bf16 and on_cuda):
        raise AnnealError("model.compile with model.experts_backend=grouped_mm needs bf16 compute "
                          "(torch._grouped_mm traces only in bf16): set trainer.bf16=true, or "
                          "model.compile=false, or another experts backend")


def schema_keys() -> list[str]:
    """Every dotted key of the schema, sections included (trainer, trainer.spike, ...)."""
    from omegaconf import OmegaConf

    keys: list[str] = []

    def walk(node, prefix: str) -> None:
        for k, v in node.items_ex(resolve=False) if hasattr(node, "items_ex") else node.items():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if OmegaConf.is_dict(child) and not full.startswith(tuple(p.rstrip(".") for p in _FREE_FORM)):
                walk(child, full + ".")

    walk(OmegaConf.structured(Config), "")
    return keys


def check_keys(keys, where: str) -> None:
    """An AnnealError with the nearest valid key for the first key the schema does not have."""
    import difflib

    from anneal.errors import AnnealError

    valid = set(schema_keys())
    for key in keys:
        if key in valid or key in CONFIG_GROUPS or key.startswith(("hydra.", *_FREE_FORM)) \
                or (key + ".") in _FREE_FORM:
            continue
        section, _, leaf = key.rpartition(".")
        siblings = sorted(k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section)
        leaves = {k.rpartition(".")[2]: k for k in sorted(valid, key=len, reverse=True)}
        near = [leaves[leaf]] if leaf in leaves else []  # the key lives in another section: trainer.seed -> seed
        if not near and leaf in _ELSEWHERE:
            near = [_ELSEWHERE[leaf]]
        if not near:
            near = [f"{section}.{m}" if section else m for m in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.5)]
        if not near:
            near = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)]
        if not near and section:
            fixed = difflib.get_close_matches(section, sorted(k for k in valid if "." not in k), n=1, cutoff=0.6)
            near = [f"{fixed[0]}.{leaf}"] if fixed and f"{fixed[0]}.{leaf}" in valid else []
        if near:
            hint = f"; did you mean {near[0]}?"
        elif siblings:
            hint = f"; {section or 'the top level'} has: {', '.join(siblings)}"
        else:
            hint = ""
        raise AnnealError(f"{where}: unknown config key {key}{hint}")


def absolute_paths(cfg) -> None:
    """Relative file paths in `cfg` made absolute (from the current folder), in place, so the run
    folder's saved config means the same from anywhere (`anneal-compare` run from another folder).
    Names (a bundled mixture, a catalog checkpoint, "train") stay: only values spelt like a path
    (with a "/", a leading "." or "~", or a file suffix) that exist are changed."""
    from pathlib import Path

    def resolved(value):
        if not isinstance(value, str) or not ("/" in value or value.startswith((".", "~"))
                                              or value.endswith((".yaml", ".yml", ".json"))):
            return value
        path = Path(value).expanduser()
        return str(path.resolve()) if not path.is_absolute() and path.exists() else value

    cfg.data.mixture = resolved(cfg.data.mixture)
    cfg.data.tokenizer = resolved(cfg.data.tokenizer)
    cfg.checkpoint = resolved(cfg.checkpoint)
    cfg.catalog_files = [resolved(f) for f in cfg.catalog_files]
    if cfg.export.dir:
        cfg.export.dir = str(Path(cfg.export.dir).expanduser().resolve())
