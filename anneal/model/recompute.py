"""Activation recompute (`model.recompute`): what a decoder layer keeps for its backward.

* `none`: everything autograd saves.
* `full`: only each layer's input; the whole layer runs again in the backward
  (`Dots1ForCausalLM.checkpointed`, around the compiled layer).
* `selective`: an op-level policy (torch's selective activation checkpointing, as torchtitan's
  op SAC and Megatron's `--recompute-modules` do it): the outputs of the expensive ops are kept,
  everything else (RMSNorm and its fp32 upcasts, RoPE, SiLU * up, the router's upcast, sigmoid and
  top-k, the token permutation) runs again in the backward. Kept: dense matmuls (q/k/v/o, the
  dense and shared MLPs, the router logits), attention, and the routed experts' gate/up grouped
  GEMM (`aten._grouped_mm` reading hidden states, or the fused `moe::triton_experts_fwd`).
  Recomputed although a matmul: the routed experts' down projection (an `mm`/`_grouped_mm` whose
  inner dimension is `moe_intermediate_size`). Its output, top_k x hidden per token, is the layer's
  largest tensor and the cheapest matmul to redo per byte (2 x moe_intermediate_size FLOPs per
  element against 2 x hidden for the others): on dots1 a third of what the kept set would be,
  for ~5% more step FLOPs.

The checkpoint sits inside each decoder layer's methods (`DecoderLayer._selective`), so under
regional compilation (`compile_layers`) it is traced into the layer's graph, where AOTAutograd's
partitioner applies the same policy; eager, the policy runs as a dispatch mode.
"""
from __future__ import annotations

import functools

from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from anneal.errors import AnnealError

RECOMPUTE_MODES = ("none", "selective", "full")

# ops whose outputs `selective` keeps (by qualified name: the Triton op exists only where triton imports)
_KEPT = {
    "aten::mm", "aten::addmm", "aten::bmm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_grouped_mm", "moe::triton_experts_fwd", "anneal::fused_wgrad_linear",
}
_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "anneal::fused_wgrad_linear"}


def check_mode(mode: str, where: str = "model.recompute") -> str:
    if mode not in RECOMPUTE_MODES:
        raise AnnealError(f"{where}={mode!r}: must be one of {', '.join(RECOMPUTE_MODES)}")
    return mode


def _op_name(op) -> str:
    schema = getattr(op, "_schema", None)
    return schema.name if schema is not None else getattr(op, "__name__", str(op))


def keeps_output(op, args, expert_inner: int) -> bool:
    """Whether `selective` keeps the output of `op(*args)` (see the module docstring)."""
    name = _op_name(op)
    if name == "flex_attention":                          # the higher-order op, traced under compile
        return True
    if name not in _KEPT:
        return False
    if name in _MATMULS:
        a = args[1] if name == "aten::addmm" else args[0]  # addmm(bias, input, weight)
        return a.shape[-1] != expert_inner                 # the routed experts' down projection: redo
    return True


@functools.lru_cache(maxsize=None)
def selective_context_fn(expert_inner: int):
    """The `context_fn` of `torch.utils.checkpoint.checkpoint` for `selective` (cached: one object
    per model shape, so compiled graphs do not recompile on a new policy closure)."""
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if keeps_output(op, args, expert_inner) else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)
