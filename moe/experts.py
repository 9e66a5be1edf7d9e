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
    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, backend: str = "torch"):
        super().__init__()
        self.n_experts, self.hidden_size, self.intermediate_size = n_experts, hidden_size, intermediate_size
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, hidden_size, 2 * intermediate_size))
        self.w_down = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))
        self.set_backend(backend)

    def set_backend(self, name: str) -> None:
        self.backend = get_backend(name)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        return self.backend.routed(x, topk_idx, topk_weight, self.w_gate_up, self.w_down)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, hidden={self.hidden_size}, inter={self.intermediate_size}, backend={self.backend.name}"
