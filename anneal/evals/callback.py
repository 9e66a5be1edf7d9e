"""The in-loop benchmark evals (`eval.tasks`): scored with the held-out losses (the `Eval`
callback calls `scores()` at step 0, every `trainer.eval_every` tokens and at each stage end, so
they land in the same metrics row), and after the export, optionally, the harness
(`eval.after_export`).

The tasks are read, checked and checked against the training mixture when the run starts, before
the first step: bad input stops the run there with one line naming the task and the field. So are
`eval.after_export`'s tasks, and a code-executing one without `eval.allow_code_execution`.
Each rank tokenizes only its own share of the items, once.
"""
from __future__ import annotations

import torch

from anneal.errors import AnnealError
from anneal.evals.overlap import check_no_overlap
from anneal.evals.scoring import build_requests, rank_items, score_tasks
from anneal.evals.tasks import Task, load_task
from anneal.model.precision import PrecisionPolicy
from anneal.train.callbacks import Callback, Run


def load_tasks(task_cfgs) -> list[Task]:
    """The tasks of `eval.tasks` (each {task, limit, shots}); names must be unique."""
    tasks = [load_task(t.task, limit=t.limit, shots=t.shots) for t in task_cfgs]
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise AnnealError(f"eval.tasks: task {dup} is listed twice")
    return tasks


def after_export_tasks(cfg) -> list[Task]:
    """`eval.after_export`'s tasks (`cfg` is the eval section): eval.harness_tasks, or by default the
    tasks of eval.tasks with their own `limit` and `shots`, so the export is scored on the items the
    loop scored; `eval.harness_limit`, when set, caps the items of either."""
    if cfg.harness_tasks:
        return [load_task(name, limit=cfg.harness_limit) for name in cfg.harness_tasks]
    return [load_task(t.task, limit=cfg.harness_limit if cfg.harness_limit is not None else t.limit, shots=t.shots)
            for t in cfg.tasks]


def check_after_export(cfg) -> list[Task]:
    """`eval.after_export`'s tasks read and checked at start-up, so that a bad one, or one that runs
    model-written code without `eval.allow_code_execution`, stops the run before training rather
    than after it. Returns them, for the harness at the end."""
    from anneal.evals.harness import check_harness_task

    tasks = after_export_tasks(cfg)
    if not tasks:
        raise AnnealError("eval.after_export=true but no task to run: set eval.tasks or eval.harness_tasks")
    for task in tasks:
        check_harness_task(task, cfg.allow_code_execution,
                           opt_in="set eval.allow_code_execution=true (or leave it out of eval.harness_tasks)")
    return tasks


def harness_device_and_dtype(precision: PrecisionPolicy, device: torch.device) -> tuple[str, str]:
    """Where and in what dtype `eval.after_export` runs the harness: on the run's device in the run's
    compute dtype (bf16 on CUDA with trainer.bf16, else fp32: anneal.model.precision decides)."""
    return str(device), str(precision.compute_dtype).removeprefix("torch.")


class BenchmarkEval(Callback):
    def __init__(self, run: Run):
        super().__init__(run)
        cfg = run.cfg.eval
        self.batch_tokens = cfg.batch_tokens
        self.tasks = load_tasks(cfg.tasks)
        self.export_tasks: list[Task] = []   # eval.after_export's, read and checked now
        if cfg.after_export:
            if not run.cfg.export.enabled:
                raise AnnealError("eval.after_export=true but export.enabled=false: there is no export to "
                                  "evaluate; set export.enabled=true or eval.after_export=false")
            self.export_tasks = check_after_export(cfg)
        unchecked = check_no_overlap(self.tasks, run.p.spec) if self.tasks else []
        if unchecked:
            run.tracker.print(f"eval.tasks: streaming source(s) {', '.join(unchecked)} not checked for "
                              "benchmark items (only local sources can be read in full)")
        layout = run.layout
        self.requests = build_requests(self.tasks, run.p.tokenizer, rank_items(self.tasks, layout.rank, layout.world))

    def scores(self) -> dict:
        """Every task's metrics at the current weights (forward only, eval mode)."""
        if not self.tasks:
            return {}
        run = self.run
        model = run.p.model
        model.eval()
        try:
            out = score_tasks(model, self.tasks, run.p.tokenizer, run.device, run.layout,
                              batch_tokens=self.batch_tokens, requests=self.requests)
        finally:
            model.train()
        run.tracker.print("benchmarks: " + "  ".join(_summary(t, out) for t in self.tasks), markup=False)
        return out

    def on_train_end(self, tokens: int) -> None:
        run, cfg = self.run, self.run.cfg.eval
        if not cfg.after_export or run.export_dir is None:
            return
        from anneal.evals.harness import evaluate_export

        device, dtype = harness_device_and_dtype(run.precision, run.device)

        def harness() -> None:
            evaluate_export(run.export_dir, self.export_tasks, run_dir=run.run_dir, backend=cfg.backend,
                            allow_code_execution=cfg.allow_code_execution, device=device, dtype=dtype,
                            tracker=run.tracker)

        run.layout.rank0_first(harness, lambda: None)


def _summary(task: Task, out: dict) -> str:
    key = f"bench/{task.name}/"
    if task.kind == "multiple_choice":
        return f"{task.name} acc {out[key + 'acc']:.3f} acc_norm {out[key + 'acc_norm']:.3f}"
    return f"{task.name} logprob/byte {out[key + 'logprob_per_byte']:.4f}"
