"""Where this process sits: one `ParallelLayout`, built once per run and passed explicitly.

World size, rank, data-parallel (DP) and expert-parallel (EP) sizes, this rank's EP rank, the
routed experts it holds, and the EP/EDP process groups. The EP layout is DeepSpeed's: EP groups
are consecutive ranks, so EP rank = rank % ep_size (see `moe.ep`). One process (the native
engine, or no process group) is the default layout: world 1, EP 1, no groups.

The collective helpers here (`broadcast`, `all_gather`, `all_reduce_`, `rank0_first`) are no-ops
for one process, so the training loop calls them unconditionally.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from anneal.errors import AnnealError
from moe import ep


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@dataclass(frozen=True)
class ParallelLayout:
    world: int = 1
    rank: int = 0
    ep_size: int = 1
    groups: ep.EPGroups | None = None   # the EP/EDP process groups (None: one process, or EP 1 without them)

    @classmethod
    def current(cls, ep_size: int = 1, groups: ep.EPGroups | None = None) -> ParallelLayout:
        """The layout of the process group this process joined (world 1 without one)."""
        d = _dist()
        world, rank = (d.get_world_size(), d.get_rank()) if d else (1, 0)
        if ep_size < 1 or world % ep_size:
            raise AnnealError(f"parallel.ep_size={ep_size} must be >= 1 and divide the number of ranks ({world})")
        return cls(world=world, rank=rank, ep_size=ep_size, groups=groups)

    @property
    def dp_size(self) -> int:
        """Data-parallel degree of the expert weights (each expert is held by dp_size ranks)."""
        return self.world // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def expert_range(self, n_experts: int) -> tuple[int, int] | None:
        """The routed experts [start, stop) this rank holds under EP (it reads only those from the
        safetensors files); None when it holds all of them (EP 1)."""
        if self.ep_size <= 1:
            return None
        if n_experts % self.ep_size:
            raise AnnealError(f"parallel.ep_size={self.ep_size} must divide the expert count ({n_experts}) "
                              f"and the number of ranks ({self.world})")
        return ep.expert_range(n_experts, self.ep_size, self.ep_rank)

    # -- collectives (no-ops for one process) -----------------------------------------------------
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        d = _dist()
        if d is None:
            return obj
        box = [obj]
        d.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order."""
        d = _dist()
        if d is None:
            return [obj]
        out = [None] * d.get_world_size()
        d.all_gather_object(out, obj)
        return out

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over all ranks, in place."""
        d = _dist()
        if d is not None:
            d.all_reduce(t)
        return t

    def rank0_first(self, fn: Callable[[], Any], others: Callable[[], Any] | None = None) -> Any:
        """Run fn() on rank 0, then `others` (default fn) on the other ranks, so rank 0 creates
        shared files first. An AnnealError on rank 0 is raised on every rank (one message, all
        ranks exit non-zero)."""
        d = _dist()
        if d is None:
            return fn()
        msg, out = [None], None
        if self.rank == 0:
            try:
                out = fn()
            except AnnealError as e:
                msg[0] = str(e)
        d.broadcast_object_list(msg, src=0)
        if msg[0] is not None:
            raise AnnealError(msg[0])
        return (others or fn)() if self.rank != 0 else out
