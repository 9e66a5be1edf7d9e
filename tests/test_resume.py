"""Issue 21: a resume never silently starts over, a run folder has one writer, and nothing the user
owns is deleted. One 3-step run is trained once (module fixture); each test works on a copy."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anneal.checkpoints import discovery, state_io, training_state, write_guards
from anneal.errors import AnnealError
from anneal.train.loop import train
from anneal.train.preemption import PreemptionRequest
from anneal.train.resume import validate_trainer_state
from anneal.train.run_dir import RunLock, claim_run_dir
from test_resilience import cfg_for, rows

QUIET_CLI = ["logging.progress=false", "logging.plots=false", "logging.wandb=false"]
STEPS = ["trainer.ckpt_every=512", "trainer.keep_checkpoints=3", "export.enabled=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run stopped after 3 steps with a checkpoint after each (step_00000001..3)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(cfg_for(run_dir, *STEPS, "trainer.stop_after_steps=3"), run_dir)
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def _steps(run_dir: Path) -> list[str]:
    return [p.name for p in discovery.step_folders(run_dir / "ckpt")]


# ------------------------------------------------------------------- the newest complete checkpoint
@pytest.mark.parametrize("damage", ["rm latest", "empty latest", "torn newest"])
def test_resume_takes_the_newest_complete_checkpoint_whatever_latest_says(run_copy, damage):
    ckpt = run_copy / "ckpt"
    expected = "step_00000003"
    if damage == "rm latest":
        (ckpt / "latest").unlink()
    elif damage == "empty latest":
        (ckpt / "latest").write_text("")          # what a host crash without fsync can leave
    else:
        (ckpt / "step_00000003" / "checkpoint.json").unlink()
        expected = "step_00000002"
    newest, note = discovery.newest_checkpoint(ckpt)
    assert newest.name == expected
    assert "resuming from it" in note and expected in note
    claim = claim_run_dir(cfg_for(run_copy, *STEPS, "run.resume=true"), run_copy)
    claim.lock.release()
    assert claim.resume_from.name == expected and any(expected in n for n in claim.notes)


def test_resume_after_a_lost_latest_continues_and_prunes_by_step(run_copy, capsys):
    """The issue's repro: `rm ckpt/latest`, resume with keep_checkpoints=1 stop_after_steps=1."""
    (run_copy / "ckpt" / "latest").unlink()
    shutil.copytree(run_copy / "ckpt" / "step_00000001", run_copy / "ckpt" / "step_00000009")  # torn: marker says 1
    train(cfg_for(run_copy, "trainer.ckpt_every=4096", "trainer.keep_checkpoints=1", "trainer.stop_after_steps=1",
                  "export.enabled=false", "run.resume=true"), run_copy)
    out = capsys.readouterr().out
    assert "ckpt/latest is missing or empty; the newest complete checkpoint is step_00000003" in out
    assert "resumed from" in out and "step_00000003 (step 3" in out
    # the written step_00000004 is kept, the older complete ones pruned; the torn one is left for a person
    assert _steps(run_copy) == ["step_00000004", "step_00000009"]
    assert discovery.latest_pointer(run_copy / "ckpt") == "step_00000004"
    assert [r["step"] for r in rows(run_copy) if "loss" in r] == [1, 2, 3, 4]


def test_pruning_never_removes_the_newest_or_the_one_just_written(tmp_path):
    from test_ep import tiny_model

    model = tiny_model()
    for step in (2, 9):
        training_state.save_checkpoint(tmp_path, step, model, {"model_type": "dots1"}, {"step": step}, {}, keep=5)
    written = training_state.save_checkpoint(tmp_path, 4, model, {"model_type": "dots1"}, {"step": 4}, {}, keep=1)
    assert [p.name for p in discovery.step_folders(tmp_path)] == ["step_00000004", "step_00000009"]
    assert written.exists()


def test_training_state_without_a_usable_checkpoint_is_refused_not_restarted(run_copy):
    for p in discovery.step_folders(run_copy / "ckpt"):
        (p / "checkpoint.json").unlink()
    before = sorted(str(p) for p in run_copy.rglob("*"))
    with pytest.raises(AnnealError, match=r"holds training state .* but no complete checkpoint .*run.overwrite=true"):
        claim_run_dir(cfg_for(run_copy, *STEPS, "run.resume=true"), run_copy)
    assert sorted(str(p) for p in run_copy.rglob("*")) == before     # nothing changed
    claim_run_dir(cfg_for(run_copy, *STEPS, "run.overwrite=true"), run_copy).lock.release()
    assert _steps(run_copy) == []                                     # starting over is explicit


def test_resume_of_a_run_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(AnnealError, match="holds no run to continue"):
        claim_run_dir(cfg_for(tmp_path / "nope", "run.resume=true"), tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_a_run_that_never_trained_leaves_its_folder_to_the_retry(tmp_path):
    run_dir = tmp_path / "r"
    claim_run_dir(cfg_for(run_dir, "data.mixture=/no/such.yaml"), run_dir).lock.release()   # failed at start-up
    claim = claim_run_dir(cfg_for(run_dir), run_dir)        # the corrected retry, without run.resume
    claim.lock.release()
    assert "never trained a step" in " ".join(claim.notes)
    assert "/no/such.yaml" not in (run_dir / "config.yaml").read_text()


# ------------------------------------------------------------------- one writer
def test_a_second_writer_is_refused_naming_pid_and_host_and_a_crash_frees_the_folder(tmp_path):
    import socket

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from anneal.train.run_dir import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AnnealError, match=rf"in use by PID {holder.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)   # a crash: the OS drops the lock, nothing stale is left
        holder.wait()
    RunLock(tmp_path).acquire().release()


# ------------------------------------------------------------------- settings on resume
def test_changed_settings_are_listed_and_recorded_and_fixed_ones_refused(run_copy):
    with pytest.raises(AnnealError, match=r"seed was 1234 .* is 7 now; it fixes what the run trains on"):
        claim_run_dir(cfg_for(run_copy, *STEPS, "run.resume=true", "seed=7"), run_copy)
    claim = claim_run_dir(cfg_for(run_copy, *STEPS, "run.resume=true", "schedule.stages.1.lr_end=2e-5",
                                  "trainer.micro_batch_size=2"), run_copy)
    claim.lock.release()
    assert any("settings changed on resume (from step 4" in n and "trainer.micro_batch_size 4 -> 2" in n
               for n in claim.notes)
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(run_copy / "config.yaml"))
    assert saved["trainer"]["micro_batch_size"] == 2 and saved["schedule"]["stages"][1]["lr_end"] == 2e-5
    assert saved["resumes"] == [{"step": 3, "changed": [
        {"key": "schedule.stages.1.lr_end", "from": 1e-5, "to": 2e-5},
        {"key": "trainer.micro_batch_size", "from": 4, "to": 2}]}]
    from anneal.compare import differences, load_config

    assert "resumed at step 3: schedule.stages.1.lr_end" in differences({"a": load_config(run_copy)})["a"]


def test_trainer_state_is_checked_against_the_run(run_copy):
    step = run_copy / "ckpt" / "step_00000003"
    good = state_io.load_state(step / "trainer_state")
    check = lambda st: validate_trainer_state(st, step, 64, [512], 3, 4096)  # noqa: E731
    check(good)
    for change, message in [({"tokens": 10**15}, "do not fit batches"), ({"step": -5}, "must be positive"),
                            ({"step": 2}, "but the folder is step_00000003"), ({"tokens": "x"}, "'tokens'")]:
        with pytest.raises(AnnealError, match=message):
            check({**good, **change})
    far = json.loads(json.dumps(good["data"]))
    far[0]["cursors"][0] = [0, 10**12]
    with pytest.raises(AnnealError, match="data cursor"):
        check({**good, "data": far})
    # in a run: refused before anything is restored
    raw = json.loads((step / "trainer_state.json").read_text())
    raw["tokens"] = 10**15
    (step / "trainer_state.json").write_text(json.dumps(raw))
    with pytest.raises(AnnealError, match="trainer_state.json: 1000000000000000 tokens in 3 steps"):
        train(cfg_for(run_copy, *STEPS, "run.resume=true"), run_copy)


def test_stale_partials_of_this_run_are_removed_at_start(run_copy):
    (run_copy / ".hf.partial-dead1").mkdir()
    (run_copy / ".hf.partial-dead1" / "model.safetensors").write_bytes(b"x" * 100)
    (run_copy / "ckpt" / ".tmp-step_00000004-abcd").mkdir()
    (run_copy / "mine.partial-keep").mkdir()      # not ours: kept
    claim = claim_run_dir(cfg_for(run_copy, *STEPS, "run.resume=true"), run_copy)
    claim.lock.release()
    assert not (run_copy / ".hf.partial-dead1").exists() and not (run_copy / "ckpt" / ".tmp-step_00000004-abcd").exists()
    assert (run_copy / "mine.partial-keep").exists()
    assert any("removed what an interrupted writer left" in n and ".hf.partial-dead1" in n for n in claim.notes)


# ------------------------------------------------------------------- damaged files
def test_nan_bytes_in_a_checkpoint_name_the_tensor_not_the_lr(run_copy):
    from anneal.checkpoints import dcp_io

    step = run_copy / "ckpt" / "step_00000003"
    md = dcp_io.read_metadata(step / ".metadata")
    length, fqn, offset = max((i.length, k.fqn, i.offset) for k, i in md.storage_data.items()
                              if k.fqn.startswith("model/"))
    f = step / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[offset + length // 2: offset + length // 2 + 64] = b"\xff" * 64      # NaN bit patterns in fp32
    f.write_bytes(bytes(data))
    with pytest.raises(write_guards.CorruptCheckpointError, match=rf"tensor {fqn} holds NaN or inf"):
        train(cfg_for(run_copy, *STEPS, "run.resume=true"), run_copy)


def test_truncated_or_foreign_rank_file_is_one_line(run_copy):
    step = run_copy / "ckpt" / "step_00000003"
    f = step / "__0_0.distcp"
    size = f.stat().st_size
    f.write_bytes(os.urandom(size))                 # foreign bytes, same length: discovery cannot tell
    with pytest.raises(AnnealError) as e:
        training_state.read_weights(step)
    msg = str(e.value)
    assert "__0_0.distcp is truncated or not a checkpoint file" in msg and "\n" not in msg
    assert "FrameSummary" not in msg and "weights_only" not in msg
    f.write_bytes(f.read_bytes()[: size // 2])      # truncated: not a complete checkpoint at all
    assert "truncated" in discovery.why_incomplete(step)
    assert discovery.newest_checkpoint(run_copy / "ckpt")[0].name == "step_00000002"


def test_disk_full_during_the_dcp_write_is_one_line_and_loses_nothing(tmp_path):
    """A real write failure inside DCP's writer: the process may write no file past 100 kB."""
    script = ("import resource, signal, sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
              "from test_ep import tiny_model; from anneal.checkpoints import training_state as ts; "
              "m = tiny_model(); root = Path(sys.argv[1]); ts.save_checkpoint(root, 1, m, {}, {'step': 1}, {}); "
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY)); "
              "ts.save_checkpoint(root, 2, m, {}, {'step': 2}, {})")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert "DiskFullError: checkpoint of step 2: the disk filled up" in last and "previous checkpoint is intact" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    assert discovery.why_incomplete(tmp_path / "step_00000001") is None


# ------------------------------------------------------------------- export --overwrite
def test_export_overwrite_replaces_only_an_earlier_export(run_copy, tmp_path):
    from anneal.checkpoints.discovery import META_FILE
    from anneal.checkpoints.export import export_training_checkpoint

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    with pytest.raises(AnnealError, match=f"not an earlier export \\(no {META_FILE}\\)"):
        export_training_checkpoint(run_copy, thesis, overwrite=True)
    assert (thesis / "thesis.tex").read_text() == "\\documentclass{article}"
    with pytest.raises(AnnealError, match="--overwrite \\(anneal-export\\) / export.overwrite=true"):
        export_training_checkpoint(run_copy, thesis)
    out = export_training_checkpoint(run_copy, tmp_path / "hf")
    (out / "stale.txt").write_text("from the earlier export")
    export_training_checkpoint(run_copy, out, overwrite=True)
    assert (out / META_FILE).is_file() and not (out / "stale.txt").exists()


# ------------------------------------------------------------------- signals, read-only root
def test_first_ctrl_c_asks_for_a_stop_the_second_interrupts():
    with PreemptionRequest() as request:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert request.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)


def test_unwritable_run_root_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(AnnealError, match="cannot write the run folder .*choose a writable run.root"):
        claim_run_dir(cfg_for(tmp_path / "a_file" / "r"), tmp_path / "a_file" / "r")
    if os.geteuid() != 0:  # root writes into a read-only folder
        root = tmp_path / "ro"
        root.mkdir(mode=0o555)
        with pytest.raises(AnnealError, match=r"cannot write the run folder .*\(Permission denied\)"):
            claim_run_dir(cfg_for(root / "r"), root / "r")


# ------------------------------------------------------------------- the printed resume command
@pytest.mark.slow
def test_printed_resume_command_runs_as_printed_and_replays_the_run(tmp_path):
    """A narrow non-terminal (a SLURM log), a run root with a space and a non-ASCII letter, and
    overrides the resume command does not repeat: the printed line, run by a shell from another
    folder, continues exactly the run that was started (no setting differs: no `resumes:`)."""
    from anneal.train.run_dir import hydra_value

    root = tmp_path / "my runs é"
    env = {**os.environ, "COLUMNS": "40", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.run(
        [sys.executable, "-m", "anneal", "logging.progress=false", "logging.plots=false", "logging.wandb=false",
         "data.seq_len=64", "data.eval_seqs=1", "schedule.batch_tokens=512", "schedule.stages.0.tokens=2048",
         "schedule.stages.1.tokens=1024", "trainer.micro_batch_size=2", "export.enabled=false",
         f"run.root={hydra_value(str(root))}", "run.name=longer", "trainer.stop_after_steps=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    line = next(x for x in first.stdout.splitlines() if x.startswith("anneal "))
    assert "run.resume=true" in line and "run.name=longer" in line
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    second = subprocess.run(["bash", "-c", line], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "replaying this run's overrides" in second.stdout and "resumed from" in second.stdout
    run_dir = root / "longer"
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert "resumes" not in cfg and cfg.trainer.micro_batch_size == 2 and str(cfg.schedule.stages[0].tokens) == "2048"
    assert [r["step"] for r in rows(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]   # (2048 + 1024) / 512
    assert not list(elsewhere.iterdir())                                          # no new run started


def test_hydra_errors_exit_2_and_a_resume_needs_the_run_name(tmp_path):
    bad_group = subprocess.run([sys.executable, "-m", "anneal", "trainer=no_such_trainer"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
    assert bad_group.returncode == 2, bad_group.stderr[-1000:]
    no_name = subprocess.run([sys.executable, "-m", "anneal", "run.resume=true"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert no_name.returncode == 2 and "run.resume=true needs run.name=NAME" in no_name.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------- fault injection
@pytest.mark.slow
def test_sigkill_mid_step_write_commit_and_export_resumes_byte_identical(tmp_path):
    """One run killed with SIGKILL four times (mid-step, mid-write, mid-commit, mid-export) and
    resumed each time ends with the losses and the exported weights of an uninterrupted run."""
    from safetensors.torch import load_file

    common = [*QUIET_CLI, "data.seq_len=64", "data.eval_seqs=1", "trainer.micro_batch_size=4",
              "schedule.batch_tokens=512", "schedule.stages.0.tokens=1536", "schedule.stages.1.tokens=1024",
              "trainer.ckpt_every=512", f"run.root={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_at = str(Path(__file__).parent / "_kill_at.py")
    subprocess.run([sys.executable, "-m", "anneal", *common, "run.name=full"], env=env, check=True,
                   capture_output=True, timeout=300)
    cut = tmp_path / "cut"
    for i, (point, n) in enumerate([("step", 6), ("write", 1), ("commit", 1), ("export", 1)]):
        r = subprocess.run([sys.executable, kill_at, point, str(n), *common, "run.name=cut",
                            *(["run.resume=true"] if i else [])], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
    assert list(cut.glob(".hf.partial-*"))                       # what the killed export left
    r = subprocess.run([sys.executable, "-m", "anneal", *common, "run.name=cut", "run.resume=true"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removed what an interrupted writer left" in r.stdout and not list(cut.glob(".hf.partial-*"))
    losses = lambda d: [(x["step"], x["loss"]) for x in rows(d) if "loss" in x]  # noqa: E731
    assert losses(cut) == losses(tmp_path / "full") and len(losses(cut)) == 5
    a, b = load_file(str(cut / "hf" / "model.safetensors")), load_file(str(tmp_path / "full" / "hf" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resuming the finished run again keeps its export (it used to refuse the folder, exit 2)
    before = (cut / "hf" / "model.safetensors").stat().st_mtime_ns
    r = subprocess.run([sys.executable, "-m", "anneal", *common, "run.name=cut", "run.resume=true"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already holds this run's export (step 5); kept" in r.stdout
    assert (cut / "hf" / "model.safetensors").stat().st_mtime_ns == before


def test_an_empty_data_file_is_one_line_and_the_retry_takes_the_folder(tmp_path):
    from mixtures.errors import MixtureError

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "mix.yaml").write_text(
        "name: em\nheldout_seed: 0\nsources:\n  - name: wiki\n    data: {path: empty.txt, format: text}\n"
        "    text: '{text}'\n    weights: {stage1: 1.0, stage2: 1.0}\n")
    run_dir = tmp_path / "run"
    with pytest.raises(MixtureError, match=r"empty.txt is empty; put documents in it"):
        train(cfg_for(run_dir, f"data.mixture={tmp_path / 'mix.yaml'}"), run_dir)
    claim = claim_run_dir(cfg_for(run_dir), run_dir)       # the corrected retry, without run.resume
    claim.lock.release()
    assert "never trained a step" in " ".join(claim.notes)


def test_remote_code_keys_of_a_checkpoint_config_are_noted_not_dropped_silently(tmp_path, caplog):
    from anneal.checkpoints.hf_load import note_remote_code_keys

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dots1", "auto_map": {"AutoModel": "x.Y"},
                                                      "trust_remote_code": True}))
    with caplog.at_level("WARNING", logger="anneal"):
        assert note_remote_code_keys(tmp_path / "config.json") == ["auto_map", "trust_remote_code"]
    assert "auto_map, trust_remote_code ignored" in caplog.text
