"""The experts-backend interface and the two torch backends (`torch` loop, `grouped_mm`).

A backend computes the routed SwiGLU experts over stacked weights `w_gate_up` [E, H, 2I] (gate
columns first, then up) and `w_down` [E, I, H]: `grouped_mlp` over rows already grouped by expert,
and `routed` from token order (gather -> MLP -> weighted combine), which a backend may override
to fuse the permutation into its kernels (the Triton backend does). Backends compute in the dtype
of the expert weights (the mixed-precision policy makes them bf16 on GPU), never through autocast:
`torch._grouped_mm` is no autocast op, so under autocast fp32 weights would silently stay fp32.
The registry that picks a backend by name is `moe.experts`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe.dispatch import permute, unpermute


class ExpertsBackend:
    """`wgrad_into`, where taken: None, or fp32 accumulators (gate/up [E, H, 2I], down [E, I, H]) that
    a backend with `accumulates_wgrad` adds the weights' gradients into in its backward instead of
    giving them a `.grad` (moe.wgrad); the others ignore it and the weights get their `.grad`."""
    name = "base"
    groups = None  # the EP groups a dispatching wrapper (`moe.ep.EPBackend`) sends rows over; None: all local
    accumulates_wgrad = False

    def grouped_mlp(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                    w_gate_up: torch.Tensor, w_down: torch.Tensor, wgrad_into=None) -> torch.Tensor:
        raise NotImplementedError

    def routed(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
               w_gate_up: torch.Tensor, w_down: torch.Tensor, wgrad_into=None) -> torch.Tensor:
        x_grouped, tokens_per_expert, order = permute(x.to(w_gate_up.dtype), topk_idx, w_gate_up.shape[0])
        y_grouped = self.grouped_mlp(x_grouped, tokens_per_expert, w_gate_up, w_down, wgrad_into)
        return unpermute(y_grouped, order, topk_weight).to(x.dtype)

    def with_local(self, backend: "ExpertsBackend") -> "ExpertsBackend":
        """This backend with `backend` computing the local experts. A plain backend is simply
        replaced; a dispatching wrapper (`moe.ep.EPBackend`) keeps its dispatch around `backend`."""
        return backend

    @property
    def local(self) -> "ExpertsBackend":
        """The backend that computes the experts this rank holds (itself, unless a wrapper)."""
        return self


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class TorchLoopBackend(ExpertsBackend):
    """Reference: one matmul pair per expert with rows; exact and easy to read. Reads the row counts
    on the host (one sync per layer), so it is the reference, not a training backend."""
    name = "torch"

    def grouped_mlp(self, x, tokens_per_expert, w_gate_up, w_down, wgrad_into=None):
        x = x.to(w_gate_up.dtype)
        outs, start = [], 0
        for e, n in enumerate(tokens_per_expert.tolist()):
            if n:
                outs.append(swiglu(x[start:start + n] @ w_gate_up[e]) @ w_down[e])
            start += n
        if not outs:
            return x.new_zeros(0, w_down.shape[-1]) + 0 * (x.sum() + w_gate_up.sum() + w_down.sum())
        return torch.cat(outs)


class GroupedMMBackend(ExpertsBackend):
    """`torch._grouped_mm` over all experts at once (offsets = cumulative rows per expert)."""
    name = "grouped_mm"

    def grouped_mlp(self, x, tokens_per_expert, w_gate_up, w_down, wgrad_into=None):
        x = x.to(w_gate_up.dtype)
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        h = swiglu(torch._grouped_mm(x, w_gate_up, offs=offs))
        return torch._grouped_mm(h, w_down, offs=offs)
