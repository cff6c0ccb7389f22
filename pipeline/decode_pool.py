"""Decoding and preprocessing on every core: a pool of decode processes that survives crashes.

A GPU encodes a clip in milliseconds; decoding it takes ~0.2 s of a core or more, so a GPU
worker keeps several decode processes busy ahead of its encoders. Each process is a fresh
``python -m pipeline.decode_pool`` that reads requests from its stdin and writes results to a
private copy of its stdout (what libraries print goes to stderr), one pickled message each:

    parent --(request id, Clip)--> child: read_frames, read_audio, resize_crop, AudioPreprocess
    parent <--(request id, Prepared | Failure)-- child

Processes, not threads or forks: decoders hold the GIL in places, native thread pools deadlock
in forked children, and a daemonic dask worker may not fork multiprocessing children. When a
child dies in a decoder (a segfault), its clip fails with the signal as the reason, a new child
takes its place and the pool goes on. Children exit when their stdin closes: when the pool
closes, and when the parent dies in any way, so no process outlives the run (one whose result
finds the parent gone exits quietly). They ignore SIGTERM and SIGINT (a job's end may signal
every process of it; a new session keeps Ctrl-C from them): the parent decides when the run
stops, and a child that died of the signal would fail its clip.
"""
from __future__ import annotations

import atexit
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.decode import MediaError, audio_windows, read_audio, read_frames
from pipeline.preprocess import Preparation
from xmei.errors import UserError

__all__ = ["Clip", "DecodePool", "Failure", "PoolError", "Prepared", "available_cores", "prepare"]

REPO = Path(__file__).resolve().parent.parent
READY = "ready"


class PoolError(UserError, RuntimeError):
    """The decode processes cannot start (not a clip's fault)."""


@dataclass(frozen=True)
class Clip:
    video: str
    audio: str  # "" : the video's own track
    preparation: Preparation


@dataclass
class Prepared:
    """A clip ready for the encoders."""

    pixels: np.ndarray  # (F, 3, h, w) uint8, resized and cropped; normalized on the encoder's device
    audio: np.ndarray | None  # (W, S) float32 normalized windows; None: the clip has no audio
    audio_mask: np.ndarray | None  # (W, S) int32, 1 on real samples
    audio_lengths: np.ndarray | None  # (W,) int32 real samples per window


@dataclass
class Failure:
    stage: str  # video | audio | prepare | crash
    reason: str


def prepare(clip: Clip) -> Prepared:
    """Decode and preprocess one clip (what a decode process does); raises MediaError."""
    p = clip.preparation
    video = Path(clip.video)
    pixels = p.frames.resize_crop(read_frames(video, p.num_frames))
    wave = read_audio(Path(clip.audio) if clip.audio else None, video)
    if wave is None:
        return Prepared(pixels, None, None, None)
    windows, lengths = audio_windows(wave, p.num_audio_clips, p.audio_clip_seconds)
    values, mask = p.audio.apply(windows, lengths)
    return Prepared(pixels, values, mask, lengths)


def _attempt(clip: Clip) -> Prepared | Failure:
    try:
        return prepare(clip)
    except MediaError as err:
        return Failure(err.stage, str(err))
    except Exception as err:  # noqa: BLE001 - a decoder or preprocessing bug fails its clip only
        return Failure("prepare", f"{type(err).__name__}: {err}")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a farm's launcher may limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class DecodePool:
    """``processes`` decode processes preparing clips in order, a bounded number ahead.

        pool = DecodePool(4)
        for i, result in pool.map(clips, ahead=32):   # in the order of clips
            ...                                         # Prepared, or Failure with its reason
        pool.close()

    ``command`` starts one child (default: this module); tests give another to inject faults.
    """

    def __init__(self, processes: int, command: list[str] | None = None):
        if processes < 1:
            raise ValueError(f"a decode pool needs at least one process, got {processes}")
        self.processes = processes
        self.command = command or [sys.executable, "-m", "pipeline.decode_pool"]
        self._results: queue.Queue = queue.Queue()  # (child, message) from the reader threads
        self._children: list[_Child | None] = [None] * processes
        self._next_id = 0
        self._closed = False
        self._start(range(processes))  # all at once: each takes ~2 s to import its libraries
        atexit.register(self.close)

    def _start(self, slots: Iterable[int]) -> None:
        started = [_Child(slot, self.command, self._results) for slot in slots]
        for child in started:
            self._children[child.slot] = child
        for child in started:
            message = child.wait_ready()
            if message != READY:
                for other in started:
                    other.stop()
                raise PoolError(f"a decode process did not start ({' '.join(self.command)}): {message}")

    def map(self, clips: Iterable[Clip], ahead: int) -> Iterator[tuple[int, Prepared | Failure]]:
        """(index, result) for each clip in order; at most ``ahead`` clips are decoding or
        decoded and not yet taken. Closing the iterator early leaves the clips in flight to
        finish unseen (their results are dropped)."""
        todo = iter(enumerate(clips))
        waiting: dict[int, tuple[int, Clip]] = {}  # request id -> (index, clip) sent to a child
        done: dict[int, Prepared | Failure] = {}  # index -> result not yet yielded
        sent = taken = 0
        exhausted = False
        while True:
            while not exhausted and sent - taken < max(ahead, 1) and self._idle():
                item = next(todo, None)
                if item is None:
                    exhausted = True
                    break
                request = self._send(item[1])
                waiting[request] = item
                sent += 1
            if taken in done:
                yield taken, done.pop(taken)
                taken += 1
                continue
            if exhausted and not waiting:
                return
            child, message = self._results.get()
            request, result = self._receive(child, message)
            if request in waiting:
                done[waiting.pop(request)[0]] = result

    def _idle(self) -> bool:
        return any(c is not None and c.request is None for c in self._children)

    def _send(self, clip: Clip) -> int:
        child = next(c for c in self._children if c is not None and c.request is None)
        request, self._next_id = self._next_id, self._next_id + 1
        child.send(request, clip)
        return request

    def _receive(self, child: "_Child", message) -> tuple[int | None, Prepared | Failure]:
        """A child's result; when the child died instead, its clip's failure and a new child."""
        request = child.request
        child.request = None
        if isinstance(message, tuple):
            return message
        code = child.stop()
        name = signal.Signals(-code).name if code and code < 0 and -code in signal.Signals._value2member_map_ else code
        if not self._closed:
            self._start([child.slot])
        return request, Failure("crash", f"the decode process died ({name}) while decoding this clip")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for child in self._children:
            if child is not None:
                child.stop()
        atexit.unregister(self.close)


class _Child:
    """One decode process, and a thread that turns what it writes into queue messages: a result
    tuple, READY, or the reason it stopped (a string)."""

    def __init__(self, slot: int, command: list[str], results: queue.Queue):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.slot, self.request = slot, None
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                        start_new_session=True)  # Ctrl-C reaches the parent, which closes us
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._results = results
        threading.Thread(target=self._read, daemon=True, name=f"decode-pool-{slot}").start()

    def _read(self) -> None:
        first = True
        while True:
            try:
                message = pickle.load(self.process.stdout)
            except Exception as err:  # noqa: BLE001 - EOF or a torn message: the process ended
                message = f"stopped answering ({type(err).__name__}: {err})"
            if first:
                self._ready.put(message)
                first = False
                if message != READY:
                    return
                continue
            self._results.put((self, message))
            if not isinstance(message, tuple):
                return

    def wait_ready(self, timeout: float = 300.0) -> str:
        try:
            return self._ready.get(timeout=timeout)
        except queue.Empty:
            return f"no answer in {timeout:.0f} s"

    def send(self, request: int, clip: Clip) -> None:
        self.request = request
        try:
            pickle.dump((request, clip), self.process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the process died: the reader thread reports it

    def stop(self) -> int | None:
        """Close its stdin (it exits), kill it if it does not; its exit code."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def serve() -> None:
    """A decode process: requests from stdin, results to a private copy of stdout, until EOF."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # the parent stops the run (module docstring)
        signal.signal(sig, signal.SIG_IGN)
    import torch

    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a library printing to stdout must not corrupt the results
    torch.set_num_threads(1)  # one process per core
    pickle.dump(READY, results)
    results.flush()
    requests = sys.stdin.buffer
    while True:
        try:
            request, clip = pickle.load(requests)
        except EOFError:
            return
        try:
            pickle.dump((request, _attempt(clip)), results, protocol=pickle.HIGHEST_PROTOCOL)
            results.flush()
        except BrokenPipeError:  # the parent is gone (killed): nobody wants the result, nor a traceback
            os._exit(0)


if __name__ == "__main__":
    from pipeline.decode_pool import serve as serve_imported  # results must pickle as pipeline.decode_pool's

    serve_imported()
