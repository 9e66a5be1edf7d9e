"""Surviving the cluster on CPU: non-finite and spiking losses, preemption signals, full disks,
foreign pickles in a checkpoint folder, determinism, and config values out of range."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from anneal.checkpoints import state_io, training_state, write_guards
from anneal.cli import compose
from anneal.config import check_keys, validate_config
from anneal.errors import AnnealError
from anneal.train.guards import RunStopped
from anneal.train.loop import train
from anneal.train.preemption import PREEMPTED_EXIT_CODE

QUIET = ["logging.progress=false", "logging.plots=false", "logging.wandb=false"]
SMALL = ["data.seq_len=64", "data.eval_seqs=1", "trainer.micro_batch_size=4", "schedule.batch_tokens=512",
         "schedule.stages.0.tokens=3072", "schedule.stages.1.tokens=1024"]


def cfg_for(run_dir: Path, *overrides: str):
    """The shipped tiny stable checkpoint on small batches (threads: torch's default, as a user runs)."""
    return compose([f"run.dir={run_dir}", "run.name=t", *QUIET, *SMALL, *overrides])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> list:
    return [(r["step"], r["loss"]) for r in rows(run_dir) if "loss" in r]


# ----------------------------------------------------------------------------- non-finite guard
def test_nonfinite_stops_before_anything_is_written(tmp_path):
    with pytest.raises(RunStopped) as e:
        train(cfg_for(tmp_path, "schedule.start_lr=1e8", "trainer.ckpt_every=512"), tmp_path)
    msg = str(e.value)
    assert "training stopped at step 2" in msg and "non-finite" in msg and "LR" in msg
    assert "per source:" in msg and "run.resume=true schedule.start_lr=1e+07" in msg and "step_00000001" in msg
    assert e.value.exit_code == 3
    assert training_state.latest_checkpoint(tmp_path / "ckpt").name == "step_00000001"  # nothing from step 2
    weights = training_state.read_weights(tmp_path / "ckpt" / "step_00000001")
    assert write_guards.first_nonfinite(weights) is None
    assert not (tmp_path / "hf").exists()


def test_skip_mode_drops_updates_then_stops_after_too_many(tmp_path):
    with pytest.raises(RunStopped, match="3 steps in a row dropped"):
        train(cfg_for(tmp_path, "schedule.start_lr=1e8", "trainer.ckpt_every=512", "trainer.keep_checkpoints=9",
                      "trainer.on_nonfinite=skip", "trainer.max_skipped_steps=3"), tmp_path)
    r = [x for x in rows(tmp_path) if "loss" in x]
    assert [x.get("skipped") for x in r] == [None, "non-finite gradient norm", "non-finite gradient norm"]
    assert [x["skipped_steps"] for x in r] == [0, 1, 2]
    # a dropped step changes nothing: the checkpoints after steps 1, 2 and 3 hold the same weights
    ckpts = [training_state.read_weights(tmp_path / "ckpt" / f"step_0000000{i}") for i in (1, 2, 3)]
    assert all(torch.equal(ckpts[0][k], c[k]) for c in ckpts[1:] for k in ckpts[0])


def test_guard_vetoes_a_spike_and_restarts_its_window_per_stage(tmp_path):
    from types import SimpleNamespace

    from anneal.train.guards import StepGuard

    spike = SimpleNamespace(enabled=True, window=4, k=3.0)
    trainer = SimpleNamespace(on_nonfinite="stop", max_skipped_steps=5, spike=spike)
    guard = StepGuard(SimpleNamespace(cfg=SimpleNamespace(trainer=trainer)))
    for loss in (2.0, 2.1, 1.9, 2.0):
        assert guard.before_update("s1", {"loss": loss}) is None
        guard.window.append(loss)
    assert guard.before_update("s1", {"loss": 2.2}) is None            # within 3 std
    assert "loss spike" in guard.before_update("s1", {"loss": 3.0})     # mean 2.0 + 3 * 0.07
    assert guard.before_update("s2", {"loss": 3.0}) is None            # a new stage: a new level
    assert guard.before_update("s2", {"loss": float("nan")}) == "non-finite loss"
    restored = StepGuard(SimpleNamespace(cfg=SimpleNamespace(trainer=trainer)))
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == guard.state_dict()


def test_spike_guard_in_a_run_drops_updates_and_counts_them(tmp_path):
    # k tiny: every loss above the mean of the last two is a "spike"
    result = train(cfg_for(tmp_path, "trainer.spike.enabled=true", "trainer.spike.window=2", "trainer.spike.k=1e-6",
                           "trainer.max_skipped_steps=100", "export.enabled=false"), tmp_path)
    r = [x for x in result["history"] if "loss" in x]
    skipped = [x for x in r if "skipped" in x]
    assert skipped and all("loss spike" in x["skipped"] for x in skipped)
    assert r[-1]["skipped_steps"] == len(skipped) < len(r)


def test_engine_skip_step_changes_nothing_and_the_next_step_is_exact():
    from types import SimpleNamespace

    from anneal.train.engine import Engine
    from test_ep import TINY, _loss, tiny_model

    tcfg = SimpleNamespace(grad_clip=1.0, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8)
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, TINY["vocab_size"], (3, 2, 13), generator=g)

    def run(skip_between: bool):
        model = tiny_model()
        engine = Engine(model, tcfg)
        for i in range(2):
            if i == 1 and skip_between:
                before = {k: v.clone() for k, v in model.state_dict().items()}
                opt_before = _tensors(engine.optimizer.state_dict()["state"])
                engine.backward(_loss(model, data[2]) * float("nan"))
                engine.step(1e-3)                     # a NaN gradient: not applied
                assert not engine.step_applied
                engine.backward(_loss(model, data[2]))
                engine.skip_step()                    # a veto: dropped
                assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
                opt_after = _tensors(engine.optimizer.state_dict()["state"])
                assert all(torch.equal(x, y) for x, y in zip(opt_before, opt_after, strict=True))
            engine.backward(_loss(model, data[i]))
            engine.step(1e-3)
            assert engine.step_applied
        return model.state_dict()

    a, b = run(False), run(True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _tensors(state: dict) -> list:
    return [v.clone() for per_param in state.values() for v in per_param.values()]


# ----------------------------------------------------------------------------- preemption
def _wait_for_steps(run_dir: Path, n: int, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and sum('"loss"' in line for line in
                                                       (run_dir / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir}: fewer than {n} steps before the deadline")


@pytest.mark.slow
def test_sigusr1_checkpoints_and_the_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path):
    """One process, torch's default thread count: preempted + resumed == uninterrupted, bit for bit
    (deterministic mode is on by default on CPU)."""
    common = [*QUIET, *SMALL, "export.enabled=false", f"run.root={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([sys.executable, "-m", "anneal", *common, "run.name=full"], check=True, env=env,
                   capture_output=True, timeout=600)
    # a tokenizer worker process too, and the signal to the whole process group (as a scheduler
    # may send it): the worker ignores it, the trainer finishes its step from the worker's rows
    proc = subprocess.Popen([sys.executable, "-m", "anneal", *common, "run.name=cut", "data.num_workers=1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_steps(tmp_path / "cut", 2, proc)
    os.killpg(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "SIGUSR1: stopped after step" in out and "run.resume=true" in out
    cut_at = len(step_losses(tmp_path / "cut"))
    assert training_state.latest_checkpoint(tmp_path / "cut" / "ckpt").name == f"step_{cut_at:08d}"
    subprocess.run([sys.executable, "-m", "anneal", *common, "run.name=cut", "run.resume=true"], check=True,
                   env=env, capture_output=True, timeout=600)
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "full")
    assert cut_at < len(step_losses(tmp_path / "full"))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_after_the_same_step(tmp_path):
    pytest.importorskip("deepspeed")
    common = [*QUIET, *SMALL, "export.enabled=false", f"run.root={tmp_path}", "trainer.engine=deepspeed",
              "parallel.ep_size=2", "trainer.bf16=false", "trainer.threads=1"]
    def cmd(*args):  # a fresh rendezvous port per launch: the preempted run's may still be held
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port()), "-m", "anneal", *common, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd("run.name=full"), check=True, env=env, capture_output=True, timeout=900)
    proc = subprocess.Popen(cmd("run.name=cut"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_steps(tmp_path / "cut", 2, proc, timeout=600)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "SIGTERM: stopped after step" in out, (out[-2000:], err[-3000:])
    cut_at = len(step_losses(tmp_path / "cut"))
    step = training_state.latest_checkpoint(tmp_path / "cut" / "ckpt")
    assert step.name == f"step_{cut_at:08d}"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "checkpoint.json"} <= {p.name for p in step.iterdir()}
    subprocess.run(cmd("run.name=cut", "run.resume=true"), check=True, env=env, capture_output=True, timeout=900)
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "full")


def _free_port() -> int:
    from _dist import free_port

    return free_port()


# ----------------------------------------------------------------------------- full disk
Usage = namedtuple("Usage", "total used free")


def _tiny_ckpt(tmp_path, step):
    from test_ep import tiny_model

    model = tiny_model()
    state = {"step": step, "tokens": 10 * step, "rng": training_state.rng_state()}
    return training_state.save_checkpoint(tmp_path / "ckpt", step, model, {"model_type": "dots1"}, state, {}, keep=2)


def test_no_room_for_a_checkpoint_is_one_error_and_the_previous_stays(tmp_path, monkeypatch):
    first = _tiny_ckpt(tmp_path, 1)
    monkeypatch.setattr(write_guards.shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(write_guards.DiskFullError, match=r"checkpoint of step 2: needs about .* GB free"):
        _tiny_ckpt(tmp_path, 2)
    assert training_state.latest_checkpoint(tmp_path / "ckpt") == first
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_00000001"]


def test_disk_full_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    first = _tiny_ckpt(tmp_path, 1)
    real = state_io.save_file

    def fill_up(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)        # half a file on disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_io, "save_file", fill_up)
    with pytest.raises(write_guards.DiskFullError, match="disk filled up.*previous checkpoint is intact"):
        _tiny_ckpt(tmp_path, 2)
    assert training_state.latest_checkpoint(tmp_path / "ckpt") == first
    assert not list((tmp_path / "ckpt").glob(".tmp-*")) and not (tmp_path / "ckpt" / "step_00000002").exists()
    from test_ep import tiny_model

    state = training_state.load_checkpoint(first, tiny_model())
    assert state["step"] == 1


def test_full_disk_stops_the_run_with_one_message(tmp_path, monkeypatch):
    calls = []
    real = shutil.disk_usage

    def second_call_is_full(path):
        calls.append(path)
        return Usage(10**12, 10**12, 0) if len(calls) >= 2 else real(path)

    monkeypatch.setattr(write_guards.shutil, "disk_usage", second_call_is_full)
    with pytest.raises(write_guards.DiskFullError, match="checkpoint of step 2"):
        train(cfg_for(tmp_path, "trainer.ckpt_every=512"), tmp_path)
    assert training_state.latest_checkpoint(tmp_path / "ckpt").name == "step_00000001"


def test_export_refuses_nonfinite_weights_and_a_full_disk(tmp_path, monkeypatch):
    from anneal.checkpoints.hf_export import export_hf_checkpoint
    from test_ep import tiny_model

    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(write_guards.NonFiniteWeightsError, match="lm_head.weight is not finite"):
        export_hf_checkpoint(model, tmp_path / "hf")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 0.0
    monkeypatch.setattr(write_guards.shutil, "disk_usage", lambda p: Usage(10**12, 10**12, 0))
    with pytest.raises(write_guards.DiskFullError, match="export to"):
        export_hf_checkpoint(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.partial-*"))


# ----------------------------------------------------------------------------- no pickle on load
class _Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.write_text, (self.sentinel, "pwned"))


def test_a_pickle_in_a_checkpoint_folder_is_refused_and_never_run(tmp_path):
    import pickle

    from test_ep import tiny_model

    step = _tiny_ckpt(tmp_path, 1)
    sentinel = tmp_path / "executed"
    for f in step.glob("trainer_state.*"):
        f.unlink()
    (step / "trainer_state.pt").write_bytes(pickle.dumps({"step": _Payload(sentinel)}))
    with pytest.raises(state_io.UnsafeStateError, match="does not unpickle"):
        training_state.load_checkpoint(step, tiny_model())
    (step / "trainer_state.json").write_bytes(pickle.dumps(_Payload(sentinel)))   # a pickle under our name
    with pytest.raises(state_io.UnsafeStateError, match="not a JSON training state"):
        training_state.load_checkpoint(step, tiny_model())
    assert not sentinel.exists()


def test_resume_and_export_of_a_foreign_folder_never_unpickle(tmp_path):
    import pickle

    train(cfg_for(tmp_path, "trainer.stop_after_steps=1", "export.enabled=false"), tmp_path)
    step = training_state.latest_checkpoint(tmp_path / "ckpt")
    sentinel = tmp_path / "executed"
    for f in step.glob("trainer_state.*"):
        f.unlink()
    (step / "trainer_state.pt").write_bytes(pickle.dumps({"step": _Payload(sentinel)}))
    with pytest.raises(AnnealError, match="does not unpickle"):
        train(cfg_for(tmp_path, "run.resume=true"), tmp_path)
    from anneal.checkpoints.export import export_training_checkpoint

    export_training_checkpoint(step, tmp_path / "hf")   # weights are safetensors: exporting is safe
    assert (tmp_path / "hf" / "config.json").exists() and not sentinel.exists()


def test_state_round_trip_keeps_types():
    tree = {"a": (1, 2.5, None), "t": torch.arange(3.0), "nested": [{"x": True}], 3: "int key",
            "empty": torch.zeros(0, 2), "nan": float("nan")}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        state_io.save_state(tree, Path(d) / "s")
        back = state_io.load_state(Path(d) / "s")
    assert back["a"] == (1, 2.5, None) and back[3] == "int key" and back["nested"] == [{"x": True}]
    assert torch.equal(back["t"], tree["t"]) and back["empty"].shape == (0, 2) and back["nan"] != back["nan"]
    with pytest.raises(TypeError, match="cannot be stored without pickle"):
        state_io.save_state({"obj": object()}, Path(tempfile.mkdtemp()) / "s")


# ----------------------------------------------------------------------------- config errors
BAD_VALUES = [
    ("trainer.micro_batch_size=-3", "trainer.micro_batch_size=-3: must be >= 1"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0: must be >= 1"),
    ("trainer.grad_clip=-1", "trainer.grad_clip=-1.0: must be >= 0"),
    ("trainer.eps=0", "trainer.eps=0.0: must be > 0"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay=-0.1: must be >= 0"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints=0: must be >= 1"),
    ("trainer.betas=[0.9,1.5]", "trainer.betas=[0.9, 1.5]: must be two numbers in [0, 1)"),
    ("schedule.start_lr=-1e-4", "schedule.start_lr=-0.0001: must be >= 0"),
    ("data.seq_len=1", "data.seq_len=1: must be >= 2"),
    ("data.eval_seqs=-1", "data.eval_seqs=-1: must be >= 0"),
    ("parallel.ep_size=0", "parallel.ep_size=0: must be >= 1"),
    ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite='ignore': must be one of stop, skip"),
    ("trainer.spike.window=1", "trainer.spike.window=1: must be >= 2"),
    ("trainer.spike.k=0", "trainer.spike.k=0.0: must be > 0"),
    ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps=0: must be >= 1"),
    ("trainer.engine=megatron", "trainer.engine='megatron': must be one of native, deepspeed"),
    ("export.dtype=int8", "export.dtype='int8': must be one of bfloat16, float16, float32"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES)
def test_numbers_out_of_range_name_the_key(override, message):
    with pytest.raises(AnnealError) as e:
        validate_config(compose([override]))
    assert message in str(e.value)


@pytest.mark.parametrize("key, near", [
    ("trainer.micro_batch", "trainer.micro_batch_size"), ("schedule.start_lrr", "schedule.start_lr"),
    ("trainer.on_nonfinit", "trainer.on_nonfinite"), ("sed", "seed"), ("trainer.spike.kk", "trainer.spike.k"),
    ("trainer.seed", "seed"), ("trainr.eps", "trainer.eps"), ("trainer.lr", "schedule.start_lr"),
])
def test_unknown_key_gets_the_nearest_valid_one(key, near):
    with pytest.raises(AnnealError, match=f"unknown config key {key}; did you mean {near}\\?"):
        check_keys([key], "command line")
    check_keys(["model.arch.hidden_size", "trainer.deepspeed.zero_optimization.stage",
                "schedule.stages.0.tokens", "trainer.spike.k"], "command line")   # free-form and valid keys


def test_cli_unknown_key_in_a_recipe_file_is_one_line(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("# @package _global_\ntrainer:\n  micro_batch: 4\n")
    r = subprocess.run([sys.executable, "-m", "anneal", f"recipe={recipe}", f"run.root={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"recipe {recipe}: unknown config key trainer.micro_batch; did you mean trainer.micro_batch_size?" \
        in r.stderr.replace("\n", "")
