"""The host side of a training layout (`anneal-plan memory`): host memory per GPU and per node,
PCIe traffic per step, and a step-time estimate from measured rates.

Host memory per rank (GiB, as the GPU plan):
* with `parallel.offload=optimizer` (DeepSpeed 0.19.8 ZeRO-Offload, `DeepSpeedCPUAdam`), for the
  rank's ZeRO partition (`MemoryPlan.params_partition`), pinned: fp32 masters (4 B), AdamW m and v
  (8 B, fp32: CPU Adam keeps the masters' dtype, `memory_plan.BF16_MOMENTS`): 12 B per parameter,
  plus two pinned chunk slots when the update streams (ZeRO 2, `parallel.offload_chunk_mb` > 0,
  `deepspeed_compat.stream_offload_step`: the gradient comes down and the bf16 weights go up a chunk
  at a time from and to the GPU's fp32 partition sum). DeepSpeed's own step (offload_chunk_mb=0, or
  ZeRO 1) also keeps the whole fp32 gradient CPU Adam reads (4 B) and a bf16 copy of the updated
  partition for the upload (2 B): 18 B per parameter. Plus a staging copy of the largest parameter;
* always: the rank's process (torch, the CUDA host side, the model code) and its data pipeline
  (tokenizer worker, packing buffers);
per node: the node's ranks, plus `node_reserve_gb` (OS, page cache, launcher).

PCIe per step and GPU (offload): the fp32 gradient sum of the rank's partition goes down once per
step, whatever the micro-batch count (4 B per parameter of the partition), and the updated bf16
partition comes back up (2 B; then all-gathered over NVLink). No per-micro-batch copy: DeepSpeed sums
in fp32 on the GPU (tests/test_engine_agreement.py: 512 micro-batches within the fp32 bound).

Step time: compute + gradients down + CPU Adam + weights up, not overlapped (an upper bound). Compute:
a measured MFU x the GPU's dense bf16 peak / model FLOPs per token. The MFU is the dots1 slice's
(bench/bench_step.py, H100, compiled, bare step, native engine, micro-batch 2, vocab 4096,
bench/RESULTS.md), except with optimizer offload and full recompute, where it is the one measured on a
rank's real share in that configuration (bench/bench_rank_share.py: DeepSpeed ZeRO-2, micro-batch 1,
vocab 152,064; 35% slower per micro-batch than the slice's figure predicted, most of it ZeRO-2's
per-micro-batch gradient copies and fp32 adds by the profile in RESULTS). The
expert all-to-all is in neither (EP 2 on H200s: +4.4%, RESULTS). PCIe bandwidth and CPU Adam throughput
are parameters whose defaults are to be measured on the device (README, "Hardware").
"""
from __future__ import annotations

from dataclasses import dataclass

from anneal.memory_plan import BF16, FP32, GIB, MemoryPlan, largest_param, streams
from anneal.model.config import Dots1Config

# MFU by model.recompute, measured (bench/RESULTS.md, H100): the slice without recompute and with selective
# (triton, fused sums, one machine, 2026-12-07), full (2026-11-24); and a 12-layer rank share with optimizer
# offload and full recompute (its micro-batches only, the update apart; 2026-12-07)
SLICE_MFU = {"none": 0.530, "selective": 0.521, "full": 0.403}
OFFLOADED_SHARE_MFU = {"full": 0.299}


def compute_mfu(recompute: str, offload: bool) -> tuple[float, str]:
    """The MFU a layout's compute is estimated at, and where it was measured."""
    if offload and recompute in OFFLOADED_SHARE_MFU:
        return OFFLOADED_SHARE_MFU[recompute], "a rank's share with offload"
    return SLICE_MFU[recompute], "the dots1 slice"


@dataclass(frozen=True)
class HostRates:
    """Rates the step time is estimated from. PCIe and CPU Adam defaults are measured by
    bench/bench_rank_share.py on one H100 machine (16 cores, bench/RESULTS.md); a dual-socket
    8-GPU node has several times those cores and memory bandwidth, so the CPU Adam default is a
    floor: measure yours with the same script and pass --cpu-adam-params-per-s."""
    peak_tflops: float = 989.0            # dense bf16, H100 and H200
    pcie_gb_s: float = 54.0               # pinned host<->GPU copies per GPU, GB/s (10^9); measured 53.9-55.5 (Gen5 x16)
    cpu_adam_params_per_s: float = 4e9    # DeepSpeedCPUAdam, fp32 state; measured 4.0-4.25B/s on 16 cores
    gpu_adam_bytes_per_s: float = 2e12    # fused AdamW on the GPU, ~36 B per parameter of HBM traffic
    process_gb: float = 8.0               # host memory of one rank's process (torch, CUDA, the model code)
    data_gb: float = 4.0                  # one rank's data pipeline (tokenizer worker, packing)
    node_reserve_gb: float = 64.0         # OS, page cache, the launcher


@dataclass(frozen=True)
class HostPlan:
    rows: dict[str, float]                # component -> GiB per rank
    ranks_per_node: int
    node_total: float                     # GiB
    host_mem_gb: float | None
    times: dict[str, float]               # step-time component -> seconds
    pcie_gb: dict[str, float]             # direction -> GB (10^9) per GPU per step
    micro_batches: int                    # per rank per step
    tokens_per_s: float                   # the whole job's
    mfu: tuple[float, str] = (0.0, "")    # the compute estimate's MFU and where it was measured

    @property
    def fits(self) -> bool:
        return self.host_mem_gb is None or self.node_total <= self.host_mem_gb

    @property
    def step_s(self) -> float:
        return sum(self.times.values())

    @property
    def optimizer_share(self) -> float:
        return (self.times.get("CPU Adam", 0.0) + self.times.get("weights up (PCIe)", 0.0)
                + self.times.get("AdamW (GPU)", 0.0)) / self.step_s


def plan_host(cfg: Dots1Config, plan: MemoryPlan, rates: HostRates = HostRates()) -> HostPlan:
    """Host memory, PCIe traffic and step time of the layout `plan` was made for."""
    lay, part = plan.layout, plan.params_partition
    offload = lay.offload == "optimizer"
    rows = {}
    if offload:
        rows = {"fp32 masters": FP32 * part, "AdamW m + v (fp32)": 2 * FP32 * part}
        if streams(lay):
            chunk = min(part, lay.offload_chunk_mb * 2 ** 20 / FP32)
            rows["streaming slots (2 chunks, fp32 + bf16)"] = 2 * (FP32 + BF16) * chunk
        else:  # DeepSpeed's own step (its staging buffer of the largest parameter too)
            rows |= {"fp32 gradient": FP32 * part, "bf16 partition (upload)": BF16 * part,
                     "staging (largest param)": BF16 * largest_param(cfg, lay)}
        rows = {k: v / GIB for k, v in rows.items()}
    rows |= {"process": rates.process_gb, "data pipeline": rates.data_gb}
    ranks = min(lay.gpus, lay.gpus_per_node)
    node_total = ranks * sum(rows.values()) + rates.node_reserve_gb

    per_micro = lay.gpus * lay.micro_batch * lay.seq
    micro = max(1, lay.batch_tokens // per_micro) if lay.batch_tokens else 1
    step_tokens = micro * per_micro
    mfu = compute_mfu(lay.recompute, offload)
    gpu_tokens_s = mfu[0] * rates.peak_tflops * 1e12 / cfg.train_flops_per_token(lay.seq)
    times = {"compute": step_tokens / lay.gpus / gpu_tokens_s}
    pcie = {}
    if offload:
        pcie = {"gradients down (fp32, once)": FP32 * part / 1e9, "weights up (bf16)": BF16 * part / 1e9}
        times["gradients down (PCIe)"] = pcie["gradients down (fp32, once)"] / rates.pcie_gb_s
        times["CPU Adam"] = ranks * part / rates.cpu_adam_params_per_s
        times["weights up (PCIe)"] = pcie["weights up (bf16)"] / rates.pcie_gb_s
    else:
        times["AdamW (GPU)"] = 36 * part / rates.gpu_adam_bytes_per_s
    return HostPlan(rows, ranks, node_total, lay.host_mem_gb, times, pcie, micro,
                    step_tokens / sum(times.values()), mfu)


def format_host_plan(hp: HostPlan, rates: HostRates, total_tokens: int | None = None) -> str:
    lines = ["", f"{'host, per GPU':<28}{'GiB':>9}"]
    lines += [f"{k:<28}{v:>9.2f}" for k, v in hp.rows.items()]
    avail = f" of {hp.host_mem_gb:g}" if hp.host_mem_gb is not None else " (--host-mem-gb not given: not checked)"
    lines += [f"{'per node':<28}{hp.node_total:>9.1f}{avail}  ({hp.ranks_per_node} ranks + "
              f"{rates.node_reserve_gb:g} GiB reserve)",
              f"host fits: {'yes' if hp.fits else 'NO'}", "",
              f"step: {hp.micro_batches} micro-batch(es) per GPU; estimate (rates: {rates.peak_tflops:g} TFLOP/s peak, "
              f"PCIe {rates.pcie_gb_s:g} GB/s, CPU Adam {rates.cpu_adam_params_per_s / 1e9:g}B params/s per node, "
              f"measured on a 16-core H100 machine)"]
    where = f"   at {hp.mfu[0]:.1%} MFU, measured on {hp.mfu[1]}"
    lines += [f"  {k:<26}{v:>9.1f} s" + (where if k == "compute" else "") for k, v in hp.times.items()]
    lines.append(f"  {'step':<26}{hp.step_s:>9.1f} s   optimizer share {hp.optimizer_share:.1%}, "
                 f"{hp.tokens_per_s:,.0f} tokens/s")
    if hp.pcie_gb:
        lines.append("PCIe per GPU per step: " + ", ".join(f"{k} {v:,.0f} GB" for k, v in hp.pcie_gb.items()))
    if total_tokens:
        days = total_tokens / hp.tokens_per_s / 86400
        lines.append(f"wall clock for the recipe's {total_tokens / 1e9:g}B tokens: {days:.1f} days")
    return "\n".join(lines)


def why_not(plan: MemoryPlan, hp: HostPlan) -> str | None:
    """One line on why the layout does not fit (GPU or host), naming the largest row; None: it fits."""
    if not plan.fits:
        big = max(plan.rows, key=plan.rows.get)
        others = [f"{m} {g:.1f}" for m, g in plan.activations_by_mode.items() if m != plan.layout.recompute]
        hint = f"; activations under model.recompute={', '.join(others)} GiB"
        off = "" if plan.layout.offload == "optimizer" else ", or parallel.offload=optimizer"
        return (f"{plan.total:.1f} GiB per GPU of {plan.usable:.1f} usable (largest: {big} {plan.rows[big]:.1f} GiB"
                f"{hint}): use more GPUs or a larger parallel.ep_size{off}")
    if not hp.fits:
        big = max(hp.rows, key=hp.rows.get)
        return (f"host memory: {hp.node_total:.0f} GiB per node of {hp.host_mem_gb:.0f} ({hp.ranks_per_node} ranks x "
                f"{sum(hp.rows.values()):.0f} GiB, largest: {big} {hp.rows[big]:.0f} GiB): use more nodes "
                f"(a larger parallel.ep_size spreads the experts' optimizer state) or hosts with more memory")
    return None


def fit_summary(plan: MemoryPlan, hp: HostPlan) -> str:
    """The verdict line of `anneal-plan memory`."""
    reason = why_not(plan, hp)
    if reason:
        return f"fits: NO: {reason}"
    host = f"{hp.node_total:.0f} of {hp.host_mem_gb:g} GiB" if hp.host_mem_gb is not None else \
        f"{hp.node_total:.0f} GiB (not checked)"
    return (f"fits: yes: {plan.total:.1f} of {plan.usable:.1f} GiB per GPU ({plan.layout.recompute} recompute "
            f"activations {plan.rows['activations / micro-batch']:.1f} GiB), host {host} per node")
