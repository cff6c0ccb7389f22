"""The decode pool: clips prepared in processes, in order, a bounded number ahead; a crashing
decoder fails its clip only; no process outlives the pool or its parent."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.decode_pool import Clip, DecodePool, Failure, PoolError, Prepared, prepare
from pipeline.encoders import EncoderSettings, preparation
from conftest import config

FAULTY = [sys.executable, str(Path(__file__).parent / "faulty_decoder.py")]


@pytest.fixture(scope="module")
def clips(tiny_models, corpus, annotations):
    """(Clip per record of the corpus, video file names)."""
    import json

    prep = preparation(EncoderSettings.from_config(config(tiny_models)))
    rows = json.loads(annotations.read_text())
    return [Clip(str(corpus / r["video_path"]), str(corpus / r["audio_path"]) if r["audio_path"] else "", prep)
            for r in rows[:12]]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")  # a zombie has exited


def test_results_come_in_order_and_equal_an_in_process_prepare(clips):
    pool = DecodePool(2, command=[*FAULTY, f"slow={Path(clips[1].video).name}"])  # clip 1 finishes after 2, 3
    try:
        results = list(pool.map(clips, ahead=4))
    finally:
        pool.close()
    assert [i for i, _ in results] == list(range(len(clips)))
    for clip, (_, got) in zip(clips, results):
        want = prepare(clip)
        assert isinstance(got, Prepared)
        np.testing.assert_array_equal(got.pixels, want.pixels)
        assert (got.audio is None) == (want.audio is None)
        if want.audio is not None:
            np.testing.assert_array_equal(got.audio, want.audio)
            np.testing.assert_array_equal(got.audio_mask, want.audio_mask)


def test_no_more_than_ahead_clips_are_in_flight(clips):
    pool = DecodePool(2)
    sent: list[int] = []
    send = pool._send
    pool._send = lambda clip: (sent.append(clips.index(clip)), send(clip))[1]
    try:
        for i, _ in pool.map(clips, ahead=3):
            assert max(sent) < i + 3  # clips sent = clips taken + at most 3
            time.sleep(0.05)  # a slow consumer: the pool must wait for it
    finally:
        pool.close()


def test_a_segfault_fails_its_clip_and_the_pool_goes_on(clips):
    crash, bug = Path(clips[3].video).name, Path(clips[5].video).name
    pool = DecodePool(2, command=[*FAULTY, f"crash={crash}", f"bug={bug}"])
    pids = {c.process.pid for c in pool._children}
    try:
        results = dict(pool.map(clips, ahead=4))
        again = dict(pool.map(clips[3:5], ahead=2))  # the pool still works, and crashes again on clip 3
    finally:
        pool.close()
    assert isinstance(results[3], Failure) and results[3].stage == "crash"
    assert "SIGSEGV" in results[3].reason
    assert results[5] == Failure("prepare", "RuntimeError: a decoder bug")
    assert all(isinstance(results[i], Prepared) for i in range(len(clips)) if i not in (3, 5))
    assert isinstance(again[0], Failure) and isinstance(again[1], Prepared)
    assert {c.process.pid for c in pool._children} - pids  # a new process replaced the crashed one


def test_a_pool_that_cannot_start_says_so():
    with pytest.raises(PoolError, match="did not start"):
        DecodePool(1, command=[sys.executable, "-c", "import sys; sys.exit(3)"])


def test_no_decode_process_outlives_its_parent(tmp_path):
    """The parent killed with SIGKILL (no clean-up at all): its decode processes exit."""
    script = tmp_path / "parent.py"
    script.write_text("import sys, time\nsys.path.insert(0, %r)\nfrom pipeline.decode_pool import DecodePool\n"
                      "pool = DecodePool(2)\nprint(*[c.process.pid for c in pool._children], flush=True)\n"
                      "time.sleep(60)\n" % str(Path(__file__).resolve().parents[1]))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    children = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(children) == 2 and all(alive(pid) for pid in children)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 10
    while any(alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children)


def test_close_ends_every_process(clips):
    pool = DecodePool(2)
    processes = [c.process for c in pool._children]
    pool.close()
    assert all(p.poll() is not None for p in processes)
