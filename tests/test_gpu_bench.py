"""bench/gpu.py's verdicts on the runs it reads (the stages themselves need a GPU, or minutes of
CPU: `bash bench/gpu.sh --scale tiny` runs them; README "Full size on one GPU")."""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu  # its dataclasses look their module up
spec.loader.exec_module(gpu)


def steps(first: int, last: int, loss=lambda s: 10.0 - 0.1 * s, **extra) -> list[dict]:
    return [{"step": s, "loss": loss(s), "lr": 1e-5 * s, "tokens": 3000 + s, "target_tokens": 900 + s, "seconds": 2.0,
             "data_wait": 0.0, **extra} for s in range(first, last + 1)]


def test_training_figures_leave_out_the_first_step():
    records = steps(1, 4, peak_gpu_gib=20.0)
    records[0]["seconds"] = 30.0  # the warm-up step
    records[2]["peak_gpu_gib"] = 24.5
    f = gpu.training_figures(records)
    assert f["tokens_per_s"] == pytest.approx((3002 + 3003 + 3004) / 6.0) and f["s_per_step"] == 2.0
    assert f["peak_gpu_gib"] == 24.5 and (f["first_loss"], f["last_loss"]) == (9.9, 9.6)
    assert gpu.training_figures(steps(1, 3))["peak_gpu_gib"] is None  # a CPU run logs none


def test_check_steps():
    gpu.check_steps(steps(11, 20), 11, 20)
    with pytest.raises(gpu.StageFailed, match="expected 1..20"):
        gpu.check_steps(steps(1, 19), 1, 20)
    with pytest.raises(gpu.StageFailed, match=r"non-finite loss at steps \[3\]"):
        gpu.check_steps(steps(1, 4, loss=lambda s: math.nan if s == 3 else 1.0), 1, 4)


def test_compare_resume_names_every_difference():
    uninterrupted = steps(1, 20)
    problems, worst = gpu.compare_resume(uninterrupted, steps(11, 20, loss=lambda s: (10.0 - 0.1 * s) * 1.004), 1e-2)
    assert problems == [] and worst == pytest.approx(0.004)
    resumed = steps(11, 21)
    resumed[0]["tokens"] += 1  # another sample at step 11
    resumed[1]["lr"] *= 2  # the schedule restarted at step 12
    resumed[2]["loss"] += 1.0  # the weights or optimizer state not restored at step 13
    resumed[3]["loss"] = math.nan
    problems, _ = gpu.compare_resume(uninterrupted, resumed, 1e-2)
    assert [p.split(":")[0] for p in problems] == ["step 11", "step 12", "step 13", "step 14", "step 21"]
    assert "tokens 3012, uninterrupted 3011" in problems[0] and "lr" in problems[1] and "not in the" in problems[4]


def test_steady_rate_from_shard_files(tmp_path):
    (tmp_path / "failures").mkdir()
    for k, t in enumerate((100.0, 110.0, 126.0)):  # when each shard of 64 clips was written
        path = tmp_path / "failures" / f"shard_{k:05d}.json"
        path.write_text("[]")
        os.utime(path, (t, t))
    times = gpu.shard_times(tmp_path)
    assert times == [100.0, 110.0, 126.0]
    assert gpu.steady_rate(times, 64, 192) == (128 / 26.0, 100.0, 126.0)
    assert gpu.steady_rate(times[:1], 64, 64) is None  # one shard: no steady window
