"""The console commands a user types, run as subprocesses from a folder outside the repo."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from anneal.errors import AnnealError

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
    """`anneal` with no arguments: the shipped tiny stable checkpoint through both stages. Its
    stdout goes to a file, as under nohup/SLURM: a step line per step (log_every=1) and an eval
    line per eval are in it; the printed `wandb sync` line, pasted into a shell, names the run."""
    log = tmp_path / "job.log"
    with log.open("w") as out:
        r = subprocess.run([sys.executable, "-m", "anneal"], cwd=tmp_path, stdout=out, stderr=subprocess.PIPE,
                           text=True, timeout=900, env={**os.environ, "COLUMNS": "80"})
    r.stdout = log.read_text()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1
    steps = re.findall(r"^step (\d+) \| tokens \S+/491.5K \| stage\d \| loss \d+\.\d+ \| lr \S+ \| grad_norm \S+ "
                       r"\| \S+ tok/s \| host mem \S+ GiB \| eta \S+$", r.stdout, re.M)
    assert steps == [str(i) for i in range(1, 121)], r.stdout[-3000:]
    evals = re.findall(r"^eval step (\d+) \| tokens \S+ \| eval_loss \S+ \| wiki \S+ \| gsm8k \S+ \| humaneval \S+$",
                       r.stdout, re.M)
    assert evals == [str(i) for i in range(0, 121, 12)], r.stdout[-3000:]   # step 0 and every eval_every
    assert re.search(r"^train loss \S+ -> \S+ over 120 steps \(mean of the first and of the last 12 logged steps\)$",
                     r.stdout, re.M)
    assert not (run_dirs[0] / "cli.log").exists()
    wandb_dir = next((run_dirs[0] / "wandb").glob("offline-run-*"))
    assert "eval step 96 |" in (wandb_dir / "files" / "output.log").read_text()   # W&B captured the console
    sync = [line for line in r.stdout.splitlines() if line.startswith("upload with: ")]
    assert len(sync) == 1
    pasted = shlex.split(sync[0].removeprefix("upload with: "))
    assert pasted[:2] == ["wandb", "sync"] and Path(pasted[2]) == wandb_dir
    synced = subprocess.run([*pasted, "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Would sync 1 run(s)" in synced.stdout + synced.stderr and wandb_dir.name in synced.stdout + synced.stderr
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


@pytest.mark.slow
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
    r = run([sys.executable, "-c", "from anneal.checkpoint_cli import catalog_main; catalog_main([])"], tmp_path)
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


@pytest.mark.slow
def test_export_command_from_a_training_checkpoint(tmp_path, monkeypatch):
    """anneal-export of a run's checkpoint; the run's saved config holds its mixture's absolute
    path, so the export is scored on the run's held-out set from another folder."""
    import mixtures
    from anneal.compare import compare

    data = Path(mixtures.__file__).parent / "data"
    mix = (Path(mixtures.__file__).parent / "mixtures" / "demo.yaml").read_text().replace("../data", str(data))
    (tmp_path / "my_mix.yaml").write_text(mix)
    anneal("schedule.stages.0.tokens=8192", "schedule.stages.1.tokens=4096", "trainer.stop_after_steps=1",
           "data.mixture=./my_mix.yaml", "logging.wandb=false", "run.name=r", *ENV_QUIET, cwd=tmp_path)
    run_dir, out = tmp_path / "runs" / "r", tmp_path / "exported"
    run([sys.executable, "-c", f"from anneal.checkpoint_cli import export_main; export_main(['{run_dir}', '{out}'])"],
        tmp_path)
    meta = json.loads((out / "anneal_meta.json").read_text())
    assert meta["step"] == 1 and meta["stage"] == "stage1" and meta["started_from"] == "tiny-stable"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert hf.config.num_hidden_layers == 4
    assert (out / "tokenizer.json").exists()

    assert f"mixture: {tmp_path / 'my_mix.yaml'}" in (run_dir / "config.yaml").read_text()
    monkeypatch.chdir(tmp_path / "runs")   # ./my_mix.yaml is not here
    rows = compare([run_dir], [out])
    assert set(rows[1].per_source) == {"wiki", "gsm8k", "humaneval"}


def test_a_short_step_folder_name_gets_the_real_one(tmp_path):
    from anneal.checkpoints.export import find_step_folder

    (tmp_path / "ckpt" / "step_00000008").mkdir(parents=True)
    with pytest.raises(AnnealError, match="8 digits: .*step_00000008"):
        find_step_folder(tmp_path / "ckpt" / "step_8")


def test_plan_command_prints_shares_and_epochs(tmp_path):
    r = run([sys.executable, "-c", "from anneal.cli import plan_main; plan_main(['recipe=demo'])"], tmp_path)
    assert "stage1=393.2K, stage2=98.3K" in r.stdout
    lines = {tuple(line.split()[:2]): line.split() for line in r.stdout.splitlines() if line.startswith("stage")}
    assert lines[("stage1", "wiki")][4] == "80.0%" and lines[("stage2", "gsm8k")][4] == "50.0%"


@pytest.mark.slow
def test_hydra_flags_as_hydra_users_know_them(tmp_path):
    """Hydra's own flags work (tab completion, --cfg job --resolve, flags after recipe=FILE), a
    recipe file needs no `# @package _global_` header, no temporary folder is left behind, a typo
    gets one line with the nearest key, and --help is anneal's."""
    import os

    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    (tmp_path / "mine.yaml").write_text(GOOD_RECIPE.replace("# @package _global_\n", ""))

    def call(*args):
        return subprocess.run([sys.executable, "-m", "anneal", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env=env)

    r = call("-sc", "install=bash")
    assert r.returncode == 0 and "hydra_bash_completion" in r.stdout, r.stderr
    r = call("--cfg", "job", "--resolve")
    assert r.returncode == 0 and "seq_len: 256" in r.stdout, r.stderr
    r = call("recipe=./mine.yaml", "--cfg", "job")
    assert r.returncode == 0 and "seq_len: 64" in r.stdout and "batch_tokens: 512" in r.stdout, r.stderr
    r = call("--help")
    assert r.returncode == 0 and "powered by Hydra" not in r.stdout and "anneal recipe=" in r.stdout
    r = call("trainer.log_evry=2")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: command line: unknown config key trainer.log_evry; did you mean trainer.log_every?")
    assert list((tmp_path / "tmp").iterdir()) == []
