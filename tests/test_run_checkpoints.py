"""RunCheckpoints, the one owner of a run's checkpoints: step folder naming, the marker, `latest`,
meta.json, pruning that never loses the last good checkpoint, the parts' states under explicit
keys, the export route, and one clear refusal (naming the folder) of a format it does not read."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from anneal.checkpoints import discovery, training_state, write_guards
from anneal.checkpoints.run_checkpoints import RunCheckpoints, anneal_meta, export_meta, meta_of_step
from anneal.errors import AnnealError
from anneal.train.engine import Engine
from test_ep import tiny_model

TCFG = SimpleNamespace(betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=1.0)


class _Data:
    """A data stream of two shards whose cursor is a number."""
    n_shards = 2

    def __init__(self, cursor: int = 0):
        self.cursor = cursor

    def state_dict(self) -> list:
        return [{"sequences": self.cursor}, {"sequences": self.cursor + 1}]

    def load_state_dict(self, shards: list) -> None:
        self.cursor = shards[0]["sequences"]


class _Counter:
    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        self.n = sd["n"]


def _attached(root: Path, keep: int = 2, cursor: int = 0, n: int = 0):
    model = tiny_model()
    engine = Engine(model, TCFG)
    checkpoints = RunCheckpoints(root, keep=keep)
    checkpoints.attach(engine=engine, data=_Data(cursor), callbacks={"Counter": _Counter(n)})
    return checkpoints, model


def _save(checkpoints, model, step: int) -> Path:
    meta = anneal_meta(started_from="tiny", stage="s", lr=1e-3, tokens_seen_total=10 * step, step=step,
                       tokens=10 * step)
    return checkpoints.save(step, 10 * step, history=[{"step": step}], hf_config=model.config.to_hf_dict(),
                            meta=meta)


def test_names_marker_latest_and_meta(tmp_path):
    checkpoints, model = _attached(tmp_path / "ckpt")
    written = _save(checkpoints, model, 3)
    assert written == checkpoints.step_dir(3) == tmp_path / "ckpt" / "step_00000003"
    assert RunCheckpoints.for_run(tmp_path).root == checkpoints.root
    assert checkpoints.last == written and checkpoints.step_number(written) == 3
    marker = training_state.read_marker(written)
    assert marker["format"] == discovery.FORMAT and marker["step"] == 3
    assert marker["layout"] == {"world_size": 1, "ep_size": 1, "engine": "native"} and marker["optimizer"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000003"
    assert checkpoints.newest() == (written, None)
    assert meta_of_step(written)["tokens"] == 30 and meta_of_step(tmp_path) == {}
    state = json.loads((written / "trainer_state.json").read_text())
    assert list(state) == ["step", "tokens", "data", "rng", "history", "callbacks", "optimizer_step"]
    assert state["data"] == [{"sequences": 0}, {"sequences": 1}] and state["callbacks"] == {"Counter": {"n": 0}}


def test_pruning_keeps_the_newest_and_never_the_last_good_one_for_a_bad_one(tmp_path):
    checkpoints, model = _attached(tmp_path, keep=2)
    for step in (1, 2, 3):
        _save(checkpoints, model, step)
    assert [p.name for p in checkpoints.step_folders()] == ["step_00000002", "step_00000003"]
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))          # a diverged run
    with pytest.raises(write_guards.NonFiniteWeightsError):
        _save(checkpoints, model, 4)
    assert [p.name for p in checkpoints.step_folders()] == ["step_00000002", "step_00000003"]
    assert checkpoints.newest()[0].name == "step_00000003" and checkpoints.last.name == "step_00000003"


def test_resume_hands_every_part_its_state_under_its_key(tmp_path):
    checkpoints, model = _attached(tmp_path, cursor=7, n=5)
    torch.manual_seed(11)
    written = _save(checkpoints, model, 2)
    want_draw = torch.rand(3)

    resumed_from = RunCheckpoints(tmp_path)
    step_dir, _ = resumed_from.newest()
    fresh = tiny_model(seed=7)
    resumed = resumed_from.load(step_dir, fresh)
    assert (resumed.step, resumed.tokens, resumed.history) == (2, 20, [{"step": 2}])
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    data, counter, other = _Data(), _Counter(), _Counter(99)
    resumed_from.attach(engine=Engine(fresh, TCFG), data=data,
                        callbacks={"Counter": counter, "NotSaved": other})
    assert data.cursor == 7 and counter.n == 5 and other.n == 99
    assert torch.equal(torch.rand(3), want_draw)     # the RNG continues where the saved run was
    assert resumed_from.last == written and resumed_from.pending is None


def test_a_resume_under_another_number_of_data_shards_is_refused(tmp_path):
    checkpoints, model = _attached(tmp_path)
    _save(checkpoints, model, 1)
    resumed_from = RunCheckpoints(tmp_path)
    resumed_from.load(resumed_from.newest()[0], tiny_model())
    data = _Data()
    data.n_shards = 4
    with pytest.raises(AnnealError, match="2 data shard\\(s\\) but this run reads 4"):
        resumed_from.attach(engine=Engine(tiny_model(), TCFG), data=data, callbacks={})


def test_export_route(tmp_path):
    checkpoints, model = _attached(tmp_path)
    assert checkpoints.export_source(10, world=2) is None          # no checkpoint yet
    written = _save(checkpoints, model, 1)
    assert checkpoints.export_source(10, world=1) is None          # one process: the model in memory
    assert checkpoints.export_source(10, world=2) == written       # several: stream the final checkpoint
    assert checkpoints.export_source(20, world=2) is None          # it is not the final state
    (written / "meta.json").write_text("{torn")
    assert checkpoints.export_source(10, world=2) is None


def test_an_unknown_format_is_refused_once_with_the_folder_named(tmp_path):
    checkpoints, model = _attached(tmp_path)
    written = _save(checkpoints, model, 1)
    marker = json.loads((written / "checkpoint.json").read_text())
    (written / "checkpoint.json").write_text(json.dumps({**marker, "format": "anneal-gathered/0"}))
    # still a committed checkpoint: a resume takes it and refuses it loudly instead of an older step
    assert checkpoints.newest()[0] == written
    for read in (lambda: checkpoints.load(written, tiny_model()), lambda: training_state.read_weights(written)):
        with pytest.raises(AnnealError, match=rf"{written}: checkpoint format 'anneal-gathered/0', "
                                              rf"this version reads 'anneal-dcp/1'"):
            read()
    (written / "checkpoint.json").unlink()
    (written / "model.safetensors").write_bytes(b"")   # the gathered layout no released version wrote
    with pytest.raises(AnnealError, match=rf"{written}: no checkpoint.json"):
        training_state.read_weights(written)
    assert checkpoints.newest() == (None, None)


def test_export_meta_reads_an_exports_anneal_meta(tmp_path):
    assert export_meta(tmp_path) == {}
    (tmp_path / "anneal_meta.json").write_text(json.dumps({"lr": 1e-5}))
    assert export_meta(tmp_path) == {"lr": 1e-5}
    (tmp_path / "anneal_meta.json").write_text("not json")
    with pytest.raises(AnnealError, match="anneal_meta.json: not readable as JSON"):
        export_meta(tmp_path)
