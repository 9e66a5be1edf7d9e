"""The memory planner (anneal/memory_plan.py) against the peak GPU memory measured on one H100
(bench/results/bench_step.json), its dots1 answers, and `anneal-plan memory`."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from anneal.cli import plan_main
from anneal.errors import AnnealError
from anneal.memory_plan import Layout, param_split, plan_memory
from anneal.model.config import Dots1Config

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_rows():
    sys.path.insert(0, str(BENCH))
    from bench_step import slice_arch

    for r in json.loads((BENCH / "results" / "bench_step.json").read_text()):
        args = SimpleNamespace(vocab=r["vocab"], dense_layers=1, moe_layers=3, experts=16, top_k=6, seq=r["seq"])
        yield r, Dots1Config.from_hf_dict(slice_arch(args), "bench slice")


@pytest.mark.parametrize("row", range(len(json.loads((BENCH / "results" / "bench_step.json").read_text()))))
def test_planner_within_10_percent_of_the_measured_peak(row):
    r, cfg = list(_bench_rows())[row]
    lay = Layout(gpus=1, ep_size=1, zero_stage=1, engine=r["engine"], micro_batch=r["micro_batch"], seq=r["seq"],
                 grad_ckpt=r["grad_ckpt"], compile=r["compile"], grad_accum=r.get("accum", "fp32"))
    planned = plan_memory(cfg, lay).total
    assert abs(planned / r["peak_mem_gb"] - 1) < 0.10, (r["engine"], r["backend"], planned, r["peak_mem_gb"])


def test_dots1_layouts():
    """The README's answer: 32 x 80 GB cannot hold the training state at all; 64 and 128 fit with
    EP >= 32, ZeRO-2 and gradient checkpointing; nothing fits without checkpointing."""
    cfg = Dots1Config()
    p_ne, p_e = param_split(cfg)
    assert (p_ne + p_e) / 1e9 == pytest.approx(142.8, abs=0.1) and p_e / 1e9 == pytest.approx(135.1, abs=0.1)
    plan = lambda **kw: plan_memory(cfg, Layout(**{"zero_stage": 2, "grad_ckpt": True, **kw}))  # noqa: E731
    for ep in (8, 16, 32):
        assert not plan(gpus=32, ep_size=ep).fits
    assert plan(gpus=64, ep_size=64).fits and plan(gpus=64, ep_size=32).fits and not plan(gpus=64, ep_size=8).fits
    assert plan(gpus=128, ep_size=32, micro_batch=2).fits
    assert not plan(gpus=64, ep_size=64, zero_stage=1).fits
    assert not plan(gpus=128, ep_size=128, grad_ckpt=False).fits
    # ZeRO partitions masters + AdamW over all ranks whatever the EP size: 12 B x 142.8B / world
    p = plan(gpus=64, ep_size=32)
    assert (p.rows["fp32 masters"] + p.rows["AdamW m + v (fp32)"]) * 2**30 == pytest.approx(12 * (p_ne + p_e) / 64)


def test_cli_prints_the_table_and_one_clear_error(capsys):
    plan_main(["memory", "recipe=dots1_anneal", "--gpus", "64", "parallel.ep_size=64",
               "model.gradient_checkpointing=true", "trainer.micro_batch_size=1"])
    out = capsys.readouterr().out
    assert "142.8B parameters" in out and "EP 64" in out and "fits: yes" in out
    for row in ("bf16 weights", "fp32 masters", "fp32 grad accumulators", "AdamW m + v", "activations / micro-batch",
                "all-to-all buffers", "total"):
        assert row in out
    with pytest.raises(SystemExit):
        plan_main(["memory", "recipe=dots1_anneal", "--gpus", "48", "parallel.ep_size=32"])
    assert "parallel.ep_size=32 must divide the number of GPUs (--gpus 48)" in capsys.readouterr().err
    with pytest.raises(AnnealError, match="parallel.ep_size=3 must divide the expert count"):
        plan_memory(Dots1Config(), Layout(gpus=3, ep_size=3))


@pytest.mark.parametrize("name, gpus", [("dots1_64gpu", 64), ("dots1_128gpu", 128)])
def test_bundled_dots1_layouts_compose_and_fit(name, gpus):
    from anneal.cli import compose
    from anneal.memory_plan import layout_from_config, model_config_for_plan

    cfg = compose(["recipe=dots1_anneal", f"parallel={name}"])
    lay = layout_from_config(cfg, gpus, 8, 80.0, 6.0)
    assert lay.grad_ckpt and lay.zero_stage == 2 and lay.engine == "deepspeed"
    assert plan_memory(model_config_for_plan(cfg)[0], lay).fits
