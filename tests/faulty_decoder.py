"""A decode process (pipeline.decode_pool) with faults injected by video file name, for tests.

    python tests/faulty_decoder.py crash=a.mp4 bug=b.mp4 mark=c.mp4 slow=d.mp4

crash: a real segmentation fault (a read at address 0) while preparing that clip;
bug: a RuntimeError("a decoder bug"); mark: the clip prepares but every pixel is 7 (tests make
the encoder refuse it); slow: one second's sleep first. Anything else is prepared as usual.
"""
from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.decode_pool as decode_pool  # noqa: E402

FAULTS = dict(arg.split("=", 1)[::-1] for arg in sys.argv[1:])  # file name -> fault
real_prepare = decode_pool.prepare


def faulty_prepare(clip: decode_pool.Clip) -> decode_pool.Prepared:
    fault = FAULTS.get(Path(clip.video).name)
    if fault == "crash":
        ctypes.string_at(0)
    if fault == "bug":
        raise RuntimeError("a decoder bug")
    if fault == "slow":
        time.sleep(1.0)
    prepared = real_prepare(clip)
    if fault == "mark":
        prepared.pixels[:] = 7
    return prepared


decode_pool.prepare = faulty_prepare
decode_pool.serve()
