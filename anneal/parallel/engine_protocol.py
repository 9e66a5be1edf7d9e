"""The engine seam: what the training loop asks of an optimizer engine.

An engine owns the optimizer step and everything that differs between one process and DeepSpeed,
so the loop has no branch on `trainer.engine`:

    launch(cfg, device) -> (device, layout)      join the processes (classmethod)
    from_config(model, cfg, policy, layout)      build it around the (parallelized) model (classmethod)
    describe()                                   one line for the run's log
    backward(loss), step(lr) -> grad_norm        one micro-batch's backward; one optimizer step, not
                                                 applied when the gradients are not finite
    backward_piece(tensors, grads, last)         one piece of a micro-batch's backward that the paired
                                                 schedule (anneal.train.paired_schedule) runs in pieces
    skip_step()                                  drop the step's gradients, no update (anneal.train.guards)
    step_applied                                 whether the last step/skip_step changed the weights
    add_post_step_hook(fn)                       fn(engine, applied) after every step or skip
    reduce_expert_load(routers)                  routers' expert_load -> the global load
    checkpoint_pieces() / optimizer_step()       what a checkpoint holds (`anneal.checkpoints.run_checkpoints`
    checkpoint_layout() / restore_state(...)     takes them, as its `EngineState`)
    export_model()                               the whole model in full precision, on rank 0

It lives in `anneal.parallel` (below `anneal.train`) so that an engine built here
(`anneal.parallel.ds_engine.DeepSpeedEngine`) needs nothing from the trainer; the native engine is
`anneal.train.engine.Engine`, and `anneal.train.build.engine_class(name)` picks one from the config.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch


class TrainingEngine(Protocol):
    """The interface above, for type checkers and readers; engines do not inherit it."""
    step_applied: bool

    def describe(self) -> str: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def backward_piece(self, tensors: list, grads: list, last: bool) -> None: ...
    def step(self, lr: float) -> float: ...
    def skip_step(self) -> None: ...
    def add_post_step_hook(self, fn: Callable[[object, bool], None]) -> None: ...
    def reduce_expert_load(self, routers) -> None: ...
    def checkpoint_pieces(self) -> list: ...
    def optimizer_step(self) -> int: ...
    def checkpoint_layout(self) -> dict: ...
    def restore_state(self, step_dir, optimizer_step: int) -> None: ...
    def export_model(self) -> torch.nn.Module | None: ...


class PostStepHooks:
    """Functions the engine runs after each optimizer step or skipped step, as fn(engine, applied)
    (the router-bias update, `anneal.train.balance`). Engines set `self.post_step_hooks = []`."""
    post_step_hooks: list
    step_applied: bool = False

    def add_post_step_hook(self, fn: Callable[[object, bool], None]) -> None:
        self.post_step_hooks.append(fn)

    def _run_post_step_hooks(self, applied: bool) -> None:
        for fn in self.post_step_hooks:
            fn(self, applied)
