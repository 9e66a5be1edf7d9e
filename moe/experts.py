"""Routed experts stored stacked (what grouped GEMM kernels want) behind one backend interface.

Weights: `w_gate_up` [E, H, 2I] and `w_down` [E, I, H], so an expert's MLP over its rows x is
(silu(x @ Wg) * (x @ Wu)) @ Wd. The HF checkpoint keeps per-expert `gate_proj`/`up_proj`/`down_proj`
[out, in] matrices; `anneal.checkpoints.hf_layout` maps between the two.

Backends (pick with `Dots1MoE(..., backend=name)` / the `model.experts_backend` config key):
- `torch`: a loop over experts, the reference every other backend is tested against;
- `grouped_mm`: one `torch._grouped_mm` call per projection (what torchtitan uses);
- `triton`: fused kernels in `moe.kernels` (available when Triton imports).
The interface and the torch backends are in `moe.backends`; this module is the registry.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moe.backends import ExpertsBackend, GroupedMMBackend, TorchLoopBackend
from moe.errors import UnknownBackendError


_BACKENDS: dict[str, type[ExpertsBackend]] = {}


def register_backend(cls: type[ExpertsBackend]) -> type[ExpertsBackend]:
    _BACKENDS[cls.name] = cls
    return cls


register_backend(TorchLoopBackend)
if hasattr(torch, "_grouped_mm"):
    register_backend(GroupedMMBackend)


def _register_triton() -> None:
    if "triton" in _BACKENDS:
        return
    try:
        from moe.kernels.backend import TritonBackend  # imports triton: only when asked for
    except ImportError:
        return
    register_backend(TritonBackend)


def is_expert_param(p: torch.Tensor) -> bool:
    """Whether `p` carries moe's mark of an expert-parallel weight (`GroupedExperts.mark_expert_params`):
    sharded over the EP group, its gradient reduced over the expert-data-parallel group only."""
    return getattr(p, "moe_expert", False)


def available_backends() -> list[str]:
    _register_triton()
    return sorted(_BACKENDS)


def get_backend(name: str) -> ExpertsBackend:
    if name not in _BACKENDS:
        _register_triton()
    if name not in _BACKENDS:
        raise UnknownBackendError(f"model.experts_backend: unknown backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name]()


class GroupedExperts(nn.Module):
    """The routed experts of one MoE layer, stacked. `n_experts` is the layer's expert count (what
    the router picks from); the module holds the experts `expert_range = (start, stop)` of them:
    all by default, this rank's share under expert parallelism (`moe.ep.shard_experts`)."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, backend: str = "torch",
                 expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.n_experts, self.hidden_size, self.intermediate_size = n_experts, hidden_size, intermediate_size
        self.expert_range = (0, n_experts) if expert_range is None else tuple(expert_range)
        n_held = self.expert_range[1] - self.expert_range[0]
        self.w_gate_up = nn.Parameter(torch.empty(n_held, hidden_size, 2 * intermediate_size))
        self.w_down = nn.Parameter(torch.empty(n_held, intermediate_size, hidden_size))
        self.backend = get_backend(backend)
        self.wgrad_into: tuple[torch.Tensor, torch.Tensor] | None = None  # see `accumulate_wgrad_into`

    def set_backend(self, name: str) -> None:
        """Pick the backend that computes the held experts; under expert parallelism the EP
        dispatch stays and only its local backend changes (`ExpertsBackend.with_local`)."""
        self.backend = self.backend.with_local(get_backend(name))

    def hold_experts(self, start: int, stop: int) -> None:
        """Keep only the experts [start, stop) (global indices) of those held: the stacked weights
        are sliced (new parameters)."""
        have_start, have_stop = self.expert_range
        if not have_start <= start < stop <= have_stop:
            raise ValueError(f"hold_experts({start}, {stop}): the module holds experts [{have_start}, {have_stop})")
        if (start, stop) != self.expert_range:
            rows = slice(start - have_start, stop - have_start)
            self.w_gate_up = nn.Parameter(self.w_gate_up.detach()[rows].clone())
            self.w_down = nn.Parameter(self.w_down.detach()[rows].clone())
            self.expert_range = (start, stop)
            self.wgrad_into = None  # the accumulators were the old parameters'

    def accumulate_wgrad_into(self, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
        """Have the backward add the weights' gradients into these fp32 tensors (shaped like
        `w_gate_up` and `w_down`) instead of their `.grad`, where the backend can (moe.wgrad);
        returns whether the current backend does. With one that does not, `.grad` is set as usual."""
        if gate_up.shape != self.w_gate_up.shape or down.shape != self.w_down.shape:
            raise ValueError(f"accumulate_wgrad_into: accumulators {tuple(gate_up.shape)}, {tuple(down.shape)} "
                             f"for weights {tuple(self.w_gate_up.shape)}, {tuple(self.w_down.shape)}")
        self.wgrad_into = (gate_up, down)
        return self.backend.local.accumulates_wgrad

    def mark_expert_params(self) -> None:
        """Mark the stacked weights as expert-parallel (`is_expert_param`); `moe.ep.shard_experts`
        does it once the module holds its rank's experts. An engine translates the mark into its own
        (the DeepSpeed adapter: `anneal.parallel.deepspeed_compat`)."""
        for p in (self.w_gate_up, self.w_down):
            p.moe_expert = True

    @property
    def ep_groups(self):
        """The EP groups the rows are dispatched over when the experts are spread over more than one
        rank (`moe.ep.shard_experts`); None when every expert the router picks is held here."""
        groups = self.backend.groups
        return groups if groups is not None and groups.ep_size > 1 else None

    def dispatch_with(self, wrap: Callable[[ExpertsBackend], ExpertsBackend]) -> None:
        """Route through `wrap(local backend)`: how `moe.ep` installs its all-to-all dispatch."""
        self.backend = wrap(self.backend.local)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        return self.backend.routed(x, topk_idx, topk_weight, self.w_gate_up, self.w_down, self.wgrad_into)

    def extra_repr(self) -> str:
        held = "" if self.expert_range == (0, self.n_experts) else f", held={self.expert_range}"
        return (f"experts={self.n_experts}{held}, hidden={self.hidden_size}, inter={self.intermediate_size}, "
                f"backend={self.backend.name}")
