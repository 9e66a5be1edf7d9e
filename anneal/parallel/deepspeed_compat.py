"""The one module that touches DeepSpeed's internals (written against DeepSpeed 0.19.8).

Everything else (`anneal.parallel.ds_engine`, `moe/`) talks to DeepSpeed through these functions;
`tests/test_deepspeed_compat.py` pins the behaviour each one relies on, so an upgrade that changes
it fails there first. The contract:

- process groups: `deepspeed.utils.groups` keeps its EP/EDP groups under the name
  `ep_size_<P>` (private `_create_expert_and_data_parallel`, `_get_expert_parallel_group_dict`,
  `_get_expert_parallel_group`, `_get_expert_data_parallel_group`), in `moe.ep`'s layout
  (EP = consecutive ranks, EDP = strided): `expert_parallel_groups` hands them to `moe.ep`;
- MoE layers: DeepSpeed's engine reduces expert gradients over the EDP group only when the model
  holds a `deepspeed.moe.layer.MoE` (`isinstance`) and the expert parameters carry
  `allreduce=False` and `group_name`; `register_moe_layers` gives our `Dots1MoE` layers that base
  class (without any of its code: not its gate, not its dispatch) and translates moe's own expert
  mark (`moe.experts.is_expert_param`) into those two attributes; `moe_param_groups` splits the
  optimizer's groups the way its ZeRO optimizer expects (`moe=True` groups);
- a dropped step: `drop_step` makes DeepSpeed's optimizer wrapper report an overflow for one
  step (the flag DeepSpeed itself uses to drop an fp16 step), by overriding instance attributes
  for that step only; `forget_dropped_gradients` clears ZeRO-Offload's fp32 gradient partitions,
  which its overflow path leaves in place;
- optimizer offload: `cpu_adam` (DeepSpeedCPUAdam, the optimizer
  ZeRO-Offload requires); DeepSpeed's own step pins its host buffers with `Tensor.pin_memory`, so
  `exact_pinned_allocations` asks torch's pinned allocator not to round them up to powers of two
  (the streamed update has DeepSpeed pin nothing);
  `stream_offload_step` replaces `DeepSpeedZeroOptimizer.step` and its boundary hook
  `copy_grads_in_partition` on one instance (ZeRO 2, bf16 + fp32 sums), reading the step's sums from
  the compact GPU partition buffers (`_get_compact_grad_partition_buffer(i).flat_partition`) and
  stepping CPU Adam's kernel (`ds_opt_adam.adam_update`) on chunks;
- start-up: `init_distributed` keeps DeepSpeed from building its shared-memory all-reduce op
  (`deepspeed.comm.torch.build_shm_op`; used by inference only);
- gradient-accumulation fusion: ZeRO 1's bf16 optimizer (`BF16_Optimizer`) keeps one fp32 gradient
  per parameter, views of flat per-group buffers it all-reduces at the step;
  `fp32_gradient_accumulators` hands those views to the fused weight-gradient GEMMs and
  `mark_fused_gradients` sets its per-parameter "has a gradient" flags, which its own hook sets
  only when a `.grad` arrives;
- fp32 masters: with bf16 on, `deepspeed.initialize` casts the model to bf16 and builds its fp32
  masters from the cast values; `values_lost_to_bf16` / `restore_fp32_masters` (through the public
  `deepspeed.utils.safe_set_full_fp32_param`) put back the fp32 values the cast rounded.
"""
from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist

from anneal.errors import AnnealError
from moe import ep
from moe.experts import is_expert_param
from moe.layer import Dots1MoE, moe_layers

try:
    import deepspeed
    from deepspeed.moe.layer import MoE as _DSMoE
except ImportError:  # pragma: no cover - exercised only without the extra installed
    deepspeed = None
    _DSMoE = None


def require_deepspeed() -> None:
    if deepspeed is None:
        raise AnnealError("trainer.engine=deepspeed needs DeepSpeed: pip install --no-build-isolation "
                          "'dots-anneal[deepspeed]' (or deepspeed==0.19.8)")


# ------------------------------------------------------------------------------ process groups
def init_distributed(device: torch.device | str = "cpu") -> None:
    """Join the process group the launcher (deepspeed / torchrun) set up through the environment:
    gloo on CPU, nccl on CUDA. Idempotent."""
    require_deepspeed()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise AnnealError("trainer.engine=deepspeed: no distributed launch found (RANK unset); start with "
                              "`deepspeed -m anneal ...` or `torchrun --nproc-per-node N -m anneal ...`")
        dist.init_process_group(backend)
    # DeepSpeed's communication backend builds its shared-memory CPU all-reduce op on start-up (a
    # C++ compile of ~1.5 min on a fresh machine, and shared-memory state living until exit); only
    # `inference_all_reduce` uses it, which training never calls (`deepspeed.comm.torch` as an
    # attribute is PyTorch itself, which deepspeed.comm re-exports: look the module up by name)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend)


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the EP/EDP group pair of an EP size (expert params carry it)."""
    return f"ep_size_{ep_size}"


def expert_parallel_groups(ep_size: int, n_experts: int | None = None) -> ep.EPGroups:
    """DeepSpeed's EP/EDP groups for `ep_size`, created on first call (collective), as `moe.ep`'s
    description of this rank's place: the model is sharded over the groups DeepSpeed reduces over."""
    from deepspeed.utils import groups

    ep.check_ep_size(ep_size, n_experts if n_experts is not None else ep_size, dist.get_world_size())
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    existing = groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)
    return ep.build_ep_groups(ep_size, n_experts, existing=existing)


# ---------------------------------------------------------------------------------- MoE layers
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
            self.expert_group_name = group_name(groups.ep_size)
            self.num_local_experts = self.gate.n_experts // groups.ep_size
            self.enable_expert_tensor_parallelism = False
            self.use_residual = False

        forward = Dots1MoE.forward


def register_moe_layers(model: torch.nn.Module, groups: ep.EPGroups) -> int:
    """Before `deepspeed.initialize`: give every Dots1MoE of `model` DeepSpeed's MoE base class, and
    every parameter moe marks as an expert's DeepSpeed's marks (not all-reduced over the DP group;
    reduced over the EDP group named `group_name` instead). Returns the number of MoE layers."""
    require_deepspeed()
    layers = moe_layers(model)
    for layer in layers:
        if not isinstance(layer, DeepSpeedDots1MoE):
            layer.__class__ = DeepSpeedDots1MoE
        layer.set_expert_groups(groups)
    for p in model.parameters():
        if is_expert_param(p):
            p.allreduce = False
            p.group_name = group_name(groups.ep_size)
    return len(layers)


def moe_param_groups(param_groups: list[dict]) -> list[dict]:
    """The optimizer's param groups with the expert parameters split into `moe=True` groups (one
    per EP group name), which DeepSpeed's ZeRO optimizer reduces over the EDP group; empty groups
    dropped."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return [g for g in split_params_into_different_moe_groups_for_optimizer(param_groups) if g["params"]]


# -------------------------------------------------------------------------------- dropped steps
def drop_step(engine) -> None:
    """Run DeepSpeed's step without an update. The step runs as usual up to the optimizer (the same
    collectives on every rank, which all take the same decision); there the optimizer wrapper
    reports an overflow:
    - the ZeRO 1/2 optimizer (fp32, or bf16 with ZeRO 2) takes its own overflow path, which also
      clears the partitioned gradient buffers;
    - the bf16 optimizer (bf16 with ZeRO 1) skips its update, and the `zero_grad` DeepSpeed calls
      after every step clears its bf16 and fp32 gradients.
    Raises if DeepSpeed applied the step anyway (its overflow handling changed)."""
    opt = engine.optimizer
    zero = hasattr(opt, "check_grad_overflow")
    if zero:
        saved = opt.check_grad_overflow
        opt.check_grad_overflow = True
        opt.has_overflow = lambda *args, **kwargs: True  # this step only (instance attributes)
    else:
        opt.step = lambda closure=None: setattr(opt, "overflow", True)
    try:
        engine.step()
    finally:
        if zero:
            del opt.has_overflow
            opt.check_grad_overflow = saved
        else:
            del opt.step
    if engine.was_step_applied():
        raise RuntimeError("DeepSpeed applied a step the trainer dropped: its overflow handling changed")


def forget_dropped_gradients(engine) -> None:
    """After a dropped step under ZeRO-Offload: clear ZeRO's fp32 gradient partitions. With bf16
    weights and fp32 accumulation DeepSpeed sums each micro-batch's reduced gradients into those
    buffers (`averaged_gradients`, on the GPU) and copies them to the host at the step; its
    overflow path clears them only without offload, so the dropped step's (non-finite) sums
    would be added into the next step's (tests/test_engine_agreement.py)."""
    opt = engine.optimizer
    if getattr(opt, "cpu_offload", False):
        for k in list(opt.averaged_gradients):
            opt.averaged_gradients[k] = None


# ------------------------------------------------------------------- gradient-accumulation fusion
def fp32_gradient_accumulators(engine) -> dict[torch.nn.Parameter, torch.Tensor]:
    """parameter -> its fp32 gradient sum under ZeRO 1's bf16 optimizer (`BF16_Optimizer`): a view,
    in the parameter's shape, of the flat per-group buffer that DeepSpeed all-reduces once, at the
    step (`get_grads_for_reduction`), so a weight-gradient GEMM may add into it directly
    (anneal.model.grad_fusion). Empty under any other optimizer wrapper: ZeRO 2 reduce-scatters
    every micro-batch's bf16 gradients into fp32 partitions, and with optimizer offload DeepSpeed
    uses its ZeRO optimizer at stage 1 too; neither keeps a whole fp32 gradient per parameter."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    opt = engine.optimizer
    if not isinstance(opt, BF16_Optimizer):
        return {}
    return {p: g.view(p.shape) for params, grads in zip(opt.bf16_groups, opt.fp32_groups_gradients)
            for p, g in zip(params, grads)}


def mark_fused_gradients(engine, fused: list[torch.nn.Parameter]) -> None:
    """Before the step: the `fused` parameters' fp32 gradients hold this step's sum. BF16_Optimizer
    counts a parameter in the grad norm and clipping only when its flag says so, and its own hook
    sets the flag only when a `.grad` arrives, which a fused weight never gets."""
    if not fused:
        return
    opt = engine.optimizer
    ids = {id(p) for p in fused}
    for flags, params in zip(opt.fp32_groups_has_gradients, opt.bf16_groups):
        for j, p in enumerate(params):
            if id(p) in ids:
                flags[j] = True


# ---------------------------------------------------------------------------- optimizer offload
PINNED_ROUND_LIMIT_MB = 64


def exact_pinned_allocations() -> bool:
    """Make torch's pinned host allocator give blocks over `PINNED_ROUND_LIMIT_MB` their exact size.
    By default it rounds every pinned block up to a power of two (for reuse), and ZeRO-Offload pins
    one fp32 master, one fp32 gradient and one bf16 upload buffer per parameter group, each as one
    block: an 8.5 GiB group takes 16 GiB of page-locked memory, so the host needs up to twice what
    the planner counts (an 8-layer rank share, planned at 78 GiB, filled a 125 GiB host and was
    killed). A limit the user set (`PYTORCH_ALLOC_CONF=pinned_max_round_threshold_mb:N`) is kept.
    Returns False where this torch has no settings API or refuses the key; a torch that predates the
    key but ignores unknown ones (2.13 accepts a made-up key silently) keeps rounding, harmlessly.
    Measured on torch 2.11 (the device's): the call succeeds and DeepSpeed's master groups are still
    rounded (bench/RESULTS.md, 12-layer rank share), which is why the streamed update, the default,
    has DeepSpeed pin nothing; this remains for DeepSpeed's own step (`parallel.offload_chunk_mb=0`)."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    set_ = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if get is None or set_ is None:
        return False
    current = get()  # the settings string last applied (the environment's); setting replaces it
    if "pinned_max_round_threshold_mb" not in current:
        try:
            set_(",".join(filter(None, [current, f"pinned_max_round_threshold_mb:{PINNED_ROUND_LIMIT_MB}"])))
        except (RuntimeError, ValueError):  # a torch whose parser refuses the key: rounding stays
            return False
    return True


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


def values_lost_to_bf16(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, its fp32 value, on the host) for every fp32 parameter that bf16 cannot hold
    exactly: a random init, or an fp32 checkpoint. A bf16 checkpoint loaded in fp32 gives none, so
    the anneal of a released checkpoint keeps no copy."""
    lost = []
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float32 and not torch.equal(p, p.to(torch.bfloat16).float()):
            lost.append((p, p.detach().to("cpu", copy=True)))
    return lost


def restore_fp32_masters(lost: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Write the fp32 values back into this rank's fragments of DeepSpeed's fp32 masters (ZeRO 1/2,
    its bf16 optimizer, offloaded or not), so that the masters start where the native engine's do
    (`anneal.model.precision.MasterWeights` copies them before the cast)."""
    from deepspeed.utils import safe_set_full_fp32_param

    for p, value in lost:
        safe_set_full_fp32_param(p, value.to(p.device))


# ------------------------------------------------------------------------ streamed offload step
def stream_offload_step(engine, chunk_numel: int) -> bool:
    """Make ZeRO-Offload's update stream through the host a chunk at a time. DeepSpeed's own step
    copies the rank's whole fp32 gradient partition to a host buffer, steps CPU Adam on it, writes
    the updated masters into a whole bf16 host copy and uploads that: 6 of its 18 host bytes per
    parameter are those two buffers (532 + 266 GiB on an 8-GPU dots1 node, which then needs 2.5 TiB),
    and it stages the largest parameter (the embedding) on both sides of PCIe.
    Here each chunk of `chunk_numel` elements is copied down from the GPU's fp32 partition sum
    (where the step's gradient already is), clipped, stepped by CPU Adam (its own kernel, on views
    of the flat masters and moments: the checkpointed state is unchanged), rounded to bf16 and
    uploaded, through two pinned slots, so chunk k+1 comes down and chunk k-1 goes up while the CPU
    steps chunk k. Host memory: masters + moments (12 B per parameter) + the slots.

    Applies to what the dots1 layouts run (ZeRO 2, bf16 weights, fp32 gradient sums, so DeepSpeed
    keeps the sum in its compact GPU partition buffer); returns False, leaving DeepSpeed's step, for any
    other configuration. The hp-fragment gradient views (`safe_get_full_grad`) are gone with the
    host gradient."""
    opt = engine.optimizer
    if not getattr(opt, "cpu_offload", False) or not getattr(opt, "partition_gradients", False) or chunk_numel <= 0:
        return False
    if not all(opt._use_compact_grad_partition_buffer(i) for i in range(len(opt.bit16_groups))):
        return False
    from deepspeed.accelerator import get_accelerator

    # the whole host gradient and bf16 upload copy go (unpin_memory frees under DeepSpeed's native
    # pinning backend and is a no-op under torch's, where dropping the last reference frees)
    for fp32 in opt.single_partition_of_fp32_groups:
        if fp32.grad is not None:
            get_accelerator().unpin_memory(fp32.grad)
        fp32.grad = None
    for buffer in opt.param_buffer_of_bit16_for_cpu_offload_groups:
        get_accelerator().unpin_memory(buffer)
    opt.param_buffer_of_bit16_for_cpu_offload_groups = []
    for k in list(opt.offload_gradient_dict):
        opt.offload_gradient_dict[k] = None  # views of the freed gradient; DeepSpeed then says "not available"
    # its staging copies of the largest parameter (host and GPU) serve only the non-compact copy path
    if getattr(opt, "temp_grad_buffer_for_cpu_offload", None) is not None:
        get_accelerator().unpin_memory(opt.temp_grad_buffer_for_cpu_offload)
    opt.temp_grad_buffer_for_cpu_offload = opt.temp_grad_buffer_for_gpu_offload = None
    release_cached_pinned_memory()
    opt._streamed_offload = _OffloadStream(chunk_numel)
    opt.copy_grads_in_partition = _copy_grads_kept_on_device.__get__(opt)
    opt.step = _streamed_offload_step.__get__(opt)
    return True


def release_cached_pinned_memory() -> None:
    """Give the page-locked blocks torch's caching host allocator holds unused back to the OS. A
    pinned tensor dropped by its last reference goes to that cache, not to the OS: the host
    gradient and upload copy DeepSpeed pinned at start-up (36 GiB on an 8-layer rank share) stayed
    resident after `stream_offload_step` dropped them, and a 125 GiB host ran out."""
    if not torch.cuda.is_available():
        return
    empty = getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


# CPU Adam steps a span's SIMD-aligned bulk with fused multiply-adds and its last few elements with
# scalar code that rounds differently; chunks that are whole multiples of its widest tile (16 fp32
# lanes x 8 unrolled, AVX-512) split no tile, so the streamed update gives DeepSpeed's bits.
CPU_ADAM_TILE = 16 * 8


class _OffloadStream:
    """Two pinned (on CUDA) slots of one chunk each, fp32 gradient down and bf16 weights up, and the
    side stream the copies run on."""

    def __init__(self, chunk_numel: int):
        self.chunk = max(CPU_ADAM_TILE, int(chunk_numel) // CPU_ADAM_TILE * CPU_ADAM_TILE)
        self.slots = None

    def ready(self, device: torch.device, largest: int) -> None:
        if self.slots is None:
            n, pin = min(self.chunk, largest), device.type == "cuda"
            self.slots = [(torch.empty(n, dtype=torch.float32, pin_memory=pin),
                           torch.empty(n, dtype=torch.bfloat16, pin_memory=pin)) for _ in range(2)]
            self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            self.up = [None, None]   # the last upload from each bf16 slot (kept across groups and steps)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor):
        """dst <- src, on the side stream and asynchronous on CUDA (-> the event that marks it done),
        in order on CPU (-> None)."""
        if self.stream is None:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def update(self, grad: torch.Tensor, master: torch.Tensor, weights: torch.Tensor, step_chunk) -> None:
        """For each chunk [a, a + m): grad (device, fp32) -> slot; step_chunk(a, m, the slot's
        gradient) updates the masters there; masters -> bf16 slot -> weights (device)."""
        n, c = master.numel(), self.chunk
        spans = [(a, min(c, n - a)) for a in range(0, n, c)]
        down, up = [None, None], self.up
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())  # the backward wrote `grad` there

        def fetch(k):
            a, m = spans[k]
            down[k % 2] = self._copy(self.slots[k % 2][0][:m], grad.narrow(0, a, m))

        fetch(0)
        for k, (a, m) in enumerate(spans):
            if k + 1 < len(spans):
                fetch(k + 1)
            g_slot, w_slot = self.slots[k % 2]
            if down[k % 2] is not None:
                down[k % 2].synchronize()
            step_chunk(a, m, g_slot[:m])
            if up[k % 2] is not None:
                up[k % 2].synchronize()  # the slot's previous upload (chunk k-2, or another group's) has left it
            w_slot[:m].copy_(master.narrow(0, a, m))
            up[k % 2] = self._copy(weights.narrow(0, a, m), w_slot[:m])
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)  # the all-gather reads `weights`


def _copy_grads_kept_on_device(self, param, group_idx=None):
    """ZeRO's per-parameter hook at the accumulation boundary, without the copy of the sum to the
    host gradient (the streamed step reads it from the GPU partition buffer): the per-parameter
    norm and the overflow check stay DeepSpeed's."""
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if group_idx is None:
        group_idx = self._get_param_group_idx(param)
    param_id = self.get_param_id(param)
    self._offload_accumulated_param_ids.add(param_id)
    if self.is_gradient_accumulation_boundary():
        num_elements = self.grad_position[param_id][3]
        partition_id = dist.get_rank(group=self.real_dp_process_group[group_idx])
        source = self._get_compact_grad_partition_slice(group_idx, partition_id, param_id, num_elements)
        self.norm_for_param_grads[param_id] = source.data.to(get_norm_dtype()).norm(2)
        self.update_offload_overflow_tracker(source)
        self.clear_grad_attribute(param)


@torch.no_grad()
def _streamed_offload_step(self, closure=None):
    """DeepSpeed 0.19.8's ZeRO step (`DeepSpeedZeroOptimizer.step`) for the offload case bf16 +
    fp32 sums (no Muon, no loss scaling), with the update streamed by `_OffloadStream`."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.utils import all_gather_dp_groups, is_invalid_grad_norm
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    self.micro_step_id = INITIAL_MICRO_STEP_ID
    self._wait_for_offload_copies()
    self._offload_accumulated_param_ids = set()
    self.overflow = False
    if self.check_grad_overflow:
        self.check_overflow(partition_gradients=self.partition_gradients)
    norm = None
    if self.compute_grad_norm and not self.overflow:
        norm = self.scaled_global_norm()
        if is_invalid_grad_norm(norm):
            self.overflow = True
    prev_scale = self.loss_scale
    self._update_scale(self.overflow)
    if self.overflow:  # DeepSpeed's overflow path
        self._global_grad_norm = float("inf") if self.compute_grad_norm else None
        self.zero_grad(set_to_none=True)
        self._release_preflattened_grad_buffers()
        self.reset_cpu_buffers()
        return
    self._global_grad_norm = norm / prev_scale if norm is not None else None

    adam, stream = self.optimizer, self._streamed_offload
    stream.ready(torch.device(get_accelerator().current_device_name()), max(int(s) for s in self.partition_size))
    for i in range(len(self.bit16_groups)):
        master = self.single_partition_of_fp32_groups[i]
        group = adam.param_groups[i]
        state = adam.state[master]
        if not state:  # as DeepSpeedCPUAdam.step creates it: the checkpoint reads these
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(master), torch.zeros_like(master)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]

        def step_chunk(a, n, g):  # called within this iteration (update is synchronous on the host)
            self.unscale_and_clip_grads([g], norm)
            adam.ds_opt_adam.adam_update(adam.opt_id, state["step"], group["lr"], beta1, beta2, group["eps"],
                                         group["weight_decay"], group["bias_correction"], master.narrow(0, a, n),
                                         g, m.narrow(0, a, n), v.narrow(0, a, n))

        partition_id = dist.get_rank(group=self.real_dp_process_group[i])
        grad = self._get_compact_grad_partition_buffer(i).flat_partition
        stream.update(grad, master, self.parallel_partitioned_bit16_groups[i][partition_id], step_chunk)
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = None
    self._lazy_init_hp_params_optimizer_state()
    self.reset_cpu_buffers()
    all_gather_dp_groups(groups_flat=self.bit16_groups_flat, partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                         dp_process_group=self.real_dp_process_group, start_alignment_factor=self.nccl_start_alignment_factor,
                         allgather_bucket_size=self.allgather_bucket_size)
    for i in range(len(self.bit16_groups)):
        self._update_model_bit16_weights(i)

