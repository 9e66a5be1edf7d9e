"""The DeepSpeed config of a run, from the trainer's config (one source of truth) and the user's
extra keys (`trainer.deepspeed`), which may add anything else but repeat a key the trainer decides
only with the same value. The keys below are DeepSpeed's documented JSON config. No DeepSpeed
import here: the planner (anneal.memory_plan) asks `update_streams` too."""
from __future__ import annotations

import copy

from anneal.errors import AnnealError


def offload_optimizer_config(pin_memory: bool) -> dict:
    """The `zero_optimization` keys of ZeRO-Offload: ZeRO's fp32 partition and AdamW's state in
    host memory (pinned where DeepSpeed's own step copies them over PCIe), stepped by CPU Adam."""
    return {"offload_optimizer": {"device": "cpu", "pin_memory": bool(pin_memory)}}


def update_streams(offload: str, zero_stage: int, bf16_with_fp32_sums: bool, offload_chunk_mb: int) -> bool:
    """Does the offloaded update stream (`deepspeed_compat.stream_offload_step`: ZeRO 2, bf16 weights
    with fp32 sums, parallel.offload_chunk_mb > 0)? One answer for the engine and the planner."""
    return offload == "optimizer" and zero_stage == 2 and bf16_with_fp32_sums and offload_chunk_mb > 0


# Keys the trainer's (Hydra) config decides. A user's extra DeepSpeed keys may add anything else,
# and may repeat one of these only with the same value.
OPTIMIZER_OWNED = ("optimizer", "scheduler")
# Sections that would change how gradients are computed or summed behind the precision policy
PRECISION_OWNED = ("fp16", "amp", "torch_autocast")
# zero_optimization keys parallel.offload decides (offload needs our CPU Adam client optimizer)
OFFLOAD_OWNED = ("offload_optimizer", "offload_param")


def deepspeed_config(tcfg, *, zero_stage: int, bf16: bool, extra: dict | None = None,
                     grad_accum_dtype: str = "fp32", offload: str = "none", pin_memory: bool = False) -> dict:
    """The DeepSpeed config from the trainer config (one source of truth) + the user's extra keys.

    `tcfg` is `Config.trainer` (micro_batch_size, grad_clip); AdamW's hyper-parameters and the LR
    stay with the trainer (a client optimizer), so `optimizer`/`scheduler` sections are refused.
    `offload="optimizer"` (parallel.offload) puts ZeRO's fp32 partition and AdamW's state in host
    memory (ZeRO-Offload; pinned on CUDA unless the update streams), stepped by DeepSpeedCPUAdam."""
    if zero_stage not in (1, 2):
        raise AnnealError(f"parallel.zero_stage={zero_stage}: the DeepSpeed engine supports ZeRO stage 1 and 2 "
                          "(stage 3 partitions the expert weights that expert parallelism already shards)")
    if offload not in ("none", "optimizer"):
        raise AnnealError(f"parallel.offload={offload!r}: must be none or optimizer")
    base = {
        "train_micro_batch_size_per_gpu": int(tcfg.micro_batch_size),
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # the trainer's step() is the accumulation boundary
        "gradient_clipping": float(tcfg.grad_clip),
        "zero_optimization": {"stage": int(zero_stage), "contiguous_gradients": True, "reduce_scatter": True,
                              **(offload_optimizer_config(pin_memory) if offload == "optimizer" else {})},
        # check_grad_overflow: a non-finite gradient drops the step's update (DeepSpeed's overflow
        # path, the one fp16 uses) instead of writing NaN into the masters (anneal.train.guards).
        # immediate_grad_update: ZeRO 1's bf16 optimizer folds each parameter's bf16 gradient into
        # its fp32 one from a post-accumulate-grad hook, then frees it. Without it the fold runs after
        # every engine.backward and the bf16 gradient is only zeroed by a prologue that
        # DeepSpeedEngine.forward's output hooks run -- our step calls the model, not the engine, so
        # micro-batch k of n was counted n-k+1 times (docs/deepspeed.md, "Hooks"). With
        # parallel.offload=optimizer DeepSpeed uses its ZeRO optimizer at stage 1 too (not the bf16
        # one) and these two keys have no effect: the fp32 sum is ZeRO's GPU-side partition buffer.
        "bf16": {"enabled": bool(bf16), **({"check_grad_overflow": True, "immediate_grad_update": True} if bf16 else {})},
        # the mixed-precision policy (anneal.model.precision): bf16 compute weights, fp32 masters and
        # optimizer state, gradients accumulated over the micro-batches in fp32
        **({"data_types": {"grad_accum_dtype": grad_accum_dtype}} if bf16 else {}),
        # and reduced over the data-parallel ranks in that dtype: DeepSpeed's bf16 default casts the
        # fp32 sums to bf16 for the all-reduce / reduce-scatter, which rounds every step's gradient
        # to 8 significant bits and undoes the fp32 accumulation (Megatron reduces in fp32 too)
        **({"communication_data_type": grad_accum_dtype} if bf16 else {}),
        "zero_allow_untested_optimizer": True,   # our client torch AdamW
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    extra = dict(extra or {})
    for key in OPTIMIZER_OWNED:
        if key in extra:
            raise AnnealError(f"trainer.deepspeed.{key}: the optimizer and LR schedule come from the anneal config "
                              "(trainer.betas/eps/weight_decay, schedule.*); remove this DeepSpeed key")
    for key in ("train_batch_size",):
        if key in extra:
            raise AnnealError(f"trainer.deepspeed.{key}: the batch size comes from schedule.batch_tokens and "
                              "trainer.micro_batch_size; remove this DeepSpeed key")
    for key in PRECISION_OWNED:
        if key in extra:
            raise AnnealError(f"trainer.deepspeed.{key}: the mixed-precision policy comes from trainer.bf16 and "
                              "trainer.grad_accum_dtype (anneal.model.precision); remove this DeepSpeed key")
    for key in OFFLOAD_OWNED:
        if key in (extra.get("zero_optimization") or {}):
            raise AnnealError(f"trainer.deepspeed.zero_optimization.{key}: optimizer offload is parallel.offload "
                              "(none | optimizer; the engine then builds DeepSpeed's CPU Adam); parameter offload "
                              "is ZeRO 3 only; remove this DeepSpeed key")
    return _merge(base, extra, "trainer.deepspeed")


_SOURCE = {
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_clipping": "trainer.grad_clip",
    "zero_optimization.stage": "parallel.zero_stage",
    "bf16.enabled": "trainer.bf16 (and the device)",
    "data_types.grad_accum_dtype": "the mixed-precision policy (anneal.model.precision: fp32 accumulation)",
    "gradient_accumulation_steps": "the schedule's batch ramp (set per step by the trainer)",
    "managed_gradient_accumulation": "the trainer (it drives accumulation boundaries)",
    "communication_data_type": "the mixed-precision policy (gradients reduced in the accumulation dtype)",
    "bf16.immediate_grad_update": "the trainer's step, which calls the model and not DeepSpeedEngine.forward "
                                  "(docs/deepspeed.md, \"Hooks\")",
    "bf16.check_grad_overflow": "the non-finite guard (trainer.on_nonfinite)",
    "zero_optimization.offload_optimizer.device": "parallel.offload",
    "zero_optimization.offload_optimizer.pin_memory": "the device and the update (pinned on CUDA, unless the update streams)",
}


def _merge(base: dict, extra: dict, where: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        key = f"{prefix}{k}"
        if k in out and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = _merge(out[k], v, where, key + ".")
        elif k in out and out[k] != v and not (isinstance(out[k], dict) or isinstance(v, dict)) and \
                not (isinstance(out[k], (int, float)) and isinstance(v, (int, float)) and float(out[k]) == float(v)):
            src = _SOURCE.get(key, "the anneal config")
            raise AnnealError(f"{where}.{key}={v!r} contradicts {src} (which gives {out[k]!r}); "
                              f"set it there instead, or drop the DeepSpeed key")
        elif k in out and isinstance(out[k], dict) != isinstance(v, dict):
            raise AnnealError(f"{where}.{key}: expected {'a section' if isinstance(out[k], dict) else 'a value'}")
        else:
            out[k] = copy.deepcopy(v)
    return out
