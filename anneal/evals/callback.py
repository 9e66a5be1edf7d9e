"""The in-loop benchmark evals (`eval.tasks`): scored with the held-out losses (the `Eval`
callback calls `scores()` at step 0, every `trainer.eval_every` tokens and at each stage end, so
they land in the same metrics row), and after the export, optionally, the harness
(`eval.after_export`).

The tasks are read, checked and checked against the training mixture when the run starts, before
the first step: bad input stops the run there with one line naming the task and the field.
Each rank tokenizes only its own share of the items, once.
"""
from __future__ import annotations

from anneal.evals.overlap import check_no_overlap
from anneal.evals.scoring import build_requests, rank_items, score_tasks
from anneal.evals.tasks import Task, load_task
from anneal.train.callbacks import Callback, Run


def load_tasks(task_cfgs) -> list[Task]:
    """The tasks of `eval.tasks` (each {task, limit, shots}); names must be unique."""
    tasks = [load_task(t.task, limit=t.limit, shots=t.shots) for t in task_cfgs]
    names = [t.name for t in tasks]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        from anneal.errors import AnnealError

        raise AnnealError(f"eval.tasks: task {dup} is listed twice")
    return tasks


class BenchmarkEval(Callback):
    def __init__(self, run: Run):
        super().__init__(run)
        cfg = run.cfg.eval
        self.batch_tokens = cfg.batch_tokens
        self.tasks = load_tasks(cfg.tasks)
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
        run = self.run
        if not run.cfg.eval.after_export or run.export_dir is None:
            return
        from anneal.evals.harness import evaluate_export

        def harness() -> None:
            evaluate_export(run.export_dir, run_dir=run.run_dir, tasks=list(run.cfg.eval.harness_tasks or
                                                                             [t.task for t in run.cfg.eval.tasks]),
                            backend=run.cfg.eval.backend, limit=run.cfg.eval.harness_limit, tracker=run.tracker)

        run.layout.rank0_first(harness, lambda: None)


def _summary(task: Task, out: dict) -> str:
    key = f"bench/{task.name}/"
    if task.kind == "multiple_choice":
        return f"{task.name} acc {out[key + 'acc']:.3f} acc_norm {out[key + 'acc_norm']:.3f}"
    return f"{task.name} logprob/byte {out[key + 'logprob_per_byte']:.4f}"
