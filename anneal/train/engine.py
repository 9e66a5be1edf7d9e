"""The native engine: AdamW + clipping in one process, behind the engine seam
(`anneal.parallel.engine_protocol`: what the loop asks of an engine, which the DeepSpeed engine,
`anneal.parallel.ds_engine.DeepSpeedEngine`, also answers).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from anneal.checkpoints import training_state
from anneal.model.grad_fusion import describe_fused
from anneal.model.precision import MasterWeights, PrecisionPolicy
from anneal.parallel.engine_protocol import PostStepHooks
from anneal.parallel.layout import ParallelLayout


class Engine(PostStepHooks):
    """AdamW + clipping for one process, under the mixed-precision policy (anneal.model.precision):
    with a bf16 policy the optimizer steps fp32 masters fed by fp32 gradient accumulators and the
    model holds bf16 compute weights. The interface of `anneal.parallel.engine_protocol`;
    `model_state_dict()` (the weights, fp32 masters under bf16) is this engine's alone."""

    def __init__(self, model: torch.nn.Module, tcfg, policy: PrecisionPolicy = PrecisionPolicy(),
                 fused: bool | None = None):
        """`fused`: torch's fused AdamW (default: on CUDA), which also takes the clipping."""
        self.model, self.grad_clip = model, tcfg.grad_clip
        self.post_step_hooks = []
        self.masters = MasterWeights(model, policy) if policy.mixed else None
        named = (list(zip(self.masters.names, self.masters.masters)) if self.masters
                 else [(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.params = [p for _, p in named]
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        fused = self.params[0].is_cuda if fused is None else fused
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=0.0, betas=tuple(tcfg.betas), eps=tcfg.eps, fused=fused or None)

    # -- building it from the config --------------------------------------------------------------
    @classmethod
    def launch(cls, cfg, device: torch.device) -> tuple[torch.device, ParallelLayout]:
        """One process: nothing to join."""
        return device, ParallelLayout()

    @classmethod
    def from_config(cls, model: torch.nn.Module, cfg, policy: PrecisionPolicy, layout: ParallelLayout) -> Engine:
        return cls(model, cfg.trainer, policy)

    # -- the step ---------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line for the run's log: which optimizer steps which state where."""
        fused = describe_fused(self.masters.fused) if self.masters else ""
        return f"optimizer: torch AdamW on {self.params[0].device.type}, one process{fused}"

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def backward_piece(self, tensors: list[torch.Tensor], grads: list, last: bool) -> None:
        """Backward from `tensors` (tensors, or the gradient edges of outputs whose memory the
        schedule already let go) with gradients `grads` (None: a scalar's implicit 1); `last`: the
        piece that completes its micro-batch's backward."""
        torch.autograd.backward(tensors, grads)

    def step(self, lr: float) -> float:
        """Clip, then update, unless the gradient norm is not finite (then the step's gradients are
        dropped and `step_applied` is False). Reading the norm is the step's one host sync."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.masters:
            self.masters.before_step()
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        if self.optimizer.defaults.get("fused"):
            grad_norm = self._clip_in_update(clip)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        self.step_applied = math.isfinite(grad_norm)
        if self.step_applied:
            self.optimizer.step()
        self._clear_gradients()
        self._run_post_step_hooks(self.step_applied)
        return grad_norm

    def _clip_in_update(self, clip: float) -> float:
        """Clipping folded into fused AdamW: the kernel divides each gradient by `grad_scale` as it
        reads it (the hook torch's GradScaler uses to unscale), so the separate pass that
        `clip_grad_norm_` makes to scale every gradient in place (all of them, also when the norm is
        under the limit) is gone. Same coefficient as `clip_grad_norm_`: min(1, clip / (norm + 1e-6))."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        coef = (clip / (norm + 1e-6)).clamp(max=1.0)
        self.optimizer.grad_scale = coef.reciprocal()
        return float(norm)

    def skip_step(self) -> None:
        """Drop the step's gradients without an update."""
        if self.masters:
            self.masters.before_step()
        self.step_applied = False
        self._clear_gradients()
        self._run_post_step_hooks(False)

    def _clear_gradients(self) -> None:
        if self.masters:
            self.masters.after_step()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def reduce_expert_load(self, routers: dict) -> None:
        """One process: the local expert load is the global one."""

    # -- state --------------------------------------------------------------------------------------
    def model_state_dict(self) -> dict:
        """Weights to checkpoint: the fp32 masters under a bf16 policy."""
        return self.masters.state_dict(self.model) if self.masters else self.model.state_dict()

    def full_precision_model(self) -> torch.nn.Module:
        """The model with its fp32 weights (the masters put back): for the final export."""
        if self.masters:
            self.masters.restore_fp32(self.model)
        return self.model

    def checkpoint_pieces(self) -> list[training_state.Piece]:
        """The whole of every tensor (one process): fp32 masters with AdamW's moments, and the
        model's buffers (router biases). Moments are zeros before the first step."""
        pieces = []
        names = self.masters.names if self.masters else [n for n, p in self.model.named_parameters() if p.requires_grad]
        for name, p in zip(names, self.params):
            st = self.optimizer.state.get(p) or {}
            m1, m2 = st.get("exp_avg"), st.get("exp_avg_sq")
            if m1 is None:
                m1, m2 = torch.zeros_like(p), torch.zeros_like(p)
            pieces.append(training_state.Piece(name, tuple(p.shape), 0, p.detach().view(-1), m1.view(-1), m2.view(-1)))
        params = set(names)
        pieces += [training_state.Piece(n, tuple(b.shape), 0, b.detach().reshape(-1))
                   for n, b in self.model.state_dict().items() if n not in params]
        return pieces

    def optimizer_step(self) -> int:
        """AdamW's step count (every parameter steps together)."""
        for st in self.optimizer.state.values():
            return int(st["step"])
        return 0

    def checkpoint_layout(self) -> dict:
        return {"world_size": 1, "ep_size": 1, "engine": "native"}

    def restore_state(self, step_dir: Path, optimizer_step: int) -> None:
        """The masters and AdamW's moments of checkpoint `step_dir`, whatever layout wrote it (the
        weights are already loaded), and AdamW's step count."""
        for group in self.optimizer.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                st = self.optimizer.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["step"] = torch.tensor(float(optimizer_step), dtype=torch.float32,
                                          device=p.device if on_device else "cpu")
        training_state.load_pieces(step_dir, self.checkpoint_pieces())
        if self.masters:
            self.masters.after_step()  # the compute weights from the restored masters

    def export_model(self) -> torch.nn.Module:
        return self.full_precision_model()

