"""The console commands a user types, run as subprocesses from a folder outside the repo."""
import json
import subprocess
import sys

import pytest
import torch
import transformers

ENV_QUIET = ["logging.progress=false"]


def run(args, cwd, timeout=600, check=True):
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def anneal(*args, cwd, **kw):
    return run([sys.executable, "-m", "anneal", *args], cwd, **kw)


@pytest.mark.slow
def test_embedded_default_anneals_and_exports(tmp_path):
    """`anneal` with no arguments: the shipped tiny stable checkpoint through both stages."""
    r = anneal(cwd=tmp_path, timeout=900)
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1
    rows = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    evals = [row["eval_loss"] for row in rows if "eval_loss" in row]
    assert evals[-1] < evals[0] - 0.05, evals          # the loss visibly falls
    assert {row["stage"] for row in rows if "stage" in row} == {"stage1", "stage2"}
    assert "HF export" in r.stdout and "W&B run" in r.stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dirs[0] / "hf", dtype=torch.float32)
    assert hf.config.model_type == "dots1"
    assert (run_dirs[0] / "losses.png").stat().st_size > 0


GOOD_RECIPE = """# @package _global_
schedule:
  batch_tokens: 512
  stages:
    - {name: stage1, tokens: 1024, lr_end: 3.0e-5}
    - {name: stage2, tokens: 1024, lr_end: 1.0e-5}
data: {seq_len: 64}
trainer: {micro_batch_size: 4}
"""


def test_recipe_by_path_and_multirun(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(GOOD_RECIPE + "schedule_batch: null\n")
    bad = anneal(f"recipe={recipe}", *ENV_QUIET, cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "schedule_batch" in bad.stdout + bad.stderr   # typo in a recipe names the key
    recipe.write_text(GOOD_RECIPE)
    r = anneal("--multirun", f"recipe={recipe}", "seed=1,2", "export.enabled=false", "logging.plots=false",
               "run.name=sweep", *ENV_QUIET, cwd=tmp_path)
    assert r.stdout.count("(offline, group sweep)") == 2      # both branches in one W&B group
    losses = []
    for job in ("0", "1"):
        assert (tmp_path / "runs" / "sweep" / job / "expert_load.png").stat().st_size > 0  # heatmap at the evals
        assert list((tmp_path / "runs" / "sweep" / job / "wandb").glob("offline-run-*/files/media/images/moe/"
                                                                         "expert_load_*.png"))
        cfg = (tmp_path / "runs" / "sweep" / job / "config.yaml").read_text()
        assert "tokens: '1024'" in cfg or "tokens: 1024" in cfg
        rows = [json.loads(x) for x in (tmp_path / "runs" / "sweep" / job / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if "loss" in r])
    assert len(losses[0]) == len(losses[1]) == 4 and losses[0] != losses[1]   # seeds differ -> batches differ


def test_bad_input_is_one_clear_line(tmp_path):
    r = anneal("checkpoint=dots1.base-77T", *ENV_QUIET, cwd=tmp_path, check=False)
    assert r.returncode == 2
    assert "dots1.base-77T" in r.stderr and "Traceback" not in r.stderr + r.stdout
    r = anneal("schedule.stages.1.lr_end=1e-3", *ENV_QUIET, "logging.wandb=false", cwd=tmp_path, check=False)
    assert r.returncode == 2 and "stage2" in r.stderr and "Traceback" not in r.stderr


def test_unknown_experts_backend_is_one_clear_line(tmp_path):
    r = anneal("model.experts_backend=nope", *ENV_QUIET, cwd=tmp_path, check=False)
    assert r.returncode == 2
    assert "unknown backend 'nope'" in r.stderr and "Traceback" not in r.stderr + r.stdout


def test_catalog_listing_and_schedule_plot(tmp_path):
    r = run([sys.executable, "-c", "from anneal.cli import catalog_main; catalog_main([])"], tmp_path)
    for name in ("dots1.base", "dots1.inst", "tiny-stable"):
        assert name in r.stdout
    r = run([sys.executable, "-c", "from anneal.cli import plot_schedule_main as m; "
             "m(['--out', 's.png', 'recipe=dots1_anneal'])"], tmp_path)
    assert (tmp_path / "s.png").stat().st_size > 10_000
    assert "stage1: 0 -> 1T tokens, lr 0.0003 -> 3e-05 (linear)" in r.stdout
    assert "stage2: 1T -> 1.2T tokens, lr 3e-05 -> 1e-05 (linear)" in r.stdout


def test_schedule_plot_without_a_known_start_lr_is_the_trainers_error(tmp_path):
    """dots1.base records no LR: the plot gives the trainer's error, not a guessed start LR."""
    r = run([sys.executable, "-c", "from anneal.cli import plot_schedule_main as m; m(['checkpoint=dots1.base'])"],
            tmp_path, check=False)
    assert r.returncode == 2 and not (tmp_path / "schedule.png").exists()
    assert "schedule.start_lr is null and checkpoint 'dots1.base' records no LR" in r.stderr
    assert "Traceback" not in r.stderr


def test_export_command_from_a_training_checkpoint(tmp_path):
    anneal("schedule.stages.0.tokens=8192", "schedule.stages.1.tokens=4096", "trainer.stop_after_steps=1",
           "logging.wandb=false", "run.name=r", *ENV_QUIET, cwd=tmp_path)
    out = tmp_path / "exported"
    run([sys.executable, "-c", f"from anneal.cli import export_main; export_main(['{tmp_path}/runs/r', '{out}'])"],
        tmp_path)
    meta = json.loads((out / "anneal_meta.json").read_text())
    assert meta["step"] == 1 and meta["stage"] == "stage1"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.num_hidden_layers == 4
    assert (out / "tokenizer.json").exists()


def test_plan_command_prints_shares_and_epochs(tmp_path):
    r = run([sys.executable, "-c", "from anneal.cli import plan_main; plan_main(['recipe=demo'])"], tmp_path)
    assert "stage1=393.2K, stage2=98.3K" in r.stdout
    lines = {tuple(line.split()[:2]): line.split() for line in r.stdout.splitlines() if line.startswith("stage")}
    assert lines[("stage1", "wiki")][4] == "80.0%" and lines[("stage2", "gsm8k")][4] == "50.0%"
