"""The device a run trains on and what it is worth: device choice, compile and data-worker
defaults per device, the dense bf16 peak for MFU, peak host memory."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from anneal.errors import AnnealError

# Dense bf16 peak (TFLOP/s, no sparsity) by GPU name, for MFU; unknown devices log no MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AnnealError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu or auto")
    return torch.device(name)


def set_deterministic(setting: bool | None, device: torch.device) -> bool:
    """trainer.deterministic: null = on for CPU (measured cost in bench/RESULTS.md), off on CUDA.
    On: torch's deterministic algorithms (an op without one raises instead of varying), cuDNN
    without autotuning, and cuBLAS with a fixed workspace, so two runs, and a killed + resumed run,
    give the same bits. Uninitialized memory is not filled (nothing of ours reads it; the fill costs
    a pass over every new tensor)."""
    on = device.type == "cpu" if setting is None else bool(setting)
    torch.use_deterministic_algorithms(on)
    torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type == "cuda" and on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return on


def data_workers(setting: int | None, device: torch.device) -> int:
    """data.num_workers: null = 1 background tokenizer on CUDA, 0 on CPU. On a GPU the main process
    must keep launching kernels: tokenizing in it would stall the GPU between micro-batches, and one
    worker (1-2M tokens/s) stays ahead of a GPU step (bench/RESULTS.md). On CPU a worker only takes
    cores from the training threads."""
    return (1 if device.type == "cuda" else 0) if setting is None else setting


def host_memory_gb() -> float:
    """Resident memory of this process now (psutil)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def pinned_host_memory_gb() -> float | None:
    """Page-locked host memory torch's caching host allocator holds (in use + cached, as rounded
    blocks; part of the resident size): where ZeRO-Offload's buffers live. None without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) / 2**30
    except (AttributeError, RuntimeError):  # a torch without host allocator statistics
        return None


def available_host_memory_gb() -> float:
    """Memory this machine can still give without swapping (GiB; psutil's `available`, Linux's
    MemAvailable): what the OS, the launcher and other jobs hold is already out of it, so no
    reserve is guessed."""
    import psutil

    return psutil.virtual_memory().available / 2**30


def peak_host_memory_gb() -> float:
    """Peak resident memory of this process since it started or since `reset_peak_host_memory`
    (Linux VmHWM; elsewhere ru_maxrss, which is never reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20   # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_host_memory() -> bool:
    """Restart the peak at the current resident size (Linux: `5` to /proc/self/clear_refs), so each
    job of `anneal --multirun`, which Hydra runs one after another in one process, reports its own
    peak (psutil has no peak RSS on Linux; ru_maxrss is the process's). False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
