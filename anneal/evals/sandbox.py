"""Run model-written code (HumanEval pass@1) away from everything that matters: a subprocess of
the same Python in isolated mode (`-I`: no site, no user paths, no PYTHON* variables), an empty
environment, a fresh temporary folder as its working directory, a CPU-time and an address-space
limit, a wall-clock timeout, and no network: its own network namespace where the kernel lets an
unprivileged process make one (Linux user namespaces), and in any case `socket` disabled before
the code runs."""
from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
import tempfile

TIMEOUT_S = 10.0
MEMORY_BYTES = 1 << 30
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_NO_SOCKETS = ("import socket as _s\n"
               "def _refuse(*a, **k):\n    raise OSError('network disabled in the sandbox')\n"
               "_s.socket = _s.create_connection = _s.socketpair = _refuse\n")


def _limit() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_CPU, (int(TIMEOUT_S), int(TIMEOUT_S) + 1))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
    os.setsid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET)  # best effort; sockets are refused anyway
    except OSError:
        pass


def run_code(program: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess | None:
    """Run `program`; None when it ran out of time."""
    with tempfile.TemporaryDirectory(prefix="anneal-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(_NO_SOCKETS + program)
        try:
            return subprocess.run([sys.executable, "-I", path], cwd=tmp, env={"PATH": "/usr/bin:/bin"},
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                                  preexec_fn=_limit)
        except subprocess.TimeoutExpired:
            return None


def passes(code: str, test: str, entry_point: str, timeout: float = TIMEOUT_S) -> bool:
    """HumanEval's check: the completed function passes the problem's `check`."""
    done = run_code(f"{code}\n\n{test}\n\ncheck({entry_point})\n", timeout)
    return done is not None and done.returncode == 0
