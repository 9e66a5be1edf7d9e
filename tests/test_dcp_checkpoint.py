"""Sharded training checkpoints (torch.distributed.checkpoint): every rank writes its own fragments,
a checkpoint resumes under another layout (EP 2 -> EP 1, DP 2 -> DP 1 / DP 4, DeepSpeed -> one
process) with the same next losses, and the DCP metadata is read without running code."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from anneal.checkpoints import discovery, state_io, training_state
from anneal.checkpoints.run_checkpoints import RunCheckpoints
from anneal.train.engine import Engine
from test_ep import TINY, _loss, tiny_model
from test_resilience import _Payload  # a pickle that writes a file when loaded

TCFG = SimpleNamespace(micro_batch_size=1, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=0.5, bf16=False)
STEPS, SAVE_AT, ROWS, RATE = 4, 2, 4, 1e-2
LRS = [3e-3, 2e-3, 1.5e-3, 1e-3]


def _data():
    # per step: 2 micro-batches of ROWS sequences of 13 tokens (the global batch, whatever the layout)
    return torch.randint(0, TINY["vocab_size"], (STEPS, 2, ROWS, 13), generator=torch.Generator().manual_seed(5))


def _steps(engine, model, steps, rank=0, world=1) -> list[float]:
    """Steps of the global batch: rank r of `world` takes its rows of every micro-batch."""
    data, out = _data(), []
    per = ROWS // world
    for s in steps:
        losses = []
        for m in range(2):
            loss = _loss(model, data[s, m, rank * per:(rank + 1) * per])
            engine.backward(loss / 2)
            losses.append(loss.detach())
        engine.step(LRS[s])
        engine.reduce_expert_load(model.routers())
        for r in model.routers().values():
            r.update_bias(RATE, r.expert_load)
        mean = torch.stack(losses).mean()
        if world > 1:
            dist.all_reduce(mean)
        out.append(float(mean) / world)
    return out


class _NoData:
    """A run without a data stream: the checkpoint's data cursor is empty."""
    n_shards = 0

    def state_dict(self) -> list:
        return []

    def load_state_dict(self, shards: list) -> None:
        pass


def _save_checkpoint(engine, ckpt_root: Path, step: int, model) -> Path:
    checkpoints = RunCheckpoints(ckpt_root, keep=2)
    checkpoints.attach(engine=engine, data=_NoData(), callbacks={})
    return checkpoints.save(step, 100 * step, history=[], hf_config=model.config.to_hf_dict(), meta={})


def _resume(engine_factory, ckpt_root: Path, model):
    checkpoints = RunCheckpoints(ckpt_root)
    resumed = checkpoints.load(checkpoints.newest()[0], model)   # the weights (this rank's experts), as the trainer does
    engine = engine_factory(model)
    checkpoints.attach(engine=engine, data=_NoData(), callbacks={})
    return engine, resumed.state


# ----------------------------------------------------------------------------------- one process
def test_native_save_and_resume_is_bitwise_exact(tmp_path):
    model = tiny_model()
    engine = Engine(model, TCFG)
    _steps(engine, model, range(SAVE_AT))
    _save_checkpoint(engine, tmp_path, SAVE_AT, model)
    want = _steps(engine, model, range(SAVE_AT, STEPS))
    step_dir = training_state.latest_checkpoint(tmp_path)
    assert (step_dir / training_state.MARKER).exists() and (step_dir / ".metadata").exists()
    assert json.loads((step_dir / training_state.MARKER).read_text())["optimizer"] is True

    model2 = tiny_model(seed=7)
    engine2, state = _resume(lambda m: Engine(m, TCFG), tmp_path, model2)
    assert state["step"] == SAVE_AT and state["optimizer_step"] == SAVE_AT
    assert _steps(engine2, model2, range(SAVE_AT, STEPS)) == want
    for (n, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), n


def test_checkpoint_of_a_model_reads_back_whole_and_as_an_expert_slice(tmp_path):
    model = tiny_model()
    step = training_state.save_checkpoint(tmp_path, 1, model, model.config.to_hf_dict(), {"step": 1}, {})
    weights = training_state.read_weights(step)
    for n, t in model.state_dict().items():
        assert torch.equal(weights[n], t), n
    w = training_state.read_full_tensor(step, "model.layers.1.mlp.experts.w_gate_up", rows=(2, 5))
    assert torch.equal(w, model.model.layers[1].mlp.experts.w_gate_up[2:5].detach())


def test_anneal_export_streams_a_dcp_checkpoint_into_shards_transformers_loads(tmp_path, capsys):
    import transformers

    from anneal.checkpoint_cli import export_main

    model = tiny_model()
    step = training_state.save_checkpoint(tmp_path / "ckpt", 1, model, model.config.to_hf_dict(), {"step": 1}, {})
    export_main([str(step), str(tmp_path / "hf"), "--dtype", "float32", "--max-shard-size", "20KB"])
    assert "peak host memory" in capsys.readouterr().out
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3 and "model.layers.2.mlp.experts.7.up_proj.weight" in index
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def test_a_malicious_dcp_metadata_file_is_refused_and_never_run(tmp_path):
    from anneal.checkpoints.export import export_training_checkpoint

    model = tiny_model()
    engine = Engine(model, TCFG)
    _steps(engine, model, range(1))
    step = _save_checkpoint(engine, tmp_path / "ckpt", 1, model)
    sentinel = tmp_path / "executed"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(sentinel)))
    with pytest.raises(state_io.UnsafeStateError, match="refusing to read it"):
        training_state.load_checkpoint(step, tiny_model())
    with pytest.raises(state_io.UnsafeStateError):
        export_training_checkpoint(step, tmp_path / "hf")
    (step / ".metadata").write_bytes(b"not a pickle at all")
    with pytest.raises(state_io.UnsafeStateError, match="not a DCP metadata file"):
        training_state.load_checkpoint(step, tiny_model())
    assert not sentinel.exists() and not (tmp_path / "hf").exists()


def test_a_step_folder_without_the_marker_is_not_a_checkpoint(tmp_path):
    model = tiny_model()
    first = training_state.save_checkpoint(tmp_path, 1, model, model.config.to_hf_dict(), {"step": 1}, {})
    second = training_state.save_checkpoint(tmp_path, 2, model, model.config.to_hf_dict(), {"step": 2}, {})
    (second / training_state.MARKER).unlink()      # as if killed before the commit point
    # `latest` names the torn folder: the newest complete one is taken, and the note says why
    newest, note = discovery.newest_checkpoint(tmp_path)
    assert newest == first and training_state.latest_checkpoint(tmp_path) == first
    assert "ckpt/latest names step_00000002" in note and "step_00000002 (no checkpoint.json)" in note
    (tmp_path / "latest").write_text(first.name)
    assert discovery.newest_checkpoint(tmp_path) == (first, None)


def test_missing_rank_file_and_full_disk_mid_write_are_one_clear_error(tmp_path, monkeypatch):
    import errno

    from anneal.checkpoints import dcp_io, write_guards
    from anneal.errors import AnnealError

    model = tiny_model()
    first = training_state.save_checkpoint(tmp_path, 1, model, model.config.to_hf_dict(), {"step": 1}, {})
    real = dcp_io.dcp.save

    def fill_up(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_io.dcp, "save", fill_up)
    with pytest.raises(write_guards.DiskFullError, match="disk filled up"):
        training_state.save_checkpoint(tmp_path, 2, model, model.config.to_hf_dict(), {"step": 2}, {})
    monkeypatch.setattr(dcp_io.dcp, "save", real)
    assert training_state.latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", first.name]
    (first / "__0_0.distcp").unlink()
    with pytest.raises(AnnealError, match=r"lacks __0_0.distcp: the files of 1 of the 1 writing ranks are missing"):
        training_state.load_checkpoint(first, tiny_model())


# ---------------------------------------------------------------------------------- resharding
def _ds_engine(ep_size):
    from anneal.parallel import ds_engine

    return lambda m: ds_engine.DeepSpeedEngine(m, TCFG, ep_size=ep_size, zero_stage=2)


def _save(rank, world, root, ep_size):
    """2 ranks (ZeRO 2 over DP 2, EP `ep_size`): steps 1-2, checkpoint, steps 3-4 (the losses of a
    run that never changed layout); a fresh engine of the same layout resumes exactly."""
    from anneal.parallel import ds_engine

    ds_engine.init_distributed("cpu")
    model = tiny_model()
    engine = _ds_engine(ep_size)(model)
    _steps(engine, model, range(SAVE_AT), rank, world)
    _save_checkpoint(engine, Path(root) / "ckpt", SAVE_AT, model)
    files = sorted(p.name for p in training_state.latest_checkpoint(Path(root) / "ckpt").iterdir())
    assert "__0_0.distcp" in files and "__1_0.distcp" in files and "model.safetensors" not in files
    # same layout, fresh engine: exact resume
    model2 = tiny_model(seed=7)
    engine2, _ = _resume(_ds_engine(ep_size), Path(root) / "ckpt", model2)
    want = _steps(engine, model, range(SAVE_AT, STEPS), rank, world)
    got = _steps(engine2, model2, range(SAVE_AT, STEPS), rank, world)
    assert got == want, (got, want)
    if rank == 0:
        (Path(root) / "want.json").write_text(json.dumps(want))


def _resume_ds(rank, world, root, ep_size):
    from anneal.parallel import ds_engine

    ds_engine.init_distributed("cpu")
    model = tiny_model(seed=7)
    engine, _ = _resume(_ds_engine(ep_size), Path(root) / "ckpt", model)
    got = _steps(engine, model, range(SAVE_AT, STEPS), rank, world)
    want = json.loads((Path(root) / "want.json").read_text())
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (world, ep_size, got, want)


def _saved(tmp_path_factory, ep_size):
    """The 2-rank save, once more in a fresh folder if a rank was killed by SIGABRT ("terminate
    called without an active exception" from a C++ thread of the gloo/DeepSpeed CPU stack, seen on
    1 of ~5 full CI runs of this fixture, never with the file alone in 20 runs). An assertion or a
    Python error in a rank is never retried."""
    pytest.importorskip("deepspeed")
    import warnings

    from torch.multiprocessing import ProcessExitedException

    from _dist import run_distributed

    for attempt in range(2):
        root = tmp_path_factory.mktemp(f"ep{ep_size}")
        try:
            run_distributed(_save, 2, str(root), ep_size)
            return root
        except ProcessExitedException as e:
            if attempt or e.signal_name != "SIGABRT":
                raise
            warnings.warn(f"EP {ep_size} save: a rank aborted in C++ ({e}); saving again in a fresh folder")


@pytest.fixture(scope="module")
def ep2_checkpoint(tmp_path_factory):
    """Saved by EP 2 x DP 2 (2 ranks, each with 4 of the 8 experts, ZeRO 2 over both)."""
    return _saved(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def dp2_checkpoint(tmp_path_factory):
    """Saved by DP 2 with EP 1 (2 ranks, all experts, ZeRO 2 partitions over both)."""
    return _saved(tmp_path_factory, 1)


@pytest.mark.slow
def test_ep2_checkpoint_resumes_in_one_process_native(ep2_checkpoint):
    model = tiny_model(seed=7)
    engine, state = _resume(lambda m: Engine(m, TCFG), ep2_checkpoint / "ckpt", model)
    got = _steps(engine, model, range(SAVE_AT, STEPS))
    want = json.loads((ep2_checkpoint / "want.json").read_text())
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)


@pytest.mark.slow
def test_ep2_checkpoint_resumes_on_4_ranks_with_ep1(ep2_checkpoint):
    """EP 2 -> EP 1 and DP 2 -> DP 4: other experts per rank, other ZeRO fragments."""
    from _dist import run_distributed

    run_distributed(_resume_ds, 4, str(ep2_checkpoint), 1)


@pytest.mark.slow
def test_dp2_checkpoint_resumes_on_1_rank(dp2_checkpoint):
    """DP 2 -> DP 1 under DeepSpeed: one rank's partition holds what two wrote."""
    from _dist import run_distributed

    run_distributed(_resume_ds, 1, str(dp2_checkpoint), 1)
