"""The DeepSpeed engine behind the trainer's engine seam (`anneal.train.engine`): ZeRO stage 1/2, bf16 on GPU, gradient
clipping, expert parameters in MoE param groups reduced over the expert-data-parallel group.

What we take from DeepSpeed (and what we do not):
- `deepspeed.initialize`: the engine, the ZeRO stage 1/2 optimizer wrapper (partitioned fp32
  master weights and optimizer state, reduce-scatter of gradients), bf16 mixed precision,
  gradient clipping with a global grad norm;
- `deepspeed.utils.groups`: the EP and expert-data-parallel (EDP) process groups
  (`_create_expert_and_data_parallel`), which `moe.ep` then uses for its all-to-all;
- DeepSpeed's MoE parameter handling: expert params carry `allreduce=False` and
  `group_name="ep_size_<P>"`; `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer`
  puts them in param groups marked `moe=True`, and the engine/ZeRO then reduce their gradients
  over the EDP group only (divided by the whole DP world size, see `moe.ep`).
  The engine only does this when the model holds a `deepspeed.moe.layer.MoE` module, so our
  `Dots1MoE` layers are given that base class (`DeepSpeedDots1MoE`) without any of its code:
  DeepSpeed's `TopKGate` (softmax top-k with a capacity factor) and einsum dispatch are not
  used; routing is our sigmoid router and dispatch is `moe.ep` (dropless all-to-all).
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
from anneal.model.precision import PrecisionPolicy
from anneal.parallel.layout import ParallelLayout
from anneal.train.engine import PostStepHooks
from moe import ep
from moe.layer import Dots1MoE

try:
    import deepspeed
    from deepspeed.moe.layer import MoE as _DSMoE
except ImportError:  # pragma: no cover - exercised only without the extra installed
    deepspeed = None
    _DSMoE = None


def _require_deepspeed() -> None:
    if deepspeed is None:
        raise AnnealError("trainer.engine=deepspeed needs DeepSpeed: pip install --no-build-isolation "
                          "'dots-anneal[deepspeed]' (or deepspeed==0.19.8)")


if _DSMoE is not None:
    class DeepSpeedDots1MoE(Dots1MoE, _DSMoE):
        """Our MoE layer, recognized by DeepSpeed's engine as an MoE layer (`isinstance(m, MoE)`).

        Only the attributes the engine reads are set (num_experts, ep_size, expert_group_name,
        num_local_experts); forward is Dots1MoE's. Process groups are created before
        `deepspeed.initialize`, so `set_deepspeed_parallelism` has nothing to do."""

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass

        def set_expert_groups(self, groups: ep.EPGroups) -> None:
            """The attributes DeepSpeed's engine reads from an MoE layer, for the EP layout `groups`."""
            self.num_experts = self.gate.n_experts
            self.ep_size = groups.ep_size
            self.expert_group_name = groups.group_name
            self.num_local_experts = self.gate.n_experts // groups.ep_size
            self.enable_expert_tensor_parallelism = False
            self.use_residual = False

        forward = Dots1MoE.forward


def adopt_moe_layers(model: torch.nn.Module, groups: ep.EPGroups) -> int:
    """Give every Dots1MoE of `model` DeepSpeed's MoE base class; returns the number of layers."""
    _require_deepspeed()
    n = 0
    for layer in ep.moe_layers(model):
        if not isinstance(layer, DeepSpeedDots1MoE):
            layer.__class__ = DeepSpeedDots1MoE
        layer.set_expert_groups(groups)
        n += 1
    return n


# ------------------------------------------------------------------------------------- config
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
    memory (ZeRO-Offload; pinned on CUDA), stepped by DeepSpeedCPUAdam."""
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
                              **({"offload_optimizer": {"device": "cpu", "pin_memory": bool(pin_memory)}}
                                 if offload == "optimizer" else {})},
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
    "zero_optimization.offload_optimizer.pin_memory": "the device (pinned host memory on CUDA only)",
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


# ---------------------------------------------------------------------------------------- init
def init_distributed(device: torch.device | str = "cpu") -> None:
    """Join the process group the launcher (deepspeed / torchrun) set up through the environment:
    gloo on CPU, nccl on CUDA. Idempotent."""
    _require_deepspeed()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise AnnealError("trainer.engine=deepspeed: no distributed launch found (RANK unset); start with "
                              "`deepspeed -m anneal ...` or `torchrun --nproc-per-node N -m anneal ...`")
        dist.init_process_group(backend)
    deepspeed.init_distributed(dist_backend=backend)


def ensure_ep_groups(ep_size: int, n_experts: int | None = None) -> ep.EPGroups:
    """Create DeepSpeed's EP/EDP groups for `ep_size` (collective) and describe this rank's place."""
    from deepspeed.utils import groups

    ep.check_ep_size(ep_size, n_experts if n_experts is not None else ep_size, dist.get_world_size())
    if ep.ds_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return ep.build_ep_groups(ep_size, n_experts)


def cpu_adam(param_groups: list[dict], tcfg) -> torch.optim.Optimizer:
    """DeepSpeed's CPU AdamW over `param_groups` (each group keeps its weight decay), the optimizer
    ZeRO-Offload requires (it refuses a client torch AdamW). Its moments are fp32: the kernel steps
    fp32 parameters only with fp32 state, and bf16 moments would need bf16 masters
    (DeepSpeed's bf16_optimizer_states), which the precision policy does not allow."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=0.0, betas=tuple(tcfg.betas), eps=float(tcfg.eps),
                                adamw_mode=True, fp32_optimizer_states=True)
    except RuntimeError as e:
        raise AnnealError(f"parallel.offload=optimizer needs DeepSpeed's cpu_adam op, which did not build or load "
                          f"({e.__cause__ or e}); it is compiled on first use with the C++ compiler and ninja "
                          f"(g++, pip install ninja), or set parallel.offload=none") from e


# -------------------------------------------------------------------------------------- engine
class DeepSpeedEngine(PostStepHooks):
    """The engine seam of `anneal.train.engine` under DeepSpeed: backward(loss), step(lr) ->
    grad_norm, reduce_expert_load, checkpoint_pieces/restore_state (this rank's ZeRO fragments,
    written and read through DCP under any layout), export_model.

    The model may hold all experts (they are sliced to this rank's range) or only this rank's
    (loaded with `load_hf_checkpoint(expert_range=...)`). Call after `init_distributed`; the EP
    groups come from `layout` (built by `launch`), or are created for `ep_size`."""

    def __init__(self, model: torch.nn.Module, tcfg, *, ep_size: int = 1, zero_stage: int = 1,
                 extra_config: dict | None = None, policy: PrecisionPolicy | None = None,
                 layout: ParallelLayout | None = None, offload: str = "none"):
        _require_deepspeed()
        if not dist.is_initialized():
            raise AnnealError("DeepSpeedEngine: call anneal.parallel.ds_engine.init_distributed() first")
        self.post_step_hooks = []
        layers = ep.moe_layers(model)
        n_experts = layers[0].gate.n_experts if layers else ep_size
        if layout is None or layout.groups is None:
            layout = ParallelLayout.current(ep_size, ensure_ep_groups(ep_size, n_experts))
        ep.check_ep_size(layout.ep_size, n_experts, layout.world)
        self.parallel, self.groups = layout, layout.groups
        if layers:
            if not isinstance(layers[0].experts.backend, ep.EPBackend):
                ep.shard_experts(model, self.groups)
            adopt_moe_layers(model, self.groups)
        policy = policy or PrecisionPolicy()
        # a bf16 policy reaches here on CUDA only (PrecisionPolicy.for_device computes in fp32 on CPU);
        # the engine-agreement tests build one on CPU, where DeepSpeed's bf16 optimizers run too
        on_cuda = next(model.parameters()).is_cuda
        self.config = deepspeed_config(tcfg, zero_stage=zero_stage, bf16=policy.mixed, extra=extra_config,
                                       grad_accum_dtype="fp32" if policy.grad_accum_dtype == torch.float32 else "bf16",
                                       offload=offload, pin_memory=on_cuda)
        self.offload = offload

        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        param_groups = [{"params": decay, "weight_decay": float(tcfg.weight_decay), "name": "decay"},
                        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        param_groups = [g for g in split_params_into_different_moe_groups_for_optimizer(param_groups) if g["params"]]
        if offload == "optimizer":
            optimizer = cpu_adam(param_groups, tcfg)
        else:
            optimizer = torch.optim.AdamW(param_groups, lr=0.0, betas=tuple(tcfg.betas), eps=float(tcfg.eps),
                                          fused=on_cuda or None)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=copy.deepcopy(self.config), dist_init_required=False)
        self.model = model

    # -- building it from the config --------------------------------------------------------------
    @classmethod
    def launch(cls, cfg, device: torch.device) -> tuple[torch.device, ParallelLayout]:
        """Join the process group (this rank's GPU on CUDA) and create the EP/EDP groups."""
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        init_distributed(device)
        layout = ParallelLayout.current(cfg.parallel.ep_size)  # checks ep_size against the world first
        return device, ParallelLayout.current(layout.ep_size, ensure_ep_groups(layout.ep_size))

    @classmethod
    def from_config(cls, model: torch.nn.Module, cfg, policy: PrecisionPolicy, layout: ParallelLayout):
        from omegaconf import OmegaConf

        return cls(model, cfg.trainer, ep_size=layout.ep_size, zero_stage=cfg.parallel.zero_stage, policy=policy,
                   extra_config=OmegaConf.to_container(cfg.trainer.deepspeed, resolve=True) or None, layout=layout,
                   offload=cfg.parallel.offload)

    # -- the Engine interface -------------------------------------------------------------------
    def describe(self) -> str:
        """One line for the run's log: which optimizer steps which state where."""
        inner = self.engine.optimizer.optimizer
        where = "host memory (parallel.offload=optimizer)" if self.offload == "optimizer" else \
            next(p for g in inner.param_groups for p in g["params"]).device.type
        return (f"optimizer: DeepSpeed {type(self.engine.optimizer).__name__} (ZeRO-{self.config['zero_optimization']['stage']}), "
                f"{type(inner).__name__} on fp32 masters in {where}")

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
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.step_applied = self.engine.was_step_applied()
        if not self.step_applied:
            self._forget_dropped_gradients()
        self._run_post_step_hooks(self.step_applied)
        return float(norm) if norm is not None else float("nan")

    def skip_step(self) -> None:
        """Drop this step's gradients without an update. DeepSpeed's step runs as usual up to the
        optimizer (the same collectives on every rank, which all take the same decision); there the
        optimizer reports an overflow, the flag DeepSpeed itself uses to drop an fp16 step:
        - the ZeRO 1/2 optimizer (fp32, or bf16 with ZeRO 2) takes its own overflow path, which
          also clears the partitioned gradient buffers;
        - the bf16 optimizer (bf16 with ZeRO 1) skips its update, and the `zero_grad` DeepSpeed
          calls after every step clears its bf16 and fp32 gradients."""
        opt = self.engine.optimizer
        if hasattr(opt, "check_grad_overflow"):
            saved = opt.check_grad_overflow
            opt.check_grad_overflow = True
            opt.has_overflow = lambda *args, **kwargs: True  # this step only (instance attributes)
        else:
            opt.step = lambda closure=None: setattr(opt, "overflow", True)
        try:
            self.engine.step()
        finally:
            if hasattr(opt, "check_grad_overflow"):
                del opt.has_overflow
                opt.check_grad_overflow = saved
            else:
                del opt.step
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step the trainer dropped: its overflow handling changed")
        self._forget_dropped_gradients()
        self.step_applied = False
        self._run_post_step_hooks(False)

    def _forget_dropped_gradients(self) -> None:
        """After a dropped step under ZeRO-Offload: clear ZeRO's fp32 gradient partitions. With bf16
        weights and fp32 accumulation DeepSpeed sums each micro-batch's reduced gradients into those
        buffers (`averaged_gradients`, on the GPU) and copies them to the host at the step; its
        overflow path clears them only without offload, so the dropped step's (non-finite) sums
        would be added into the next step's (tests/test_engine_agreement.py)."""
        opt = self.engine.optimizer
        if getattr(opt, "cpu_offload", False):
            for k in list(opt.averaged_gradients):
                opt.averaged_gradients[k] = None

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
