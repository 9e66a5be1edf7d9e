"""The trainer end to end on CPU: pretrain -> export -> anneal from the export, exact resume,
run-folder protection, bad-input errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from anneal.cli import compose
from anneal.errors import AnnealError
from anneal.train.loop import train

TINY_ARCH = [  # smaller than model=tiny so the tests stay fast on 2 cores
    "model.arch.vocab_size=1024", "model.arch.hidden_size=64", "model.arch.intermediate_size=128",
    "model.arch.moe_intermediate_size=32", "model.arch.num_hidden_layers=3", "model.arch.num_attention_heads=2",
    "model.arch.num_key_value_heads=2", "model.arch.n_routed_experts=8", "model.arch.num_experts_per_tok=2",
]
QUIET = ["logging.progress=false", "logging.plots=false", "trainer.threads=1"]
SMALL_DATA = ["data.seq_len=64", "data.eval_seqs=2", "trainer.micro_batch_size=4", "schedule.batch_tokens=512"]


def cfg_for(run_dir: Path, *overrides: str):
    return compose([f"run.dir={run_dir}", "run.name=test", *QUIET, *SMALL_DATA, *overrides])


@pytest.fixture(scope="session")
def stable_ckpt(tmp_path_factory) -> Path:
    """A tiny stable-phase checkpoint made the way recipes/tiny_pretrain.yaml makes the shipped one."""
    run = tmp_path_factory.mktemp("pretrain")
    cfg = cfg_for(run, "recipe=tiny_pretrain", "data.tokenizer_vocab_size=1024", *TINY_ARCH,
                  "schedule.stages.0.tokens=2048", "schedule.stages.1.tokens=4096", "logging.wandb=false")
    result = train(cfg, run)
    assert result["export_dir"] == str(run / "hf")
    meta = json.loads((run / "hf" / "anneal_meta.json").read_text())
    assert meta["stage"] == "stable" and meta["lr"] == pytest.approx(3e-4)
    return run / "hf"


def anneal_overrides(ckpt: Path, *extra: str) -> list[str]:
    return [f"checkpoint={ckpt}", "schedule.stages.0.tokens=3072", "schedule.stages.1.tokens=2048", *extra]


def losses(history):
    return [(r["step"], r["loss"]) for r in history if "loss" in r]


def test_anneal_from_export_starts_at_checkpoint_lr_and_exports(stable_ckpt, tmp_path):
    result = train(cfg_for(tmp_path, *anneal_overrides(stable_ckpt), "logging.wandb=false"), tmp_path)
    hist = [r for r in result["history"] if "lr" in r]
    assert hist[0]["lr"] == pytest.approx(3e-4)             # from anneal_meta.json of the checkpoint
    stage2 = [r for r in hist if r["stage"] == "stage2"]
    assert stage2[0]["lr"] == pytest.approx(3e-5)           # stage boundary exactly at 3e-5
    assert [r["stage"] for r in hist] == ["stage1"] * 6 + ["stage2"] * 4
    assert all(r["model_tflops_per_device"] > 0 for r in hist) and "mfu" not in hist[0]  # no MFU on CPU
    # eval at each stage end with per-source losses, and exact per-source token accounting
    evals = [r for r in result["history"] if "eval_loss" in r]
    assert len(evals) == 3 and {"eval_loss/wiki", "eval_loss/gsm8k"} <= set(evals[-1])
    assert sum(v["tokens"] for v in evals[-1]["data"].values()) >= 5120
    # the export loads in transformers and gives our logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["export_dir"], dtype=torch.float32).eval()
    from anneal.checkpoints.hf_load import load_hf_checkpoint
    model, _ = load_hf_checkpoint(result["export_dir"])
    ids = torch.randint(0, 1000, (1, 16))
    torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_router_bias_moves_with_load(stable_ckpt, tmp_path):
    result = train(cfg_for(tmp_path, *anneal_overrides(stable_ckpt), "logging.wandb=false", "export.enabled=false",
                           "trainer.ckpt_every=off"), tmp_path)
    assert not list(tmp_path.rglob("meta.json"))   # ckpt_every=off: not even the stage ends' checkpoints
    last = [r for r in result["history"] if "moe/bias_spread/layer1" in r][-1]
    assert last["moe/bias_spread/layer1"] > 0   # aux-loss-free balancing moved the bias


def test_profile_window_writes_a_table_and_a_trace(stable_ckpt, tmp_path, capsys):
    """trainer.profile_steps=[2,3]: torch.profiler records steps 2-3 (CPU here: operators' self time)."""
    train(cfg_for(tmp_path, *anneal_overrides(stable_ckpt), "logging.wandb=false", "export.enabled=false",
                  "trainer.ckpt_every=off", "trainer.stop_after_steps=4", "trainer.profile_steps=[2,3]"), tmp_path)
    out = tmp_path / "profile"
    table = json.loads((out / "rank0_steps2-3.json").read_text())
    assert table["steps"] == [2, 3] and table["device"] == "cpu"
    assert table["total_ms"] > 0 and sum(table["by_kind"].values()) == pytest.approx(table["total_ms"])
    assert table["by_kind"].get("dense GEMM", 0) > 0  # the model's matmuls are in the window (CPU: aten::mm ...)
    assert (out / "rank0_steps2-3.trace.json.gz").stat().st_size > 0
    assert "profiled steps 2-3:" in capsys.readouterr().out


def test_stop_and_resume_repeats_the_uninterrupted_run(stable_ckpt, tmp_path):
    full = train(cfg_for(tmp_path / "full", *anneal_overrides(stable_ckpt), "logging.wandb=false"), tmp_path / "full")
    part = tmp_path / "part"
    first = train(cfg_for(part, *anneal_overrides(stable_ckpt), "logging.wandb=false",
                          "trainer.stop_after_steps=4"), part)
    assert first["stopped_early"] and first["step"] == 4
    resumed = train(cfg_for(part, *anneal_overrides(stable_ckpt), "logging.wandb=false", "run.resume=true"), part)
    assert losses(resumed["history"]) == losses(full["history"])  # bit-identical, across the stage switch
    a = json.loads(Path(full["export_dir"], "config.json").read_text())
    assert a["model_type"] == "dots1"
    from safetensors.torch import load_file
    wa = load_file(str(Path(full["export_dir"]) / "model.safetensors"))
    wb = load_file(str(Path(resumed["export_dir"]) / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_losses(stable_ckpt, tmp_path):
    """A real kill: SIGKILL the `anneal` process once a checkpoint exists, resume, compare."""
    common = [*anneal_overrides(stable_ckpt), *QUIET, *SMALL_DATA, "logging.wandb=false",
              "export.enabled=false", "trainer.ckpt_every=512", f"run.root={tmp_path}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    subprocess.run([sys.executable, "-m", "anneal", *common, "run.name=full"], check=True, env=env,
                   capture_output=True, timeout=600)
    proc = subprocess.Popen([sys.executable, "-m", "anneal", *common, "run.name=killed"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "ckpt" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_00000003"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, "-m", "anneal", *common, "run.name=killed", "run.resume=true"], check=True,
                   env=env, capture_output=True, timeout=600)
    read = lambda run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(read("killed")) == losses(read("full"))
    assert not list((tmp_path / "killed" / "ckpt").glob(".tmp-*"))


def test_existing_run_folder_is_not_overwritten(stable_ckpt, tmp_path):
    args = [*anneal_overrides(stable_ckpt), "logging.wandb=false", "export.enabled=false", "trainer.stop_after_steps=1"]
    train(cfg_for(tmp_path, *args), tmp_path)
    with pytest.raises(AnnealError, match="already holds a run.*run.resume=true"):
        train(cfg_for(tmp_path, *args), tmp_path)
    train(cfg_for(tmp_path, *args, "run.overwrite=true"), tmp_path)


def test_wandb_offline_run_is_written(stable_ckpt, tmp_path):
    result = train(cfg_for(tmp_path, *anneal_overrides(stable_ckpt), "export.enabled=false",
                           "trainer.stop_after_steps=2"), tmp_path)
    run_dir = Path(result["wandb_dir"])
    assert run_dir.name.startswith("offline-run-") and list(run_dir.glob("*.wandb"))


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint=no-such-ckpt"], "no-such-ckpt"),
    (["schedule.stages.0.tokens=-5"], "stage1"),
    (["schedule.stages.1.lr_end=1e-3"], "rise"),
    (["schedule.batch_tokens=500"], "multiple of"),
    (["parallel.a2a_overlap=true", "trainer.micro_batch_size=8"], r"parallel.a2a_overlap=true .* gives 1 micro-batch"),
    (["trainer.profile_steps=[4,2]"], r"trainer.profile_steps=\[4, 2\]: give \[first\] or \[first, last\]"),
])
def test_bad_input_gives_one_clear_error(stable_ckpt, tmp_path, overrides, message):
    base = anneal_overrides(stable_ckpt) if not overrides[0].startswith("checkpoint=") else ["schedule.stages.0.tokens=3072"]
    with pytest.raises(AnnealError, match=message):
        train(cfg_for(tmp_path, *base, *overrides, "logging.wandb=false"), tmp_path)


def test_cli_reports_unknown_key_and_wrong_type(tmp_path):
    for bad, needle in (("trainer.lrr=1", "trainer.lrr"), ("trainer.micro_batch_size=abc", "micro_batch_size")):
        r = subprocess.run([sys.executable, "-m", "anneal", bad, f"run.root={tmp_path}"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0 and needle in r.stderr + r.stdout


def test_rank_with_a_share_of_the_experts_loads_its_slice_of_a_checkpoint(tmp_path):
    """Expert parallelism: a rank built with expert_range reads only its experts from the HF files
    and takes its slice of the (whole) stacked tensors of a training checkpoint on resume."""
    from anneal.checkpoints import training_state
    from anneal.checkpoints.hf_load import load_hf_checkpoint
    from anneal.paths import package_root

    folder = package_root() / "anneal" / "assets" / "tiny-stable"
    full, cfg = load_hf_checkpoint(folder)
    part, _ = load_hf_checkpoint(folder, expert_range=(8, 16))
    assert part.model.layers[1].mlp.experts.w_gate_up.shape[0] == 8
    torch.testing.assert_close(part.model.layers[1].mlp.experts.w_down, full.model.layers[1].mlp.experts.w_down[8:16])
    with torch.no_grad():
        for p in full.parameters():
            p.add_(1.0)  # a checkpoint that differs from the HF folder
    ckpt = training_state.save_checkpoint(tmp_path, 3, full, cfg.to_hf_dict(), {"step": 3}, {})
    assert training_state.load_checkpoint(ckpt, part)["step"] == 3
    torch.testing.assert_close(part.model.layers[2].mlp.experts.w_gate_up,
                               full.model.layers[2].mlp.experts.w_gate_up[8:16])
    torch.testing.assert_close(part.lm_head.weight, full.lm_head.weight)


def test_tracker_job_log_and_wandb_token_axis(tmp_path, capsys, monkeypatch):
    """Without a terminal the tracker prints one step line when asked and one eval line per eval
    row (per-source losses); W&B charts every metric against tokens (define_metric, spied on the
    real offline run); the train-loss summary is a mean over a window, not one step."""
    import wandb
    from omegaconf import OmegaConf

    from anneal.train.tracking import Tracker, smoothed_losses

    defined = []
    real = wandb.sdk.wandb_run.Run._metric_callback
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "_metric_callback",
                        lambda self, rec: (defined.append((rec.name or rec.glob_name, rec.step_metric)), real(self, rec)))
    cfg = OmegaConf.create({"wandb": True, "mode": "offline", "project": "t", "entity": None, "progress": True})
    tracker = Tracker(tmp_path, cfg, {}, total_tokens=2048, start_tokens=0)
    row = {"tokens": 1024, "lr": 3e-4, "stage": "stage1", "loss": 5.25, "grad_norm": 0.5, "tokens_per_s": 900.0,
           "host_mem_gb": 0.5}
    tracker.update_progress(1, row, log_line=True)
    tracker.update_progress(2, {**row, "tokens": 2048, "loss": 4.0}, log_line=False)
    tracker.log({**row, "eval_loss": 4.5, "eval_loss/wiki": 4.0, "eval_loss/gsm8k": 5.0}, step=1)
    tracker.log({**row, "loss": 3.0}, step=2)
    tracker.close()
    out = capsys.readouterr().out.splitlines()
    out[0], eta = out[0].rsplit(" | eta ", 1)    # the ETA: wall time since the tracker started
    assert eta.count(":") == 2
    assert out == ["step 1 | tokens 1.024K/2.048K | stage1 | loss 5.2500 | lr 3.000e-04 | grad_norm 0.500 | "
                   "900 tok/s | host mem 0.50 GiB",
                   "eval step 1 | tokens 1.024K | eval_loss 4.5000 | wiki 4.0000 | gsm8k 5.0000"]
    assert ("tokens", "") in defined and ("*", "tokens") in defined
    assert smoothed_losses([{"loss": v} for v in range(20)]) == (2.0, 17.0, 5)


def test_peak_host_memory_is_per_job():
    """Under --multirun the jobs share a process: the peak restarts per job (VmHWM reset)."""
    from anneal.train.devices import host_memory_gb, peak_host_memory_gb, reset_peak_host_memory

    block = bytearray(400 * 2**20)
    block[::4096] = b"x" * len(block[::4096])   # touch every page
    high = peak_host_memory_gb()
    del block
    if not reset_peak_host_memory():
        pytest.skip("no /proc/self/clear_refs here")
    assert peak_host_memory_gb() < high - 0.3 and peak_host_memory_gb() >= host_memory_gb() - 0.05


def test_progress_bar_shows_the_whole_token_counter_at_80_columns(tmp_path, monkeypatch):
    """On a terminal the live bar's token counter is short (12.29K/491.5K) and never cut off."""
    from io import StringIO

    from omegaconf import OmegaConf
    from rich.console import Console

    from anneal.train import tracking

    buf = StringIO()
    monkeypatch.setattr(tracking, "console", Console(file=buf, width=80, force_terminal=True, soft_wrap=True))
    cfg = OmegaConf.create({"wandb": False, "mode": "disabled", "project": "t", "entity": None, "progress": True})
    tracker = tracking.Tracker(tmp_path, cfg, {}, total_tokens=491_520, start_tokens=0)
    tracker.update_progress(3, {"tokens": 12_288, "stage": "stage1", "loss": 5.123, "lr": 2.9e-4,
                                "tokens_per_s": 5900.0}, log_line=True)
    tracker.close()
    last = [line for line in buf.getvalue().splitlines() if "stage1" in line][-1]
    assert "12.29K/491.5K tok" in last and "loss 5.123" in last and "5.9K tok/s" in last
