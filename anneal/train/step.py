"""One optimizer step: forward + backward over the step's micro-batches, then `engine.step`.

`accumulate` is the GPU hot path: nothing in it waits on the GPU (tested under CUDA's sync debug
mode); the step's statistics are read from the device once, after the last backward, when they
decide whether the update is applied (`anneal.train.guards`).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from anneal.model.dots1 import Dots1ForCausalLM
from anneal.parallel.layout import ParallelLayout

NONFINITE_GRAD = "non-finite gradient norm"  # the reason a step is dropped when the engine refused it


def to_device(batch: dict, device: torch.device) -> dict:
    """Host batch -> device without blocking the host (pinned memory, asynchronous copies)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def token_losses(model: Dots1ForCausalLM, batch: dict) -> torch.Tensor:
    """Per-token next-token cross-entropy [B, S] (fp32) for a packed batch of S+1 tokens per row
    already on the model's device."""
    ids = batch["input_ids"]
    return model.token_losses(ids[:, :-1], ids[:, 1:], position_ids=batch["position_ids"][:, :-1])


class StepSums:
    """A step's statistics, kept on the device: per-source loss sums and token counts (float64),
    the sum of the micro-batches' aux losses. Micro-batches are added in order."""

    def __init__(self, n_sources: int, device: torch.device):
        self.loss_sum = torch.zeros(n_sources, device=device, dtype=torch.float64)
        self.count = torch.zeros(n_sources, device=device, dtype=torch.float64)
        self.aux_sum = torch.zeros((), device=device)
        self.has_aux = False

    def add(self, batch: dict, losses: torch.Tensor, aux: torch.Tensor | None) -> None:
        if aux is not None:
            self.has_aux = True
            self.aux_sum += aux.detach()
        src = batch["source_ids"][:, 1:].reshape(-1)
        self.loss_sum.scatter_add_(0, src, losses.detach().reshape(-1).double())
        self.count.scatter_add_(0, src, torch.ones_like(src, dtype=torch.float64))

    def result(self) -> dict:
        return {"loss_sum": self.loss_sum, "count": self.count, "aux_sum": self.aux_sum if self.has_aux else None}


def accumulate(model: Dots1ForCausalLM, engine, batches, n_micro: int, n_sources: int, device: torch.device) -> dict:
    """Forward + backward over the `n_micro` micro-batches that `batches` yields (gradients
    accumulate, no optimizer step), one after the other.
    Nothing here waits on the GPU: per-source loss sums and token counts stay on the device
    (tested under CUDA's sync debug mode); the caller reads them once, after the step."""
    sums = StepSums(n_sources, device)
    for batch in batches:
        batch = to_device(batch, device)
        losses = token_losses(model, batch)
        loss = losses.mean()
        aux = model.aux_loss()
        if aux is not None:
            loss = loss + aux
        engine.backward(loss / n_micro)
        sums.add(batch, losses, aux)
    return sums.result()


def train_step(model: Dots1ForCausalLM, engine, stream, source_names: list[str], layout: ParallelLayout,
               device: torch.device, n_micro: int, micro_batch_size: int, lr: float,
               before_update: Callable[[dict], str | None] = lambda row: None,
               stop_requested: Callable[[], bool] = lambda: False, paired=None) -> dict:
    """Gradient accumulation over `n_micro` global micro-batches, then one optimizer step (the
    engine runs its post-step hooks). `paired`: a `PairedSchedule` (parallel.a2a_overlap) runs
    the micro-batches' forwards and backwards interleaved; None: one after the other. The step's statistics are read from the device once, after
    the last backward and before the update, and summed over ranks; `before_update(row)` may then
    veto the update (returns the reason, which lands in row["skipped"]). `stop_requested()` is this
    rank's wish to stop after the step (preemption); row["stop_requested"] is every rank's.
    row["update_s"]: the host's seconds in `engine.step` -- the whole update where the host runs it
    (parallel.offload=optimizer: gradients down, CPU Adam, weights up), the norm's read and the
    kernels' enqueue on a GPU optimizer (no extra sync is added to time those)."""
    mbs, world = micro_batch_size, layout.world
    n_micro //= world
    n_src = len(source_names)

    # `stream` is this rank's data shards (mixtures.shards): it tokenizes only this rank's rows.
    batches = (stream.next_batch(mbs) for _ in range(n_micro))
    sums = (paired.accumulate(batches, n_micro, n_src, device) if paired is not None
            else accumulate(model, engine, batches, n_micro, n_src, device))
    aux = sums["aux_sum"]
    flags = torch.zeros(n_src, dtype=torch.float64, device=device)
    flags[0] = float(stop_requested())
    stats = torch.stack([sums["loss_sum"], sums["count"],
                         (aux.double() if aux is not None else sums["count"].new_zeros(())).expand(n_src), flags])
    if world > 1:
        stats = layout.all_reduce_(stats.cpu())
        stats[2] /= world
    loss_sum, count, aux_mean, flags = stats.tolist()
    total = sum(count)
    out = {"loss": sum(loss_sum) / total if total else float("nan"),
           **{f"loss/{name}": s / c for name, s, c in zip(source_names, loss_sum, count) if c}}
    if aux is not None:
        out["aux_loss"] = aux_mean[0] / n_micro
    out["stop_requested"] = flags[0] > 0
    reason = before_update(out)
    if reason is None:
        t0 = time.perf_counter()
        out["grad_norm"] = engine.step(lr)
        out["update_s"] = time.perf_counter() - t0
        if not engine.step_applied:
            reason = NONFINITE_GRAD
    else:
        engine.skip_step()
        out["grad_norm"] = float("nan")
    if reason is not None:
        out["skipped"] = reason
    return out
