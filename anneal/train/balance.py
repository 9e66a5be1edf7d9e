"""Aux-loss-free load balancing as an optimizer post-step hook (DeepSeek-V3's bias update).

After each optimizer step the engine runs `RouterBalance(engine, applied)`: the routers' expert-load
counters become the global load (`engine.reduce_expert_load`: summed over ranks under DeepSpeed),
then each router moves its correction bias against its load (`Router.update_bias`). The per-layer
load statistics of the step are left in `stats` for the metrics row (one device read).
"""
from __future__ import annotations

import torch


class RouterBalance:
    def __init__(self, routers: dict, rate: float):
        self.routers, self.rate = routers, rate
        self.stats: dict = {}
        self._interval_load = None  # [layers, experts] global load of the applied steps since the last take

    def take_interval_load(self):
        """The global expert load (layers x experts, on the device) summed over the applied steps
        since the last call, and a fresh sum; None before any step."""
        load, self._interval_load = self._interval_load, None
        return load

    def __call__(self, engine, applied: bool = True) -> None:
        routers = self.routers
        if not routers or not applied:  # a skipped step moves no bias; its load is forgotten
            for router in routers.values():
                router.expert_load.zero_()
            self.stats = {}
            return
        engine.reduce_expert_load(routers)
        loads = torch.stack([router.expert_load for router in routers.values()])
        self._interval_load = loads if self._interval_load is None else self._interval_load + loads
        ratios, spreads = [], []
        for router in routers.values():
            load = router.expert_load
            ratios.append(load.max() / load.mean().clamp_min(1e-9))
            router.update_bias(self.rate, load)
            bias = router.e_score_correction_bias
            spreads.append(bias.max() - bias.min())
        ratios, spreads = torch.stack(ratios).tolist(), torch.stack(spreads).tolist()
        stats = {}
        for layer, ratio, spread in zip(routers, ratios, spreads):
            stats[f"moe/load_max_over_mean/layer{layer}"] = ratio
            stats[f"moe/bias_spread/layer{layer}"] = spread
        stats["moe/load_max_over_mean"] = max(ratios)
        self.stats = stats
