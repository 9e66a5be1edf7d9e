"""Run a function in N CPU processes with a gloo process group (tests of EP and the DeepSpeed engine)."""
from __future__ import annotations

import datetime
import faulthandler
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, env: dict) -> None:
    faulthandler.enable()  # a C++ abort prints every thread's Python stack instead of nothing
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world), **env})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    # The worker passed: leave without the interpreter's teardown, where DeepSpeed's and gloo's C++
    # objects are destroyed in no fixed order. CI once saw a worker die of SIGABRT ("terminate
    # called without an active exception") with no Python error; faulthandler shows where if again.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world: int, *args, env: dict | None = None) -> None:
    """Spawn `world` processes running fn(rank, world, *args) under a gloo group; re-raises a
    failure of any of them. `fn` must be importable (a module-level function)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args, env or {}), nprocs=world, join=True)


def run_on_one_gpu(fn, *args) -> None:
    """fn(0, 1, *args) in one spawned process that a launcher's environment makes rank 0 of 1, so
    that `ds_engine.init_distributed("cuda")` joins an NCCL group of one (DeepSpeed on one GPU)."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.spawn(fn, args=(1, *args), nprocs=1, join=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
