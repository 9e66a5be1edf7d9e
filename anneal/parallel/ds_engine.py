"""The DeepSpeed engine behind the trainer's engine seam (`anneal.parallel.engine_protocol`): ZeRO
stage 1/2, bf16 on GPU, gradient clipping, expert parameters in MoE param groups reduced over the
expert-data-parallel group.

What we take from DeepSpeed (and what we do not):
- `deepspeed.initialize`: the engine, the ZeRO stage 1/2 optimizer wrapper (partitioned fp32
  master weights and optimizer state, reduce-scatter of gradients), bf16 mixed precision,
  gradient clipping with a global grad norm;
- its EP and expert-data-parallel (EDP) process groups, which `moe.ep` then uses for its
  all-to-all, and its MoE gradient handling: expert params in param groups marked `moe=True`,
  whose gradients the engine/ZeRO reduce over the EDP group only (divided by the whole DP world
  size, see `moe.ep`). Our `Dots1MoE` layers take none of DeepSpeed's MoE code (its `TopKGate`,
  softmax top-k with a capacity factor, and einsum dispatch): routing is our sigmoid router and
  dispatch is `moe.ep` (dropless all-to-all). How the two meet -- DeepSpeed's private group API,
  its MoE base class and parameter flags, the dropped step, the offload optimizer -- is the
  adapter's business (`anneal.parallel.deepspeed_compat`), the one module that touches DeepSpeed's
  internals;
- Not used: DeepSpeed's optimizer section and LR scheduler (the trainer owns AdamW's
  hyper-parameters and the token-indexed schedule: `step(lr)` sets the LR), DeepSpeed's
  gradient-accumulation counter (`managed_gradient_accumulation: false`: the trainer's step is the
  boundary, whatever the number of micro-batches of the batch ramp), and DeepSpeed's
  `save_checkpoint` (its MoE checkpoint writer expects DeepSpeed's per-expert module names
  `deepspeed_moe.experts.deepspeed_experts.<i>`; our experts are stacked tensors). Checkpoints are
  DCP step folders: each rank writes its ZeRO fragments of the fp32 masters and AdamW's moments
  (`checkpoint_pieces`), nothing gathered, readable under any layout (`anneal.checkpoints.run_checkpoints`).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist

from anneal.checkpoints import training_state
from anneal.errors import AnnealError
from anneal.model.config import Dots1Config
from anneal.model.grad_fusion import describe_fused, fuse_weight_gradients
from anneal.model.precision import PrecisionPolicy
from anneal.parallel import deepspeed_compat as compat
from anneal.parallel.deepspeed_compat import init_distributed
from anneal.parallel.ds_config import deepspeed_config, update_streams
from anneal.parallel.engine_protocol import PostStepHooks
from anneal.parallel.layout import ParallelLayout
from anneal.parallel.parallelize import apply_expert_parallel
from moe import ep
from moe.layer import moe_layers


# -------------------------------------------------------------------------------------- engine
class DeepSpeedEngine(PostStepHooks):
    """The engine seam (`anneal.parallel.engine_protocol`) under DeepSpeed: backward(loss), step(lr)
    -> grad_norm, skip_step, reduce_expert_load, checkpoint_pieces/restore_state (this rank's ZeRO
    fragments, written and read through DCP under any layout), export_model.

    The model is normally parallelized already (`anneal.parallel.parallelize`); one that still
    holds all experts gets that step here (`apply_expert_parallel`: they are sliced to this rank's
    range). Call after `init_distributed`; the EP groups come from `layout` (built by `launch`), or
    are created for `ep_size`."""

    def __init__(self, model: torch.nn.Module, tcfg, *, ep_size: int = 1, zero_stage: int = 1,
                 extra_config: dict | None = None, policy: PrecisionPolicy | None = None,
                 layout: ParallelLayout | None = None, offload: str = "none", offload_chunk_mb: int = 256):
        compat.require_deepspeed()
        import deepspeed

        if not dist.is_initialized():
            raise AnnealError("DeepSpeedEngine: call anneal.parallel.ds_engine.init_distributed() first")
        self.post_step_hooks = []
        layers = moe_layers(model)
        n_experts = layers[0].gate.n_experts if layers else ep_size
        if layout is None or layout.groups is None:
            layout = ParallelLayout.current(ep_size, compat.expert_parallel_groups(ep_size, n_experts))
        ep.check_ep_size(layout.ep_size, n_experts, layout.world)
        self.parallel, self.groups = layout, layout.groups
        if layers:
            apply_expert_parallel(model, layout)
            compat.register_moe_layers(model, self.groups)
        policy = policy or PrecisionPolicy()
        # a bf16 policy reaches here on CUDA only (PrecisionPolicy.for_device computes in fp32 on CPU);
        # the engine-agreement tests build one on CPU, where DeepSpeed's bf16 optimizers run too
        on_cuda = next(model.parameters()).is_cuda
        fp32_sums = policy.grad_accum_dtype == torch.float32
        # the streamed update (deepspeed_compat.stream_offload_step) moves nothing over PCIe from the
        # fp32 masters (its own pinned slots carry the chunks), so DeepSpeed need not pin them: torch's
        # pinned allocator rounds each group up to a power of two (a 12-layer rank share: 11.6 GiB more)
        pin = on_cuda and not update_streams(offload, zero_stage, policy.mixed and fp32_sums, offload_chunk_mb)
        self.config = deepspeed_config(tcfg, zero_stage=zero_stage, bf16=policy.mixed, extra=extra_config,
                                       grad_accum_dtype="fp32" if fp32_sums else "bf16",
                                       offload=offload, pin_memory=pin)
        self.offload = offload

        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        param_groups = [{"params": decay, "weight_decay": float(tcfg.weight_decay), "name": "decay"},
                        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        param_groups = compat.moe_param_groups(param_groups)
        if offload == "optimizer":
            if pin:
                compat.exact_pinned_allocations()
            optimizer = compat.cpu_adam(param_groups, tcfg)
        else:
            optimizer = torch.optim.AdamW(param_groups, lr=0.0, betas=tuple(tcfg.betas), eps=float(tcfg.eps),
                                          fused=on_cuda or None)
        lost = compat.values_lost_to_bf16(model) if policy.mixed else []
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=copy.deepcopy(self.config), dist_init_required=False)
        compat.restore_fp32_masters(lost)  # the masters start from the fp32 values, as the native engine's
        self.offload_chunk_mb = offload_chunk_mb
        self.streamed = offload == "optimizer" and compat.stream_offload_step(self.engine, offload_chunk_mb * 2 ** 18)
        self.model = model
        # gradient-accumulation fusion: ZeRO 1's bf16 optimizer only (deepspeed_compat says why)
        self.fused = (fuse_weight_gradients(model, compat.fp32_gradient_accumulators(self.engine))
                      if policy.fuses_grad_accumulation else [])

    # -- building it from the config --------------------------------------------------------------
    @classmethod
    def launch(cls, cfg, device: torch.device) -> tuple[torch.device, ParallelLayout]:
        """Join the process group (this rank's GPU on CUDA) and create the EP/EDP groups."""
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        init_distributed(device)
        layout = ParallelLayout.current(cfg.parallel.ep_size)  # checks ep_size against the world first
        return device, ParallelLayout.current(layout.ep_size, compat.expert_parallel_groups(layout.ep_size))

    @classmethod
    def from_config(cls, model: torch.nn.Module, cfg, policy: PrecisionPolicy, layout: ParallelLayout):
        from omegaconf import OmegaConf

        return cls(model, cfg.trainer, ep_size=layout.ep_size, zero_stage=cfg.parallel.zero_stage, policy=policy,
                   extra_config=OmegaConf.to_container(cfg.trainer.deepspeed, resolve=True) or None, layout=layout,
                   offload=cfg.parallel.offload, offload_chunk_mb=cfg.parallel.offload_chunk_mb)

    # -- the Engine interface -------------------------------------------------------------------
    def describe(self) -> str:
        """One line for the run's log: which optimizer steps which state where."""
        inner = self.engine.optimizer.optimizer
        where = "host memory (parallel.offload=optimizer)" if self.offload == "optimizer" else \
            next(p for g in inner.param_groups for p in g["params"]).device.type
        if self.streamed:
            where += f", the update streamed {self.offload_chunk_mb} MiB at a time"
        return (f"optimizer: DeepSpeed {type(self.engine.optimizer).__name__} (ZeRO-{self.config['zero_optimization']['stage']}), "
                f"{type(inner).__name__} on fp32 masters in {where}{describe_fused(self.fused)}")

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def backward_piece(self, tensors: list[torch.Tensor], grads: list, last: bool) -> None:
        """A piece of a micro-batch's backward (the paired schedule). The pieces before the last are
        plain autograd calls: ZeRO's gradient hooks sit on the parameters and fire whichever call
        produces a gradient. The last goes through `engine.backward`, which also does DeepSpeed's
        once-per-micro-batch bookkeeping (counting it; the bf16 optimizer folding the micro-batch's
        gradients into its fp32 ones). engine.backward takes a scalar: sum <t, g> over the pieces'
        outputs has exactly the gradients g (the product's backward multiplies g by 1)."""
        if not last:
            torch.autograd.backward(tensors, grads)
            return
        scalar = sum(t if g is None else (t * g).sum() for t, g in zip(tensors, grads))
        self.engine.backward(scalar, scale_wrt_gas=False)

    def step(self, lr: float) -> float:
        """One optimizer step; DeepSpeed drops it when the gradients are not finite (fp32 always,
        bf16 with check_grad_overflow), which `step_applied` then reports."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        compat.mark_fused_gradients(self.engine, self.fused)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.step_applied = self.engine.was_step_applied()
        if not self.step_applied:
            compat.forget_dropped_gradients(self.engine)
        self._run_post_step_hooks(self.step_applied)
        return float(norm) if norm is not None else float("nan")

    def skip_step(self) -> None:
        """Drop this step's gradients without an update: DeepSpeed's step runs up to its optimizer,
        which reports an overflow (`deepspeed_compat.drop_step`)."""
        compat.drop_step(self.engine)
        compat.forget_dropped_gradients(self.engine)
        self.step_applied = False
        self._run_post_step_hooks(False)

    def reduce_expert_load(self, routers) -> None:
        """Global expert load (sum over all ranks) into each router's `expert_load`, before the
        trainer's bias update."""
        ep.allreduce_expert_load(routers)

    def layout(self) -> dict:
        return {"world_size": dist.get_world_size(), "ep_size": self.groups.ep_size,
                "zero_stage": self.config["zero_optimization"]["stage"]}

    # -- sharded checkpoints (anneal.checkpoints.training_state) ------------------------------------
    def checkpoint_pieces(self) -> list[training_state.Piece]:
        """What this rank owns, as ranges of the full flattened tensors: for each parameter its ZeRO
        fragment of the fp32 master and of AdamW's moments (DeepSpeed's `_hp_mapping`: the
        fragment's place in the flat partition and in the parameter); an expert parameter's full
        tensor stacks all experts, of which this rank's [start, stop) come first at start * (one
        expert's numel). The buffers (router biases, the same on every rank) from global rank 0."""
        opt = self.engine.optimizer
        inner = opt.optimizer
        start, stop = self.model.expert_range
        n_experts = self.model.config.n_routed_experts
        pieces = []
        for name, p in self.model.named_parameters():
            shape, base = tuple(p.shape), 0
            if ep.is_expert_param(p):
                shape, base = (n_experts, *p.shape[1:]), start * p[0].numel()
            hp = getattr(p, "_hp_mapping", None)
            if hp is None:  # this rank owns no fragment of it
                pieces.append(training_state.Piece(name, shape, base, p.new_empty(0, dtype=torch.float32)))
                continue
            flat = inner.param_groups[hp.param_group_index]["params"][0]
            at = hp.hp_fragment_address
            st = inner.state.get(flat) or {}
            moments = [st[k].narrow(0, at.start, at.numel) if k in st else torch.zeros(at.numel, device=flat.device)
                       for k in ("exp_avg", "exp_avg_sq")]
            pieces.append(training_state.Piece(name, shape, base + hp.lp_fragment_address.start,
                                               flat.narrow(0, at.start, at.numel), *moments))
        if dist.get_rank() == 0:
            params = {n for n, _ in self.model.named_parameters()}
            pieces += [training_state.Piece(n, tuple(b.shape), 0, b.detach().reshape(-1))
                       for n, b in self.model.state_dict().items() if n not in params]
        return pieces

    def optimizer_step(self) -> int:
        """AdamW's step count (every flat partition steps together)."""
        for st in self.engine.optimizer.optimizer.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def checkpoint_layout(self) -> dict:
        return {**self.layout(), "engine": "deepspeed"}

    def restore_state(self, step_dir: Path, optimizer_step: int) -> None:
        """This rank's fragments of the fp32 masters and AdamW's moments, read from whatever the
        saving layout's ranks wrote (the weights are already loaded), and AdamW's step count. Collective."""
        opt = self.engine.optimizer
        inner = opt.optimizer
        for group in inner.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for flat in group["params"]:
                st = inner.state[flat]
                if "exp_avg" not in st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(flat), torch.zeros_like(flat)
                # torch's AdamW keeps a tensor step; DeepSpeed's CPU Adam an int (its kernel's argument)
                st["step"] = optimizer_step if self.offload == "optimizer" else \
                    torch.tensor(float(optimizer_step), dtype=torch.float32, device=flat.device if on_device else "cpu")
        if hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = False  # DeepSpeed re-links its fragment views to the new state
        training_state.load_pieces(step_dir, self.checkpoint_pieces())
        # the compute weights were loaded from the same masters before the engine was built
        # (RunCheckpoints.load): they already are the masters in the compute dtype

    def export_model(self) -> torch.nn.Module | None:
        """Gather the experts (collective); rank 0 gets the whole, unsharded model, the others None."""
        full = ep.full_state_dict(self.model, self.groups)
        if dist.get_rank() != 0:
            return None
        whole = type(self.model)(Dots1Config.from_hf_dict(self.model.config.to_hf_dict()))
        whole.load_state_dict(full, strict=True)
        return whole
