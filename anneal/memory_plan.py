"""`anneal-plan memory`: GPU memory per rank of a recipe under a parallel layout, before any GPU time.

Why a model and not a dry run: the layouts worth asking about (32-128 GPUs, 142B parameters) are
exactly the ones nobody has at hand. The model is counted from the code, not fitted:

* parameters: dots1's non-expert parameters (embeddings, attention, the dense layer, shared
  experts, routers, norms) are replicated on every rank; routed experts are split over the EP
  group (``ep_size``), as `moe.ep` does;
* states per parameter (`anneal.model.precision`): bf16 compute weights (2 B), fp32 masters (4 B),
  fp32 gradient accumulators (4 B), AdamW m and v (8 B). Native engine (one GPU): all of them
  whole. DeepSpeed: masters and AdamW state partitioned by ZeRO over the data-parallel group of
  each parameter (all ranks for non-expert parameters, the expert-data-parallel group of
  ``world / ep_size`` ranks for experts, as DeepSpeed-MoE does); ZeRO-1 keeps whole fp32
  accumulators, ZeRO-2 partitions them; DeepSpeed also keeps the bf16 gradient of every local
  parameter (ZeRO-1; measured: +2 B/parameter on one H100, bench/results/bench_step.json) or two
  reduce buckets of them (ZeRO-2, `reduce_bucket_size` 5e8 elements by default);
* activations per micro-batch: the tensors autograd saves per token in each decoder layer
  (`activation_bytes_per_token`), with flash attention (no seq² term), × micro-batch × seq; under
  `model.recompute` (anneal.model.recompute) `full` keeps the layer inputs, `selective` the outputs
  of its policy's ops (`selective_bytes_per_token`), each plus one layer recomputed during the
  backward; the LM head's logits and their gradient on top; eager mode (`model.compile=false`) also
  saves the fp32 RMSNorm upcasts and the SiLU outputs;
* all-to-all buffers (EP > 1): the dispatch and combine send buffers of one MoE layer (bf16, the
  receive sides are the experts' saved inputs/outputs), at balanced routing.

With optimizer offload (`parallel.offload=optimizer`, DeepSpeed ZeRO-Offload) the GPU keeps the bf16
weights and DeepSpeed's fp32 sum of the micro-batches' gradients (ZeRO 2: of the rank's partition;
ZeRO 1: of every local parameter), copied to the host once per step; the host plan
(anneal.host_plan) adds what lives in host memory and the PCIe traffic and time of a step.

Validated against the measured peak GPU memory of bench/bench_step.py's dots1-width slice
(tests/test_memory_plan.py: every recorded row within 10%). Figures are GiB (2^30 bytes), the
unit of `torch.cuda.max_memory_allocated` and of the bench's `peak_mem_gb`.
"""
from __future__ import annotations

from dataclasses import dataclass

from anneal.errors import AnnealError
from anneal.model.config import Dots1Config
from anneal.parallel.ds_config import update_streams

GIB = 2 ** 30
BF16, FP32 = 2, 4
DS_REDUCE_BUCKET = 5e8          # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


# DeepSpeedCPUAdam's kernel steps fp32 parameters with fp32 state only ((param, state) dtypes:
# fp32/fp32, bf16/fp32, bf16/bf16, fp16/...); bf16 moments need bf16 masters (DeepSpeed's
# bf16_optimizer_states requires bf16_master_weights_and_grads), which the precision policy refuses
BF16_MOMENTS = ("parallel.offload_moments=bf16: DeepSpeed's CPU Adam keeps AdamW's moments in the masters' dtype, "
                "and the masters stay fp32 (anneal.model.precision); use parallel.offload_moments=fp32, with hosts "
                "large enough or more nodes (anneal-plan memory)")


@dataclass(frozen=True)
class Layout:
    """Where and how a run trains: what the memory of one GPU depends on."""
    gpus: int = 1
    ep_size: int = 1
    zero_stage: int = 1
    engine: str = "deepspeed"          # native (one process) | deepspeed
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    reserve_gb: float = 6.0            # CUDA context, NCCL buffers, allocator fragmentation
    micro_batch: int = 1
    seq: int = 4096
    recompute: str = "none"            # none | selective | full (model.recompute)
    compile: bool = True
    grad_accum: str = "fp32"
    offload: str = "none"              # none | optimizer (parallel.offload)
    offload_moments: str = "fp32"      # AdamW m and v on the host (parallel.offload_moments; bf16 refused)
    offload_chunk_mb: int = 256        # ZeRO 2 offload's streamed update (parallel.offload_chunk_mb; 0: DeepSpeed's step)
    host_mem_gb: float | None = None   # host memory of one node (GiB); None: not checked
    batch_tokens: int = 0              # tokens per optimizer step (the recipe's largest), for the step plan

    def check(self, cfg: Dots1Config) -> None:
        if self.gpus < 1 or self.gpus % self.ep_size:
            raise AnnealError(f"parallel.ep_size={self.ep_size} must divide the number of GPUs (--gpus {self.gpus})")
        if cfg.n_routed_experts % self.ep_size:
            raise AnnealError(f"parallel.ep_size={self.ep_size} must divide the expert count ({cfg.n_routed_experts})")
        if self.engine == "native" and self.gpus != 1:
            raise AnnealError(f"trainer.engine=native runs on one GPU, not --gpus {self.gpus}: "
                              f"use trainer.engine=deepspeed")
        if self.zero_stage not in (1, 2):
            raise AnnealError(f"parallel.zero_stage={self.zero_stage}: the DeepSpeed engine runs ZeRO 1 or 2")
        if self.recompute not in ("none", "selective", "full"):
            raise AnnealError(f"model.recompute={self.recompute!r}: must be one of none, selective, full")
        if self.offload == "optimizer" and self.engine != "deepspeed":
            raise AnnealError("parallel.offload=optimizer runs under DeepSpeed: use trainer.engine=deepspeed")
        if self.offload_moments != "fp32":
            raise AnnealError(BF16_MOMENTS)

    @property
    def dp_size(self) -> int:
        """Ranks holding each expert (the expert-data-parallel group)."""
        return self.gpus // self.ep_size


def param_split(cfg: Dots1Config) -> tuple[int, int]:
    """(non-expert, routed-expert) parameter counts of the whole model."""
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    experts = n_moe * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return cfg.num_parameters() - experts, experts


def activation_bytes_per_token(cfg: Dots1Config, moe: bool, compiled: bool = True) -> float:
    """Bytes autograd keeps per token for one decoder layer's backward (bf16 compute)."""
    h, a = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    attn = BF16 * (2 * h                 # input_layernorm in/out
                   + (a + kv)            # q, k before QK-norm
                   + (a + 2 * kv)        # q, k, v into attention (after norm + RoPE)
                   + a)                  # attention output (o_proj input)
    attn += FP32 * cfg.num_attention_heads   # attention log-sum-exp
    post = BF16 * 2 * h                   # post_attention_layernorm in/out
    eager = 0 if compiled else FP32 * (2 * h + a + kv)   # fp32 RMSNorm upcasts
    if moe:
        k, inter, shared = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.shared_intermediate_size
        mlp = BF16 * (k * h             # tokens gathered per expert slot (experts' input)
                      + k * 2 * inter   # gate/up output
                      + k * inter       # SiLU(gate) * up (down_proj input)
                      + k * h           # expert outputs (the combine's weight gradient)
                      + 3 * shared)     # shared experts: gate/up out, product
        mlp += FP32 * 2 * cfg.n_routed_experts     # router logits and scores
        eager += 0 if compiled else BF16 * (k * inter + shared)   # SiLU outputs
    else:
        mlp = BF16 * 3 * cfg.intermediate_size
        eager += 0 if compiled else BF16 * cfg.intermediate_size
    return attn + post + mlp + eager


def selective_bytes_per_token(cfg: Dots1Config, moe: bool) -> float:
    """Bytes `model.recompute=selective` keeps per token for one decoder layer: its input and the
    outputs of the policy's kept ops (anneal.model.recompute; the grouped_mm backend)."""
    h, a = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    kept = BF16 * (h                     # the layer's input (the checkpoint's)
                   + (a + 2 * kv)        # q, k, v projections
                   + a                   # attention output
                   + h)                  # o_proj output
    kept += FP32 * cfg.num_attention_heads   # attention log-sum-exp
    if moe:
        k, inter, shared = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.shared_intermediate_size
        kept += BF16 * (2 * shared + h   # shared experts: gate and up, down
                        + k * 2 * inter)  # routed experts' gate/up grouped GEMM (down: recomputed)
        kept += FP32 * cfg.n_routed_experts   # router logits
    else:
        kept += BF16 * (2 * cfg.intermediate_size + h)
    return kept


def head_bytes_per_token(cfg: Dots1Config, compiled: bool = True) -> float:
    """LM head + loss: bf16 logits kept for backward and their fp32 gradient (eager: also the fp32
    upcast and the log-softmax output)."""
    v = cfg.vocab_size
    return BF16 * 2 * cfg.hidden_size + BF16 * v + FP32 * v + (0 if compiled else 2 * FP32 * v)


@dataclass(frozen=True)
class MemoryPlan:
    rows: dict[str, float]           # component -> GiB per GPU
    activations_by_mode: dict[str, float]   # the activation row under each model.recompute mode
    total: float
    usable: float
    layout: Layout
    params_local: int
    params_partition: float          # parameters whose optimizer state this GPU's rank owns (its ZeRO share)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def plan_memory(cfg: Dots1Config, lay: Layout) -> MemoryPlan:
    """Per-GPU memory of training `cfg` under `lay` (see the module docstring for the model)."""
    lay.check(cfg)
    p_ne, p_e = param_split(cfg)
    p_el = p_e // lay.ep_size                       # this rank's routed-expert parameters
    local = p_ne + p_el
    if lay.engine == "native":
        part = local                                 # nothing partitioned
        bf16_grads = local if lay.grad_accum == "bf16" else 0
    else:
        part = p_ne / lay.gpus + p_el / lay.dp_size  # ZeRO partition: non-experts over all, experts over EDP
        bf16_grads = local if lay.zero_stage == 1 else min(local, 2 * DS_REDUCE_BUCKET)
    accum = local if (lay.engine == "native" or lay.zero_stage == 1) else part
    acts = activation_bytes(cfg, lay)
    a2a = 2 * lay.micro_batch * lay.seq * cfg.num_experts_per_tok * cfg.hidden_size * BF16 if lay.ep_size > 1 else 0.0
    if lay.offload == "optimizer":
        # masters and AdamW on the host (anneal.host_plan). DeepSpeed 0.19.8's ZeRO-Offload with bf16
        # weights and fp32 accumulation sums every micro-batch's reduced gradients in fp32 on the GPU
        # and copies the sum to the host once per step: ZeRO 2 an fp32 buffer of the rank's partition
        # (`averaged_gradients`), ZeRO 1 an fp32 `grad_accum` of every local parameter. Buckets in
        # the weights' dtype (ZeRO 2) or fp32 (ZeRO 1); a staging copy of the largest parameter.
        grad_rows = {"fp32 grad partition sum": FP32 * part} if lay.zero_stage == 2 else \
            {"fp32 grad accumulators": FP32 * local}
        bucket = BF16 if lay.zero_stage == 2 else FP32
        rows = {"bf16 weights": BF16 * local, **grad_rows,
                f"reduce buckets ({'bf16' if bucket == BF16 else 'fp32'})": bucket * min(local, 2 * DS_REDUCE_BUCKET)}
        if not streams(lay):  # the streamed update frees DeepSpeed's staging buffers
            rows["offload staging (largest param)"] = BF16 * largest_param(cfg, lay)
    else:
        rows = {"bf16 weights": BF16 * local, "fp32 masters": FP32 * part, "fp32 grad accumulators": FP32 * accum,
                "bf16 gradients": BF16 * bf16_grads, "AdamW m + v (fp32)": 2 * FP32 * part}
    rows |= {"activations / micro-batch": acts[lay.recompute], "all-to-all buffers": a2a}
    rows = {k: v / GIB for k, v in rows.items()}
    return MemoryPlan(rows, {k: v / GIB for k, v in acts.items()}, sum(rows.values()),
                      lay.gpu_mem_gb - lay.reserve_gb, lay, local, part)


def streams(lay) -> bool:
    """`ds_config.update_streams` for a layout. The plan assumes a GPU run's bf16 weights; a CPU run
    computes in fp32 and keeps DeepSpeed's step (6 B per parameter more than planned)."""
    return update_streams(lay.offload, lay.zero_stage, lay.grad_accum == "fp32", lay.offload_chunk_mb)


def largest_param(cfg: Dots1Config, lay: Layout) -> int:
    """Elements of the largest local parameter (ZeRO-Offload stages one on each side of PCIe): the
    embedding or LM head, or an MoE layer's stacked gate/up experts."""
    experts = cfg.n_routed_experts // lay.ep_size * cfg.hidden_size * 2 * cfg.moe_intermediate_size
    return max(cfg.vocab_size * cfg.hidden_size, experts)


def activation_bytes(cfg: Dots1Config, lay: Layout) -> dict[str, float]:
    """Peak activation bytes of one micro-batch under each recompute mode: what the layers keep,
    plus (full, selective) one layer's recomputed rest during its backward, plus the head."""
    tokens = lay.micro_batch * lay.seq
    kinds = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
    keep_all = [activation_bytes_per_token(cfg, moe, lay.compile) for moe in kinds]
    keep_sel = [selective_bytes_per_token(cfg, moe) for moe in kinds]
    head = head_bytes_per_token(cfg, lay.compile)
    return {"none": tokens * (sum(keep_all) + head),
            "selective": tokens * (sum(keep_sel) + max(a - s for a, s in zip(keep_all, keep_sel)) + head),
            "full": tokens * (len(kinds) * BF16 * cfg.hidden_size + max(keep_all) + head)}


def format_memory_plan(cfg: Dots1Config, plan: MemoryPlan, source: str) -> str:
    lay = plan.layout
    nodes = -(-lay.gpus // lay.gpus_per_node)
    ep_span = "inside one node" if lay.ep_size <= lay.gpus_per_node else f"across {-(-lay.ep_size // lay.gpus_per_node)} nodes"
    p_ne, p_e = param_split(cfg)
    lines = [
        f"model: {source}: {(p_ne + p_e) / 1e9:.1f}B parameters ({p_e / 1e9:.1f}B in routed experts), "
        f"{cfg.num_hidden_layers} layers",
        f"layout: {lay.gpus} GPUs ({nodes} node(s) x {lay.gpus_per_node}), engine {lay.engine}, EP {lay.ep_size} "
        f"({ep_span}), expert-data-parallel {lay.dp_size}, ZeRO-{lay.zero_stage}; micro-batch {lay.micro_batch} x "
        f"seq {lay.seq}, recompute {lay.recompute}, compile {'on' if lay.compile else 'off'}, offload {lay.offload}",
        f"parameters on each GPU: {plan.params_local / 1e9:.2f}B",
        "",
        f"{'per GPU':<28}{'GiB':>9}",
    ]
    for k, v in plan.rows.items():
        lines.append(f"{k:<28}{v:>9.2f}")
    for mode, gib in plan.activations_by_mode.items():
        if mode != lay.recompute:
            lines.append(f"{'(activations, ' + mode + ')':<28}{gib:>9.2f}")
    lines += [f"{'total':<28}{plan.total:>9.2f}",
              f"{'usable':<28}{plan.usable:>9.2f}  ({lay.gpu_mem_gb:g} GiB - {lay.reserve_gb:g} GiB reserve)",
              f"GPU fits: {'yes' if plan.fits else 'NO'}"]
    return "\n".join(lines)


def model_config_for_plan(cfg) -> tuple[Dots1Config, str]:
    """The model a recipe trains, without downloading it: `model.arch` for random init, the
    checkpoint's config.json when it is on disk, else dots1's published config (every catalog
    checkpoint is a dots1 release of that shape, /work/shared/dots1.md)."""
    if cfg.checkpoint is None:
        if cfg.model.arch is None:
            raise AnnealError("checkpoint is null and model.arch is unset: no model to plan for")
        from omegaconf import OmegaConf

        return Dots1Config.from_hf_dict(OmegaConf.to_container(cfg.model.arch, resolve=True), "model.arch"), "model.arch"
    from anneal.checkpoints.catalog import Catalog

    try:
        path = Catalog.load(list(cfg.catalog_files)).resolve(cfg.checkpoint, offline=True).path
    except AnnealError:
        return Dots1Config(), f"dots1 config.json (checkpoint {cfg.checkpoint} not on disk)"
    return Dots1Config.from_json(path / "config.json"), f"{path}/config.json"


def layout_from_config(cfg, gpus: int, gpus_per_node: int, gpu_mem_gb: float, reserve_gb: float,
                       host_mem_gb: float | None = None) -> Layout:
    """The recipe's parallel/trainer/model settings as a `Layout` (compile: null = on, as on CUDA)."""
    from omegaconf import OmegaConf

    from anneal.train.batch_ramp import BatchRamp

    bt = cfg.schedule.batch_tokens
    ramp = BatchRamp.from_config(OmegaConf.to_container(bt, resolve=True) if OmegaConf.is_config(bt) else bt)
    return Layout(gpus=gpus, ep_size=cfg.parallel.ep_size, zero_stage=cfg.parallel.zero_stage,
                  engine=cfg.trainer.engine, gpus_per_node=gpus_per_node, gpu_mem_gb=gpu_mem_gb,
                  reserve_gb=reserve_gb, micro_batch=cfg.trainer.micro_batch_size, seq=cfg.data.seq_len,
                  recompute=cfg.model.recompute, compile=cfg.model.compile is not False,
                  grad_accum=cfg.trainer.grad_accum_dtype, offload=cfg.parallel.offload,
                  offload_moments=cfg.parallel.offload_moments, offload_chunk_mb=cfg.parallel.offload_chunk_mb,
                  host_mem_gb=host_mem_gb,
                  batch_tokens=max(b for _, b in ramp.points))
