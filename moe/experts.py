"""Routed experts stored stacked (what grouped GEMM kernels want) behind one backend interface.

Weights: `w_gate_up` [E, H, 2I] (gate columns first, then up) and `w_down` [E, I, H], so an expert's
MLP over its rows x is  (silu(x @ Wg) * (x @ Wu)) @ Wd.  The HF checkpoint keeps per-expert
`gate_proj`/`up_proj`/`down_proj` [out, in] matrices; `anneal.hf_io` maps between the two.

Backends (pick with `Dots1MoE(..., backend=name)` / the `model.experts_backend` config key):
- `torch`: a loop over experts, the reference every other backend is tested against;
- `grouped_mm`: one `torch._grouped_mm` call per projection (what torchtitan uses);
- `triton`: fused kernels in `moe.kernels` (registered when that module imports).
A backend implements `grouped_mlp` (rows already grouped by expert) and may override `routed`
(the whole gather -> MLP -> weighted scatter) to fuse the permutation into its kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.dispatch import permute, unpermute


class ExpertsBackend:
    name = "base"

    def grouped_mlp(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                    w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def routed(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
               w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        x_grouped, tokens_per_expert, order = permute(x, topk_idx, w_gate_up.shape[0])
        y_grouped = self.grouped_mlp(x_grouped, tokens_per_expert, w_gate_up, w_down)
        return unpermute(y_grouped, order, topk_weight)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class TorchLoopBackend(ExpertsBackend):
    """Reference: one matmul pair per expert with rows; exact and easy to read."""
    name = "torch"

    def grouped_mlp(self, x, tokens_per_expert, w_gate_up, w_down):
        outs, start = [], 0
        for e, n in enumerate(tokens_per_expert.tolist()):
            if n:
                outs.append(swiglu(x[start:start + n] @ w_gate_up[e]) @ w_down[e])
            start += n
        if not outs:
            return x.new_zeros(0, w_down.shape[-1]) + 0 * (w_gate_up.sum() + w_down.sum())
        return torch.cat(outs)


class GroupedMMBackend(ExpertsBackend):
    """`torch._grouped_mm` over all experts at once (offsets = cumulative rows per expert)."""
    name = "grouped_mm"

    def grouped_mlp(self, x, tokens_per_expert, w_gate_up, w_down):
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        h = swiglu(torch._grouped_mm(x, w_gate_up, offs=offs))
        return torch._grouped_mm(h, w_down, offs=offs)


_BACKENDS: dict[str, type[ExpertsBackend]] = {}


def register_backend(cls: type[ExpertsBackend]) -> type[ExpertsBackend]:
    _BACKENDS[cls.name] = cls
    return cls


register_backend(TorchLoopBackend)
if hasattr(torch, "_grouped_mm"):
    register_backend(GroupedMMBackend)


def available_backends() -> list[str]:
    _try_import_triton_backend()
    return sorted(_BACKENDS)


def get_backend(name: str) -> ExpertsBackend:
    if name not in _BACKENDS:
        _try_import_triton_backend()
    if name not in _BACKENDS:
        from moe.errors import UnknownBackendError
        raise UnknownBackendError(f"model.experts_backend: unknown backend {name!r}; available: {available_backends()}")
    return _BACKENDS[name]()


def _try_import_triton_backend() -> None:
    try:
        import moe.kernels.backend  # noqa: F401  (registers "triton" when Triton is importable)
    except ImportError:
        pass


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
