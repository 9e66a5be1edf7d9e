"""`anneal-eval`: benchmark an HF export (or a run's export) with lm-evaluation-harness.

Our task files are turned into harness task YAMLs in a temporary folder, with the items written
out as JSONL beside them: each item carries its prompt (`_text`), its choices and gold answer
(`_choices`, `_target`) rendered by `anneal.evals.tasks`, so the harness scores exactly the items
and prompts the loop scores. Multiple choice: the harness's `acc`, `acc_norm`, `acc_bytes`.
Generative tasks run greedy decoding with the task file's `harness:` keys (GSM8K: the harness's
own answer extraction and exact match); HumanEval's pass@1 executes model-written code, so only
with `allow_code_execution` (`anneal.evals.sandbox`). Results are appended to `evals.jsonl` in
the run folder (an export or soup of no run: in its own folder), printed, and logged to W&B: into
the training run's (`eval.after_export`), or, from `anneal-eval`, as a job of its own in the run's
W&B project when the run logs to W&B (offline by default), at the export's step and tokens.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from anneal.errors import AnnealError
from anneal.evals.tasks import Task, load_task

_SAMPLE_FIELDS = ("_text", "_target", "_choices")
_PASS_AT_1 = '''from anneal.evals.sandbox import passes


def process_results(doc, results):
    code = doc["prompt"] + results[0]
    return {"pass@1": float(passes(code, doc["test"], doc["entry_point"]))}
'''


def harness_name(task: Task) -> str:
    return f"anneal_{task.name}"


def executes_code(task: Task) -> bool:
    """Whether the harness runs model-written code for `task` (HumanEval's pass@1, or a task file's
    own `process_results`)."""
    return task.kind == "generative" and (task.name == "humaneval" or "process_results" in task.harness)


def check_harness_task(task: Task, allow_code_execution: bool, opt_in: str = "pass --allow-code-execution") -> None:
    """What stops `task` in the harness, raised before any work: a generative task without its
    generation keys, or code to run without the opt-in (`opt_in` says how: the flag, the config key)."""
    if task.kind == "generative" and not task.harness:
        raise AnnealError(f"eval task {task.name} ({task.path}): harness: missing; a generative task needs "
                          "its generation keys (output_type, generation_kwargs, metric_list) for anneal-eval")
    if executes_code(task) and not allow_code_execution:
        raise AnnealError(f"eval task {task.name}: pass@1 runs the model's code; {opt_in} to run it "
                          "(in a sandboxed subprocess)")


def write_harness_task(task: Task, folder: Path, allow_code_execution: bool = False) -> str:
    """The harness YAML (and its JSONL items) of `task` in `folder`; returns its task name."""
    check_harness_task(task, allow_code_execution)
    folder.mkdir(parents=True, exist_ok=True)

    def dump(items: list[dict], path: Path) -> None:
        with path.open("w") as f:
            for it in items:
                row = {**it, "_text": task.template.format_map(it),
                       "_target": task.gold_index(it) if task.kind == "multiple_choice" else task.gold_text(it)}
                if task.kind == "multiple_choice":
                    row["_choices"] = task.choices_of(it)
                f.write(json.dumps(row, default=str) + "\n")

    dump(task.items, folder / "test.jsonl")
    files = {"test": str(folder / "test.jsonl")}
    if task.shots:
        dump(task.shots, folder / "fewshot.jsonl")
        files["fewshot"] = str(folder / "fewshot.jsonl")
    cfg = {"task": harness_name(task), "dataset_path": "json", "dataset_kwargs": {"data_files": files},
           "test_split": "test", "doc_to_text": "_text", "doc_to_target": "_target",
           "target_delimiter": task.target_delimiter, "fewshot_delimiter": task.fewshot_delimiter,
           "num_fewshot": task.shots_n, "description": task.description}
    if task.shots:
        cfg.update(fewshot_split="fewshot", fewshot_config={"sampler": "first_n"})
    if task.kind == "multiple_choice":
        cfg.update(output_type="multiple_choice", doc_to_choice="_choices",
                   metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm", "acc_bytes")])
    else:
        cfg.update(task.harness)
        if executes_code(task):
            (folder / "anneal_code_eval.py").write_text(_PASS_AT_1)
            cfg["process_results"] = "!function anneal_code_eval.process_results"
            cfg["metric_list"] = [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}]
    text = yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False)
    text = text.replace("'!function anneal_code_eval.process_results'", "!function anneal_code_eval.process_results")
    (folder / f"{harness_name(task)}.yaml").write_text(text)
    return harness_name(task)


def resolve_export(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(HF folder, run folder or None) of an export folder or a run folder holding `hf/`."""
    p = Path(path)
    if (p / "config.json").is_file():
        run = p.parent if (p.parent / "config.yaml").is_file() else None
        return p, run
    if (p / "hf" / "config.json").is_file():
        return p / "hf", p
    raise AnnealError(f"{p}: neither an HF export (no config.json) nor a run folder with an export (no hf/config.json)")


def evaluate_export(export: str | os.PathLike, tasks: list, run_dir: str | os.PathLike | None = None,
                    backend: str = "hf", limit: int | None = None, shots: int | None = None,
                    allow_code_execution: bool = False, device: str = "cpu", batch_size: int | str = 8,
                    dtype: str = "float32", tracker=None, log_samples: bool = False) -> dict:
    """Run lm-evaluation-harness on `export` for `tasks` (bundled names or task YAMLs, read with
    `limit` / `shots`; or tasks already read, as `eval.after_export` passes them); append a
    row per task to `evals.jsonl` in the run folder (the export's run, or `run_dir`), else in the
    export's own folder (a soup's scores stay with the soup). The scores go to `tracker` (the training
    run's console and W&B), or with none to the console and, when the run folder's config logs to
    W&B, to a W&B run of their own. Returns {task: metrics} (and `samples` with `log_samples`)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise AnnealError("anneal-eval needs lm-evaluation-harness: pip install -e \".[eval]\"") from e
    from anneal.checkpoints.run_checkpoints import export_meta

    hf_dir, found_run = resolve_export(export)
    run_dir = Path(run_dir) if run_dir is not None else found_run
    loaded = [t if isinstance(t, Task) else load_task(t, limit=limit, shots=shots) for t in tasks]
    if backend == "vllm":
        model_args = {"pretrained": str(hf_dir), "dtype": dtype, "tokenizer": str(hf_dir)}
    elif backend == "hf":
        model_args = {"pretrained": str(hf_dir), "dtype": dtype, "device": device}
    else:
        raise AnnealError(f"--backend {backend}: use hf or vllm")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="anneal-eval-") as tmp:
        names = [write_harness_task(t, Path(tmp) / t.name, allow_code_execution) for t in loaded]
        if allow_code_execution:
            os.environ["HF_ALLOW_CODE_EVAL"] = "1"
        results = lm_eval.simple_evaluate(model=backend, model_args=model_args, tasks=names,
                                          task_manager=TaskManager(include_path=tmp, include_defaults=False),
                                          batch_size=batch_size, log_samples=log_samples)
    seconds = time.time() - t0
    out = {}
    for t, name in zip(loaded, names):
        metrics = {(f"{k}/{f}" if (f := key.split(",", 1)[1]) != "none" else k): v
                   for key, v in results["results"][name].items() if "," in key
                   and not (k := key.split(",")[0]).endswith("_stderr")}
        out[t.name] = metrics
    # where the export stands in its run (anneal_meta.json; a soup keeps what its ingredients share)
    at = {k: v for k, v in export_meta(hf_dir).items() if k in ("step", "tokens")}
    row_base = {"export": str(hf_dir), "backend": backend, "device": model_args.get("device"), "dtype": dtype,
                **at, "time": time.time(), "seconds": seconds}
    with ((run_dir if run_dir is not None else hf_dir) / "evals.jsonl").open("a") as f:
        for t in loaded:
            f.write(json.dumps({**row_base, "task": t.name, "items": len(t.items), "metrics": out[t.name]}) + "\n")
    _report(out, hf_dir, seconds, tracker, run_dir, at)
    if log_samples:
        out["samples"] = {t.name: results["samples"][n] for t, n in zip(loaded, names)}
    return out


def _report(out: dict, hf_dir: Path, seconds: float, tracker, run_dir: Path | None, at: dict) -> None:
    """The scores on the console and in W&B, at the export's step and tokens (W&B's x-axis)."""
    lines = [f"anneal-eval {hf_dir} ({seconds:.0f} s):"]
    lines += [f"  {task}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
              for task, metrics in out.items()]
    text = "\n".join(lines)
    scores = {f"harness/{t}/{k}": v for t, m in out.items() for k, v in m.items() if isinstance(v, (int, float))}
    if "tokens" in at:
        from anneal.train.tracking import WANDB_STEP_METRIC

        scores[WANDB_STEP_METRIC] = at["tokens"]
    if tracker is not None:
        tracker.print(text, markup=False, highlight=False)
        if getattr(tracker, "wandb_run", None) is not None:
            tracker.wandb_run.log(scores, step=at.get("step"))
        return
    print(text)
    job = _wandb_job(run_dir, hf_dir, list(out)) if run_dir is not None else None
    if job is not None:
        folder, offline = Path(job.dir).parent, job.offline
        job.log(scores, step=at.get("step"))
        job.finish()
        print(f"W&B run: {folder}" + (f" (offline; upload with: wandb sync {folder})" if offline else ""))


def _wandb_job(run_dir: Path, hf_dir: Path, tasks: list[str]):
    """A W&B run of its own (job type anneal-eval) in the project of the run whose folder is
    `run_dir`, beside its training run (under `<run>/wandb`); None when the run does not log to W&B."""
    from omegaconf import OmegaConf

    from anneal.train.run_dir import RUN_MARKER
    from anneal.train.tracking import WANDB_STEP_METRIC

    if not (run_dir / RUN_MARKER).is_file():
        return None
    logging = OmegaConf.load(run_dir / RUN_MARKER).logging
    if not logging.wandb or logging.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    job = wandb.init(project=logging.project, entity=logging.entity, mode=logging.mode, dir=str(run_dir),
                     job_type="anneal-eval", name=f"{run_dir.name}/anneal-eval", group=logging.group,
                     config={"run_dir": str(run_dir), "export": str(hf_dir), "tasks": tasks})
    job.define_metric(WANDB_STEP_METRIC)
    job.define_metric("*", step_metric=WANDB_STEP_METRIC)
    return job
