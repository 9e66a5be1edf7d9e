"""The one place that makes a model ready for its parallel layout, in a fixed order (torchtitan's
`parallelize_*` order):

1. expert parallelism: every MoE layer keeps this rank's experts, dispatches its rows over the EP
   group and marks its expert weights (`moe.ep.shard_experts`); with `parallel.a2a_overlap` the
   paired schedule's second group over the EP ranks is made here too, at the same point on every
   rank (`moe.ep.counts_group`, collective);
2. activation checkpointing: `model.recompute` (none | selective | full, `anneal.model.recompute`);
3. compile: regional `torch.compile` of each decoder layer and the head (`model.compile`);
4. the engine's wrap, which stays the engine's (`engine_cls.from_config`: the compute dtype,
   DeepSpeed's MoE registration and ZeRO, `anneal.parallel.ds_engine`).

The order matters: sharding changes the expert parameters that the later steps trace and the engine
partitions; compiling traces the checkpointed layers lazily, on the first forward, so the compute
dtype the engine gives the weights is the one traced.
"""
from __future__ import annotations

import torch

from anneal.config import compile_enabled
from anneal.parallel.layout import ParallelLayout
from moe import ep
from moe.layer import moe_layers


def apply_expert_parallel(model: torch.nn.Module, layout: ParallelLayout, paired: bool = False) -> None:
    """Step 1: shard the experts over `layout.groups` (no groups: one process, nothing to do); a
    model already sharded is left as it is."""
    groups = layout.groups
    if groups is None or not moe_layers(model):
        return
    if not ep.is_sharded(model):
        ep.shard_experts(model, groups)
    if paired and groups.ep_size > 1:
        ep.counts_group(groups)


def parallelize(model: torch.nn.Module, layout: ParallelLayout, cfg, device: torch.device) -> None:
    """Steps 1-3 above on `model` (a `Dots1ForCausalLM`), from the run's config, before the engine
    wraps it."""
    apply_expert_parallel(model, layout, paired=cfg.parallel.a2a_overlap)
    model.recompute = cfg.model.recompute
    if compile_enabled(cfg.model.compile, device):
        model.compile_layers()
