"""Preemption: SIGTERM (a scheduler's kill, which torchrun forwards to its workers), SIGUSR1
(what SLURM sends `--signal=USR1@<seconds>` before the kill) or a first Ctrl-C (SIGINT) asks the
run to stop at the end of the current step (a second Ctrl-C interrupts at once). The loop then writes a checkpoint, prints the resume command and the process exits
with PREEMPTED_EXIT_CODE. Ranks agree on the request through the step's statistics all-reduce, so
every rank stops after the same step.
"""
from __future__ import annotations

import signal
import threading

PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL: "try again later"; a checkpoint of the last step exists
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class PreemptionRequest:
    """Installs the handlers while active (main thread only; elsewhere it does nothing) and
    remembers the first signal received."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __bool__(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> PreemptionRequest:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
