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
                 recompute="full" if r["grad_ckpt"] else "none", compile=r["compile"], grad_accum=r.get("accum", "fp32"))
    planned = plan_memory(cfg, lay).total
    assert abs(planned / r["peak_mem_gb"] - 1) < 0.10, (r["engine"], r["backend"], planned, r["peak_mem_gb"])


def test_dots1_layouts():
    """The README's answer: 32 x 80 GB cannot hold the training state at all; 64 and 128 fit with
    EP >= 32, ZeRO-2 and gradient checkpointing; nothing fits without checkpointing."""
    cfg = Dots1Config()
    p_ne, p_e = param_split(cfg)
    assert (p_ne + p_e) / 1e9 == pytest.approx(142.8, abs=0.1) and p_e / 1e9 == pytest.approx(135.1, abs=0.1)
    plan = lambda **kw: plan_memory(cfg, Layout(**{"zero_stage": 2, "recompute": "full", **kw}))  # noqa: E731
    for ep in (8, 16, 32):
        assert not plan(gpus=32, ep_size=ep).fits
    assert plan(gpus=64, ep_size=64).fits and plan(gpus=64, ep_size=32).fits and not plan(gpus=64, ep_size=8).fits
    assert plan(gpus=128, ep_size=32, micro_batch=2).fits
    assert not plan(gpus=64, ep_size=64, zero_stage=1).fits
    assert not plan(gpus=128, ep_size=128, recompute="none").fits
    # ZeRO partitions masters + AdamW over all ranks whatever the EP size: 12 B x 142.8B / world
    p = plan(gpus=64, ep_size=32)
    assert (p.rows["fp32 masters"] + p.rows["AdamW m + v (fp32)"]) * 2**30 == pytest.approx(12 * (p_ne + p_e) / 64)


def test_cli_prints_the_table_and_one_clear_error(capsys):
    plan_main(["memory", "recipe=dots1_anneal", "--gpus", "64", "parallel.ep_size=64",
               "model.recompute=full", "trainer.micro_batch_size=1"])
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
    assert lay.recompute == "full" and lay.zero_stage == 2 and lay.engine == "deepspeed"
    assert plan_memory(model_config_for_plan(cfg)[0], lay).fits


def test_offload_layouts_and_the_issues_arithmetic():
    """What ZeRO-Offload keeps (anneal.host_plan, anneal.memory_plan): on the GPU an fp32 sum of the
    partition's gradients; on the host, with the streamed update (the default), 12 B per parameter
    of the partition (fp32 masters, fp32 m and v) plus two chunk slots, and with DeepSpeed 0.19.8's
    own step (parallel.offload_chunk_mb=0) 18 B (also the fp32 gradient and the bf16 upload copy).
    One node of 8 x 141 GB (EP 8: 24.6B parameters per GPU) fits the GPU with full recompute but not
    selective; its host needs 1762 GiB streamed (fits 2 TiB) and 2563 GiB with DeepSpeed's step
    (3 TiB). bf16 moments are refused (CPU Adam would need bf16 masters). 16 x 80 GB fits with full
    recompute on 2 TiB hosts, not with selective."""
    from anneal.cli import compose
    from anneal.host_plan import HostRates, plan_host, why_not
    from anneal.memory_plan import layout_from_config, model_config_for_plan

    def plans(overrides, gpus, gpu_gb, host_gb=2048.0):
        cfg = compose(["recipe=dots1_anneal", *overrides])
        mcfg = model_config_for_plan(cfg)[0]
        plan = plan_memory(mcfg, layout_from_config(cfg, gpus, 8, gpu_gb, 6.0, host_gb))
        return plan, plan_host(mcfg, plan, HostRates())

    def states(host):
        return sum(v for k, v in host.rows.items() if k.startswith(("fp32", "AdamW", "bf16"))) * host.ranks_per_node

    p_ne, p_e = param_split(Dots1Config())
    plan, host = plans(["parallel=dots1_8gpu_offload"], 8, 141.0)
    assert plan.params_local / 1e9 == pytest.approx(24.57, abs=0.01) and plan.fits
    assert states(host) * 2**30 == pytest.approx(12 * (p_ne + p_e))
    assert host.rows["streaming slots (2 chunks, fp32 + bf16)"] * 2**30 == pytest.approx(2 * 6 * 256 * 2**20 / 4)
    assert plan.rows["fp32 grad partition sum"] * 2**30 == pytest.approx(4 * plan.params_partition)
    # one fp32 copy of the partition down per step, whatever the micro-batch count; bf16 weights up
    assert host.pcie_gb == pytest.approx({"gradients down (fp32, once)": 4 * plan.params_partition / 1e9,
                                          "weights up (bf16)": 2 * plan.params_partition / 1e9})
    assert host.node_total == pytest.approx(1762, abs=1) and host.fits
    # the engine asks the same question (and then has DeepSpeed pin nothing): ZeRO 2, bf16 + fp32 sums, chunks
    from anneal.parallel.ds_config import update_streams
    assert update_streams("optimizer", 2, True, 256) and not update_streams("optimizer", 1, True, 256)
    assert not update_streams("optimizer", 2, False, 256) and not update_streams("optimizer", 2, True, 0)
    assert not update_streams("none", 2, True, 256)
    assert "offload staging (largest param)" not in plan.rows and "staging (largest param)" not in host.rows
    plan, host = plans(["parallel=dots1_8gpu_offload", "parallel.offload_chunk_mb=0"], 8, 141.0)
    assert states(host) * 2**30 == pytest.approx(18 * (p_ne + p_e))
    assert host.node_total == pytest.approx(2563, abs=1) and not host.fits and "host memory" in why_not(plan, host)
    assert plans(["parallel=dots1_8gpu_offload", "parallel.offload_chunk_mb=0"], 8, 141.0, 3072.0)[1].fits
    plan, host = plans(["parallel=dots1_8gpu_offload", "model.recompute=selective"], 8, 141.0, 3072.0)
    assert not plan.fits and "per GPU" in why_not(plan, host)
    with pytest.raises(AnnealError, match="offload_moments=bf16: DeepSpeed's CPU Adam keeps AdamW's moments in the "
                                          "masters' dtype"):
        plans(["parallel=dots1_8gpu_offload", "parallel.offload_moments=bf16"], 8, 141.0)
    plan, host = plans(["parallel=dots1_16gpu_offload"], 16, 80.0)
    assert plan.fits and host.fits
    plan, host = plans(["parallel=dots1_16gpu_offload", "model.recompute=selective"], 16, 80.0)
    assert not plan.fits and "per GPU" in why_not(plan, host)


def test_short_recipe_prints_its_wall_clock(capsys):
    plan_main(["memory", "recipe=dots1_anneal_short", "--gpus", "8", "--gpu-mem-gb", "141", "--host-mem-gb", "3072"])
    out = capsys.readouterr().out
    assert "wall clock for the recipe's 20B tokens" in out and "fits: yes" in out and "optimizer share" in out
    # offload + full recompute: compute at the MFU measured in that configuration, not the slice's
    assert "at 29.9% MFU, measured on a rank's share with offload" in out


def test_compute_mfu_follows_the_layout():
    from anneal.host_plan import OFFLOADED_SHARE_MFU, SLICE_MFU, compute_mfu

    assert compute_mfu("full", offload=True)[0] == OFFLOADED_SHARE_MFU["full"] < SLICE_MFU["full"]
    assert compute_mfu("full", offload=False)[0] == SLICE_MFU["full"]
    assert compute_mfu("selective", offload=True)[0] == SLICE_MFU["selective"]  # not measured with offload


def test_startup_refuses_a_layout_that_does_not_fit(tmp_path):
    """Refused in prepare() before any weights are read (the dots1 checkpoint is not on this machine)."""
    import torch

    from anneal.cli import compose
    from anneal.parallel.layout import ParallelLayout
    from anneal.train.build import check_layout_fits, prepare

    cfg = compose(["recipe=dots1_anneal", "parallel=dots1_16gpu_offload", "parallel.ep_size=1"])
    with pytest.raises(AnnealError, match="does not fit .*host memory: .* per node of 512"):
        check_layout_fits(cfg, ParallelLayout(), torch.device("cpu"), host_mem_gb=512)
    with pytest.raises(AnnealError, match="does not fit .* GiB per GPU of 74.0 usable"):
        check_layout_fits(cfg, ParallelLayout(), torch.device("cpu"), gpu_mem_gb=80, host_mem_gb=1e9)
    with pytest.raises(AnnealError, match="does not fit"):
        prepare(cfg, tmp_path, torch.device("cpu"), ParallelLayout())
