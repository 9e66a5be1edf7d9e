"""The DeepSpeed engine on CPU (gloo, 2 processes): ZeRO stage 1 and 2 with EP=2 give the same
losses, grad norms, weights and router biases as our single-process Engine on the same batches."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed")

from _dist import run_distributed  # noqa: E402
from anneal.errors import AnnealError  # noqa: E402
from anneal.train.engine import Engine  # noqa: E402
from moe import ep  # noqa: E402
from test_ep import TINY, _loss, tiny_model  # noqa: E402

TCFG = SimpleNamespace(micro_batch_size=1, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=0.5, bf16=False)
STEPS, LRS, RATE = 3, [3e-3, 2e-3, 1e-3], 1e-2


def _data(world: int):
    g = torch.Generator().manual_seed(5)
    # per step: world ranks x 2 micro-batches x 1 sequence of 13 tokens
    return torch.randint(0, TINY["vocab_size"], (STEPS, world, 2, 1, 13), generator=g)


def _reference(world: int):
    model = tiny_model()
    engine = Engine(model, TCFG)
    data, out = _data(world), []
    for s in range(STEPS):
        losses = []
        for m in range(2):  # micro-batch m = the m-th micro-batch of every rank
            loss = _loss(model, data[s, :, m].reshape(world, -1))
            engine.backward(loss / 2)
            losses.append(float(loss))
        norm = engine.step(LRS[s])
        for r in model.routers().values():
            r.update_bias(RATE, r.expert_load)
        out.append((sum(losses) / 2, norm))
    return model, out


def _train_steps(engine, model, rank, world, steps, check=None):
    data = _data(world)
    for s in steps:
        losses = []
        for m in range(2):
            loss = _loss(model, data[s, rank, m])
            engine.backward(loss / 2)
            losses.append(loss.detach())
        norm = engine.step(LRS[s])
        engine.reduce_expert_load(model.routers())
        for r in model.routers().values():
            r.update_bias(RATE, r.expert_load)
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean)
        if check is not None:
            assert abs(float(mean) / world - check[s][0]) < 1e-5, (s, float(mean) / world, check[s][0])
            assert abs(norm - check[s][1]) < 1e-4 * max(1.0, check[s][1]), (s, norm, check[s][1])


def _dropped_steps_leave_no_trace(engine, model, rank):
    """A step with NaN gradients (DeepSpeed drops it) and a vetoed step (`skip_step`) change no
    weight, and the router-bias hook forgets their load: the next steps still match the reference."""
    from anneal.train.balance import RouterBalance

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    junk = torch.randint(0, TINY["vocab_size"], (1, 13), generator=torch.Generator().manual_seed(99 + rank))
    engine.add_post_step_hook(RouterBalance(model.routers(), RATE))
    engine.backward(_loss(model, junk) * float("nan"))
    norm = engine.step(1.0)
    assert not engine.step_applied and not math.isfinite(norm), norm
    engine.backward(_loss(model, junk))
    engine.skip_step()
    assert not engine.step_applied
    engine.post_step_hooks.clear()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert all(float(r.expert_load.sum()) == 0 for r in model.routers().values())


def _worker(rank, world, root, ep_size, zero_stage, offload="none"):
    from pathlib import Path

    from anneal.checkpoints import training_state
    from anneal.checkpoints.run_checkpoints import RunCheckpoints
    from anneal.parallel import ds_engine
    from test_dcp_checkpoint import _NoData

    ds_engine.init_distributed("cpu")
    ref_model, ref = _reference(world)
    model = tiny_model()
    engine = ds_engine.DeepSpeedEngine(model, TCFG, ep_size=ep_size, zero_stage=zero_stage, offload=offload)
    assert engine.engine.has_moe_layers
    assert (type(engine.engine.optimizer.optimizer).__name__ == "DeepSpeedCPUAdam") == (offload == "optimizer")
    assert any(g.get("moe") for g in engine.engine.optimizer.param_groups)
    _train_steps(engine, model, rank, world, range(STEPS - 1), ref)
    _dropped_steps_leave_no_trace(engine, model, rank)
    # a checkpoint as the trainer writes one: every rank its ZeRO fragments through DCP, nothing gathered
    checkpoints = RunCheckpoints(Path(root) / "ckpt")
    checkpoints.attach(engine=engine, data=_NoData(), callbacks={})
    step_dir = checkpoints.save(STEPS - 1, STEPS - 1, history=[], hf_config=model.config.to_hf_dict(), meta={})
    _train_steps(engine, model, rank, world, [STEPS - 1], ref)

    start, stop = model.expert_range
    ref_params = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        want = ref_params[n].detach()
        if ep.is_expert_param(p):
            want = want[start:stop]
        torch.testing.assert_close(p.detach(), want, atol=2e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    for (i, r), rr in zip(model.routers().items(), ref_model.routers().values()):
        torch.testing.assert_close(r.e_score_correction_bias, rr.e_score_correction_bias)

    # resume into a fresh model and engine, repeat the last step: same result
    model2 = tiny_model(seed=7)
    resume = RunCheckpoints(Path(root) / "ckpt")
    resume.load(step_dir, model2)   # the weights before the engine is built, as the trainer does
    engine2 = ds_engine.DeepSpeedEngine(model2, TCFG, ep_size=ep_size, zero_stage=zero_stage, offload=offload)
    resume.attach(engine=engine2, data=_NoData(), callbacks={})
    _train_steps(engine2, model2, rank, world, [STEPS - 1], ref)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(q.detach(), p.detach(), atol=1e-6, rtol=1e-6, msg=lambda m: f"resumed {n}: {m}")

    # the layout it was written under is recorded (a resume reshards to any other: test_dcp_checkpoint)
    assert training_state.read_marker(step_dir)["layout"] == {"world_size": world, "ep_size": ep_size,
                                                              "zero_stage": zero_stage, "engine": "deepspeed"}


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_ep2_zero_matches_single_process_engine(zero_stage, tmp_path):
    run_distributed(_worker, 2, str(tmp_path), 2, zero_stage)


@pytest.mark.slow
def test_ep2_zero2_offload_matches_single_process_engine(tmp_path):
    """parallel.offload=optimizer (DeepSpeed's CPU Adam): the same steps, the NaN and vetoed steps
    dropped with the router-bias hook forgetting their load, and the resume from a checkpoint."""
    run_distributed(_worker, 2, str(tmp_path), 2, 2, "optimizer")


def test_config_from_trainer_config_and_extra_keys():
    from anneal.parallel.ds_config import deepspeed_config

    cfg = deepspeed_config(TCFG, zero_stage=2, bf16=False,
                           extra={"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5})
    assert cfg["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True,
                                        "overlap_comm": True}
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["gradient_clipping"] == 0.5
    with pytest.raises(AnnealError, match=r"trainer.deepspeed.zero_optimization.stage=3 contradicts parallel.zero_stage"):
        deepspeed_config(TCFG, zero_stage=2, bf16=False, extra={"zero_optimization": {"stage": 3}})
    with pytest.raises(AnnealError, match=r"gradient_clipping=2.0 contradicts trainer.grad_clip"):
        deepspeed_config(TCFG, zero_stage=1, bf16=False, extra={"gradient_clipping": 2.0})
    with pytest.raises(AnnealError, match="optimizer and LR schedule come from the anneal config"):
        deepspeed_config(TCFG, zero_stage=1, bf16=False, extra={"optimizer": {"type": "Adam"}})
    with pytest.raises(AnnealError, match="supports ZeRO stage 1 and 2"):
        deepspeed_config(TCFG, zero_stage=3, bf16=False)


@pytest.mark.slow
def test_dp2_x_ep2_zero2_matches_single_process_engine(tmp_path):
    """4 ranks: EP groups {0,1},{2,3}; expert grads reduced over the EDP groups {0,2},{1,3}."""
    run_distributed(_worker, 4, str(tmp_path), 2, 2)


# ------------------------------------------------------------------ the trainer under DeepSpeed
def _launch(args, world: int = 1):
    """`python -m anneal ARGS` (world 1) or `torchrun --nproc-per-node world -m anneal ARGS`, one
    thread per process; it must succeed."""
    import os
    import subprocess
    import sys

    from _dist import free_port

    launcher = [sys.executable, "-m", "anneal"] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
         "--master-port", str(free_port()), "-m", "anneal"]
    r = subprocess.run(launcher + list(args), env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _anneal(root, *args, world: int = 1):
    """A short CPU anneal of the tests below (they stop it after at most 4 steps) in run folder `root`."""
    common = ["trainer.device=cpu", "trainer.micro_batch_size=4", "trainer.ckpt_every=8192", "logging.wandb=false",
              "logging.progress=false", "logging.plots=false", f"run.root={root}"]
    return _launch(common + list(args), world)


def _losses(root, name):
    import json

    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def native_4_steps(tmp_path_factory):
    """The one-process reference of the DeepSpeed runs below: 4 steps on the 2 data shards that the
    2-rank runs read (one per rank)."""
    root = tmp_path_factory.mktemp("native")
    _anneal(root, "trainer.stop_after_steps=4", "run.name=native", "data.shards=2")
    return _losses(root, "native")


def _same_numbers(want, got, what):
    assert [s for s, _, _ in got] == [1, 2, 3, 4], what
    for (s, lw, gw), (_, lg, gg) in zip(want, got):
        assert abs(lw - lg) < 1e-5 and abs(gw - gg) < 1e-4, (what, s, lw, lg, gw, gg)


@pytest.mark.slow
def test_anneal_under_torchrun_ep2_matches_native_and_resumes(tmp_path, native_4_steps):
    """`torchrun --nproc-per-node 2 -m anneal trainer.engine=deepspeed parallel.ep_size=2
    parallel.a2a_overlap=true`: the same losses as the one-process run (plain schedule) on the same
    data shards, exact resume, and a resume under another layout (EP 1) continues with the same
    losses (the checkpoint is resharded)."""
    # the DeepSpeed runs use the paired schedule (parallel.a2a_overlap): it gives the plain one's numbers
    ds = ["trainer.engine=deepspeed", "parallel.ep_size=2", "parallel.zero_stage=2", "parallel.a2a_overlap=true"]
    _anneal(tmp_path, "trainer.stop_after_steps=2", "run.name=ds", *ds, world=2)
    _anneal(tmp_path, "trainer.stop_after_steps=3", "run.name=ds", "run.resume=true", *ds, world=2)
    assert [s for s, _, _ in _losses(tmp_path, "ds")] == [1, 2, 3]
    _anneal(tmp_path, "trainer.stop_after_steps=4", "run.name=ds", "run.resume=true",
            "trainer.engine=deepspeed", "parallel.ep_size=1", "parallel.a2a_overlap=true", world=2)
    _same_numbers(native_4_steps, _losses(tmp_path, "ds"), "ds")


@pytest.mark.slow
def test_anneal_with_optimizer_offload_resumes_without_it_and_back(tmp_path, native_4_steps):
    """`parallel.offload=optimizer` under torchrun, EP 2, ZeRO 2 (DeepSpeed's CPU Adam on CPU with
    gloo): the one-process run's losses and grad norms, through a run saved with offload that resumes
    without it, and saved without it, resumes with it, continuing with the same numbers (the same DCP
    checkpoint: fp32 masters and AdamW moments, whichever optimizer held them)."""
    ds = ["trainer.engine=deepspeed", "parallel.ep_size=2", "parallel.zero_stage=2"]
    cpu_adam = "DeepSpeedCPUAdam on fp32 masters in host memory (parallel.offload=optimizer)"
    for steps, offload in ((2, "optimizer"), (3, "none"), (4, "optimizer")):
        resume = ["run.resume=true"] if steps > 2 else []
        r = _anneal(tmp_path, f"trainer.stop_after_steps={steps}", "run.name=switch", *resume, *ds,
                    f"parallel.offload={offload}", world=2)
        assert (cpu_adam in r.stdout) == (offload == "optimizer"), (steps, offload, r.stdout[-2000:])
    _same_numbers(native_4_steps, _losses(tmp_path, "switch"), "offload on -> off -> on")


@pytest.mark.slow
def test_anneal_under_torchrun_runs_to_the_end_and_exports_the_whole_model(tmp_path):
    """Both anneal stages under DeepSpeed with EP=2, then the streamed export (each rank its own
    experts' shards): the same weights as the one-process run's export, loadable by transformers
    with the trained model's logits."""
    import json

    import transformers
    from safetensors.torch import load_file

    common = ["trainer.device=cpu", "trainer.micro_batch_size=4", "logging.wandb=false", "logging.progress=false",
              "logging.plots=false", "export.dtype=float32", "schedule.stages.0.tokens=8192",
              "schedule.stages.1.tokens=4096", f"run.root={tmp_path}"]
    _launch([*common, "run.name=native", "data.shards=2"])
    r = _launch([*common, "run.name=ds", "trainer.engine=deepspeed", "parallel.ep_size=2"], world=2)
    assert "peak host memory per rank" in r.stdout
    a = load_file(str(tmp_path / "native" / "hf" / "model.safetensors"))
    # streamed export: rank 0 wrote the dense tensors and experts 0-7, rank 1 experts 8-15, into
    # their own shards, covered by one index
    index = json.loads((tmp_path / "ds" / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.1.mlp.experts.0.down_proj.weight"] == "model-00001-of-00002.safetensors"
    assert index["model.layers.1.mlp.experts.15.down_proj.weight"] == "model-00002-of-00002.safetensors"
    assert index["lm_head.weight"] == "model-00001-of-00002.safetensors"
    b = {}
    for f in sorted(set(index.values())):
        b.update(load_file(str(tmp_path / "ds" / "hf" / f)))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ds" / "hf", dtype=torch.float32).eval()
    assert hf.config.n_routed_experts == 16
    # the trained model (the final checkpoint's fp32 masters) and the export give the same logits
    from anneal.checkpoints import training_state
    from anneal.model.config import Dots1Config
    from anneal.model.dots1 import Dots1ForCausalLM

    step = training_state.latest_checkpoint(tmp_path / "ds" / "ckpt")
    trained = Dots1ForCausalLM(Dots1Config.from_json(step / "config.json"))
    training_state.load_checkpoint(step, trained)
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, trained(ids), atol=1e-4, rtol=1e-4)
