"""SIGTERM and SIGINT during training: a request to stop after the current step, not an end.
(Extraction and evaluation use xmei.interrupt; its docstring says why training cannot.)

    with StopSignals(grace_s=120, last_whole=lambda: "the last whole checkpoint is ...") as signals:
        for step in ...:
            if signals.agreed(dist.all_sum(torch.tensor(signals.flags()))):  # every rank, the same step
                ...                                                          # a checkpoint, then exit
    signals.status                                                           # 128 + the signal: 143, 130

SLURM, Kubernetes and spot instances send SIGTERM some time before they kill a job (``torchrun``
forwards it to every worker; ``srun`` gives it to each task); a terminal's Ctrl-C sends SIGINT to
the whole foreground process group. Signals may reach one rank only, or ranks at other moments.

Process model, while a :class:`StopSignals` is entered in the main thread (elsewhere it does
nothing: Python sets signal handlers in the main thread only):
  - Python's C-level handler writes each signal's number into a pipe the moment it arrives
    (``signal.set_wakeup_fd``), whatever the main thread is doing: a forward, a collective that
    waits for another rank, a checkpoint write.
  - A watcher thread reads that pipe. The first SIGTERM / SIGINT sets ``requested`` and starts the
    grace clock (``run.preempt_grace_s``). A second one, or the clock running out, prints the
    last whole checkpoint (``last_whole()``) and ends the process at once (``os._exit``, status 128 +
    the signal's number): a ``step_N.partial`` folder it leaves is never taken for a checkpoint
    (xmei.checkpoint.checkpoints) and is removed before step N is written again. A signal within
    ``REPEAT_S`` of the first is the same one delivered twice, not a second: SLURM signals every
    process of a job step, and ``srun torchrun`` workers get the launcher's copy too.
  - The Python-level handler runs in the main thread at its next line and sets ``requested`` too,
    so a signal a process sends itself is seen before anything else it does.
  - The main thread polls: :meth:`flags` go into an all-reduce each step already does, and
    :meth:`agreed` reads the sum, so every rank stops at the same step whichever ranks got the
    signal; on a rank that got none the clock starts there.

DataLoader workers (forked, forkserver or spawned) ignore both signals (:func:`quiet_worker`,
their ``worker_init_fn``): one that died of the terminal's SIGINT would fail the main process's
next batch. They end when the main process shuts them down or exits (torch's worker loop watches
its parent). :func:`held` blocks both signals in the thread that starts them, so a forked worker
cannot run the handler it inherits (whose pipe is the parent's) before it ignores them.

Test hook: ``XMEI_TEST_SIGNAL=SIGTERM:5`` makes every rank send itself SIGTERM right after
optimizer step 5, so that tests reach a known step without timing races and still go through the
real signal path. ``SIGINT:5:1``: rank 1 only; ``SIGTERM:5:all:2:0``: twice, back to back (one
signal delivered twice); ``SIGTERM:5:all:2``: twice, ``REPEAT_S`` + 0.5 s apart (a second signal).
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["STOP_SIGNALS", "StopSignals", "held", "quiet_worker"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TEST_HOOK = "XMEI_TEST_SIGNAL"
_WAKE = 0  # a byte no signal writes: wakes the watcher to read its deadline or to leave
REPEAT_S = 1.0  # a signal this soon after the first is the same one delivered again, not a second


class StopSignals:
    """SIGTERM / SIGINT as a request to stop (see the module docstring). ``grace_s``: from the first
    signal (or the agreement, on a rank that got none) to the process's end at the latest;
    ``last_whole()``: what the messages of a hard exit say about the checkpoints kept; ``prefix``:
    of every message (e.g. "rank 1: ")."""

    def __init__(self, grace_s: float, last_whole: Callable[[], str], prefix: str = ""):
        self.grace_s, self.last_whole, self.prefix = grace_s, last_whole, prefix
        self.requested: int | None = None  # the first signal this process got
        self.stop_signal: int | None = None  # what the ranks agreed to stop for
        self.ranks_signalled = 0  # how many ranks had got a signal when they agreed
        self._deadline: float | None = None
        self._installed = False
        self._hook = _parse_hook(os.environ.get(TEST_HOOK, ""))

    # ------------------------------------------------------------------ the main thread

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._closing = False
        self._old_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        self._watcher = threading.Thread(target=self._watch, name="xmei-stop-signals", daemon=True)
        self._watcher.start()
        self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if not self._installed:
            return
        for s, handler in self._old_handlers.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        self._closing = True
        self._wake()
        self._watcher.join(timeout=5)
        os.close(self._read)
        os.close(self._write)
        self._installed = False

    def _handler(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested = signum

    def flags(self) -> list[float]:
        """This rank's share of the all-reduce: (got SIGTERM, got SIGINT), 0 or 1 each."""
        return [float(self.requested == s) for s in STOP_SIGNALS]

    def agreed(self, summed) -> bool:
        """Whether the ranks stop, from :meth:`flags` summed over all ranks (the same on every rank).
        A rank that got no signal stops for the one the others got, and its clock starts now."""
        term, interrupt = float(summed[0]), float(summed[1])
        if not (term or interrupt):
            return False
        self.stop_signal = self.requested or (signal.SIGTERM if term else signal.SIGINT)
        self.ranks_signalled = int(term + interrupt)
        if self._installed and self._deadline is None:
            self._deadline = time.monotonic() + self.grace_s
            self._wake()
        return True

    @property
    def status(self) -> int:
        """The exit status of a stop: 128 + the signal's number, as a shell reports a process the
        signal ended (SIGTERM 143, SIGINT 130)."""
        return 128 + int(self.stop_signal or self.requested or signal.SIGTERM)

    def after_step(self, step: int, rank: int) -> None:
        """The test hook (module docstring): send this process the configured signal(s) after ``step``."""
        if self._hook and self._hook[1] == step and self._hook[2] in (None, rank):
            signum, _, _, times, gap = self._hook
            for i in range(times):
                time.sleep(gap if i else 0)
                os.kill(os.getpid(), signum)

    # ------------------------------------------------------------------ the watcher thread

    def _wake(self) -> None:
        try:
            os.write(self._write, bytes([_WAKE]))
        except BlockingIOError:  # the pipe is full of bytes not read yet: the watcher is awake anyway
            pass

    def _watch(self) -> None:
        first_at = None  # when the first stop signal came
        while not self._closing:
            timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            ready, _, _ = select.select([self._read], [], [], timeout)
            if not ready:
                self._exit(self.requested or self.stop_signal, f"the grace of {self.grace_s:g} s (run.preempt_grace_s) "
                                                                "ran out before the checkpoint was whole")
            for signum in os.read(self._read, 512):
                if signum not in STOP_SIGNALS or self._closing:
                    continue  # a wake-up, or another signal Python handles (e.g. the DataLoader's SIGCHLD)
                if first_at is not None:
                    if time.monotonic() - first_at >= REPEAT_S:
                        self._exit(signum, f"a second {signal.Signals(signum).name}")
                    continue
                first_at = time.monotonic()
                if self.requested is None:
                    self.requested = signum
                if self._deadline is None:
                    self._deadline = time.monotonic() + self.grace_s
                self._say(f"{signal.Signals(signum).name} received: finishing the current step, then writing a "
                          f"checkpoint (within {self.grace_s:g} s, run.preempt_grace_s); a second signal exits at once")

    def _say(self, text: str) -> None:
        sys.stderr.write(f"{self.prefix}{text}\n")
        sys.stderr.flush()

    def _exit(self, signum: int | None, why: str) -> None:
        """End the process now, whatever the main thread is doing."""
        try:
            self._say(f"stopped: {why}: exiting at once; {self.last_whole()}")
            sys.stdout.flush()
        finally:
            os._exit(128 + int(signum or signal.SIGTERM))


def _parse_hook(spec: str) -> tuple[int, int, int | None, int, float] | None:
    """XMEI_TEST_SIGNAL -> (signal, step, rank or None for all, times, seconds between)."""
    if not spec:
        return None
    name, step, *rest = spec.split(":")
    rank, times, gap = [*rest, *("all", "1", str(REPEAT_S + 0.5))[len(rest):]][:3]
    return signal.Signals[name], int(step), None if rank == "all" else int(rank), int(times), float(gap)


@contextmanager
def held() -> Iterator[None]:
    """SIGTERM and SIGINT blocked in this thread inside (other threads still take them): around
    the start of DataLoader workers, which begin with them blocked and then ignore them."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def quiet_worker(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGTERM and SIGINT ignored, no wake-up pipe of the
    parent's; then unblocked (:func:`held`)."""
    signal.set_wakeup_fd(-1)
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
