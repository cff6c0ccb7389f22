"""Stopping a long run cleanly on SIGTERM or SIGINT (preemption, `scancel`, `kubectl delete`, Ctrl-C).

    with stop_on_signals(grace_s) as stop:     # handlers while inside (main thread only)
        for shard in shards:
            if stop.requested:                 # a safe point: what is finished is whole
                break
            work(shard)
        stop.check("stopped after batch 3")    # or: raise Interrupted at a safe point

The first signal only asks: ``stop.requested`` turns true and the code stops at its next safe
point (a shard or batch boundary). When none comes within ``grace_s``, or a second signal comes,
Interrupted is raised wherever the main thread is and the work in progress is abandoned, which
writers must survive as never written (the stores write a shard's status last, evaluation
outputs are renamed into place whole). Later signals are ignored while the run cleans up.
Only one process is concerned: each rank of a launcher, which signals all of them, stops itself.

Interrupted is a BaseException, as KeyboardInterrupt is, so that no ``except Exception`` of a
clip or a batch takes it for that clip's fault. `xmei`'s entry point ends on it with its message,
no traceback, and status 128 + the signal's number, as a shell reports a process it signalled
(143 for SIGTERM, 130 for SIGINT). This module imports nothing of the project: both stages use it
(`xmei extract` and `xmei eval`, with ``run.preempt_grace_s`` as the grace).

Training stops otherwise (xmei.preempt): its ranks must agree on one step, which they do inside
an all-reduce, and a second signal must end a rank that waits in a collective or a write, where
an exception raised by a handler would not be seen until it returns; so there a watcher thread
ends the process. Extraction and evaluation wait in Python (dask futures, batches), where raising
Interrupted ends the work at once and lets the command's cleanup (the lock, a LocalCluster) run.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Interrupted", "StopRequest", "stop_on_signals"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A run stopped by a signal; the message says where it stopped and what is kept."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Whether a signal asked the run to stop (``requested``, ``signum``), and the handlers that say so."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self._raised = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def check(self, message: str) -> None:
        """At a safe point: raise Interrupted("SIGNAL: ``message``") once a signal has come."""
        if self.signum is not None:
            self._raise(message)

    def _raise(self, message: str) -> None:
        self._raised = True
        raise Interrupted(self.signum, f"{self.name}: {message}")

    def _on_signal(self, signum: int, frame) -> None:
        if self._raised:
            return
        if self.signum is None:
            self.signum = signum
            # os.write: a print here could re-enter a print the signal interrupted
            os.write(2, f"{self.name} received: stopping at the next safe point (at most {self.grace_s:g} s); "
                        "a second signal stops at once\n".encode())
            signal.setitimer(signal.ITIMER_REAL, self.grace_s)
            return
        self._raise(f"stopped at once by a second signal ({signal.Signals(signum).name}), the work in progress "
                    "abandoned")

    def _on_alarm(self, signum: int, frame) -> None:
        if self.signum is not None and not self._raised:
            self._raise(f"no safe point was reached within {self.grace_s:g} s: stopped there, the work in progress "
                        "abandoned")


@contextmanager
def stop_on_signals(grace_s: float) -> Iterator[StopRequest]:
    """A StopRequest that SIGTERM and SIGINT set while inside (see the module docstring); the
    earlier handlers are back on leaving. Outside the main thread no handler can be set: the
    request is never made."""
    stop = StopRequest(grace_s)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop._on_signal) for s in SIGNALS}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, stop._on_alarm)
    try:
        yield stop
    finally:
        if stop.requested:  # the grace's timer, armed by the first signal
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
