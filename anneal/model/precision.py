"""The mixed-precision policy: one for the native and the DeepSpeed engine.

- Compute weights: the module's parameters are bf16 (on CUDA with `trainer.bf16`), so every
  matmul — attention, dense MLPs, shared and routed experts, the LM head — runs on bf16 operands.
  Nothing relies on `torch.autocast` (custom ops such as `torch._grouped_mm` or our Triton kernels
  are no autocast ops: under autocast with fp32 parameters they silently ran as fp32 GEMMs).
- Master weights and optimizer state: fp32, in the optimizer (AdamW over fp32 copies here;
  DeepSpeed's bf16 optimizer wrappers there). Checkpoints store the fp32 masters.
- Gradients: each micro-batch's bf16 weight gradient is added into an fp32 accumulator as soon as
  autograd has produced it (a post-accumulate-grad hook, then the bf16 gradient is freed), so the
  sum over a step's micro-batches is fp32 however many there are — what Megatron's `main_grad`
  and DeepSpeed's `grad_accum_dtype: fp32` do (the DeepSpeed engine is configured that way).
  bf16 accumulation would lose the small late terms of a 100+ micro-batch step. The add costs
  memory traffic (~10 bytes per parameter per micro-batch: 3% more step time than autograd's own
  bf16 sums on the dots1-width slice, bench/RESULTS.md); `trainer.grad_accum_dtype=bf16` trades
  that precision for speed
  (autograd accumulates bf16 gradients; they are converted to fp32 once, before the update).
  With `trainer.grad_accum_fusion` (default on) the dense linear layers' weight-gradient GEMMs, and
  the routed experts' with the `triton` backend, add into the fp32 accumulators themselves and skip
  the hook (anneal.model.grad_fusion); `grouped_mm` experts still go through it. DeepSpeed ZeRO 1
  fuses the same layers into its bf16 optimizer's fp32 gradient buffers (anneal.parallel.ds_engine).
- fp32 islands: router logits, scores and weights, the routers' correction bias and load counters
  (buffers kept fp32 through every cast by `moe.router.Router._apply`), RMSNorm statistics, and the loss.
- CPU runs everything in fp32 (bf16 matmuls on CPU are slow and not what the GPU run computes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from anneal.errors import AnnealError
from anneal.model.grad_fusion import fuse_weight_gradients


@dataclass(frozen=True)
class PrecisionPolicy:
    compute_dtype: torch.dtype = torch.float32
    grad_accum_dtype: torch.dtype = torch.float32
    grad_accum_fusion: bool = False        # weight-gradient GEMMs add into the fp32 accumulators

    @property
    def fuses_grad_accumulation(self) -> bool:
        return self.grad_accum_fusion and self.mixed and self.grad_accum_dtype == torch.float32

    @property
    def mixed(self) -> bool:
        return self.compute_dtype != torch.float32

    @classmethod
    def for_device(cls, bf16: bool, device: torch.device, note=print, grad_accum: str = "fp32",
                   fusion: bool = False) -> "PrecisionPolicy":
        """bf16 compute on CUDA when asked; fp32 on CPU (with a one-line note if bf16 was asked)."""
        if grad_accum not in ("fp32", "bf16"):
            raise AnnealError(f"trainer.grad_accum_dtype={grad_accum!r}: use fp32 (default) or bf16")
        if not bf16:
            return cls(torch.float32)
        if device.type != "cuda":
            note("note: trainer.bf16=true applies on CUDA; this CPU run computes in fp32")
            return cls(torch.float32)
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            raise AnnealError(f"trainer.bf16=true but {torch.cuda.get_device_name(device)} has no bf16 support; "
                              "run with trainer.bf16=false (fp32) or on an Ampere-or-newer GPU")
        return cls(torch.bfloat16, torch.float32 if grad_accum == "fp32" else torch.bfloat16, fusion)


class MasterWeights:
    """fp32 master copies and fp32 gradient accumulators of a model's parameters; casts the model
    to the compute dtype. Build it while the model still holds its fp32 (loaded) values."""

    def __init__(self, model: torch.nn.Module, policy: PrecisionPolicy):
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone() for p in model.parameters() if p.requires_grad]
        model.to_dtype(policy.compute_dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]
        for master in self.masters:
            master.grad = torch.zeros_like(master)
        self.fp32_accumulation = policy.grad_accum_dtype == torch.float32
        if self.fp32_accumulation:
            for param, master in zip(self.params, self.masters):
                param.register_post_accumulate_grad_hook(self._accumulate_into(master))
        self.fused = (fuse_weight_gradients(model, {p: m.grad for p, m in zip(self.params, self.masters)})
                      if policy.fuses_grad_accumulation else [])

    @staticmethod
    def _accumulate_into(master: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:        # None: a fused weight gradient went straight into master.grad
                master.grad.add_(param.grad)
                param.grad = None
        return hook

    @torch.no_grad()
    def before_step(self) -> None:
        """With bf16 accumulation: the step's bf16 gradients become the masters' fp32 gradients."""
        if self.fp32_accumulation:
            return
        for param, master in zip(self.params, self.masters):
            if param.grad is not None:
                master.grad.copy_(param.grad)
                param.grad = None

    @torch.no_grad()
    def after_step(self) -> None:
        """Copy the updated masters into the compute weights and clear the accumulators."""
        torch._foreach_copy_(self.params, self.masters)
        torch._foreach_zero_([m.grad for m in self.masters])

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the fp32 masters in place of the compute weights."""
        sd = model.state_dict()
        sd.update(zip(self.names, self.masters))
        return sd

    @torch.no_grad()
    def restore_fp32(self, model: torch.nn.Module) -> None:
        """Put the fp32 masters back into the model (end of training: export at full precision)."""
        model.to_dtype(torch.float32)
        torch._foreach_copy_([p for p in model.parameters() if p.requires_grad], self.masters)
