"""Signals during `xmei train` (issue 23): SIGTERM and SIGINT stop every rank at one step with a
whole checkpoint, print the command that resumes it and exit with 143 / 130; that command then
gives exactly the uninterrupted run. A second signal, or the grace running out, exits at once and
leaves the last whole checkpoint.

The signals are real: the trainer sends one to itself right after a chosen step (the test hook
XMEI_TEST_SIGNAL of xmei.preempt: a known step, no timing race), or the test sends SIGINT to the
whole process group as a terminal's Ctrl-C does (the DataLoader workers get it too). The step is
drawn from a seeded generator and named in every assertion message. The watcher's own rules run in
a bare Python process that imports xmei.preempt alone (a tenth of a second each). Two processes
under torchrun: tests/test_train.py (test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_exactly)."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import KEEP_EVERY_3, ROOT, TRAIN
from faults import flat, xmei
from test_train import assert_same_weights, losses_by_step
from xmei.checkpoint import checkpoints
from xmei.preempt import REPEAT_S, StopSignals

HOOK = "XMEI_TEST_SIGNAL"


def draw(seed: int, low: int, high: int) -> int:
    """The step a test's signal comes after: seeded, the same whatever tests run before it."""
    return int(np.random.default_rng([23, seed]).integers(low, high))


def train_args(tiny_models: Path, store: Path, out: Path, *sets: str) -> list:
    """`xmei train` as conftest.train_run configures it (TRAIN, then ``sets``)."""
    every = ("extract.shard_size=8", "extract.batch_size=4", *TRAIN, *sets)  # conftest.config's
    return ["train", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--store", store,
            "--output-dir", out, *[a for s in every for a in ("--set", s)]]


def resume_command(stderr: str) -> list[str]:
    """The command a stopped run printed to resume it, as arguments."""
    found = re.search(r"To resume from it: (.*)", stderr)
    assert found, stderr[-3000:]
    return shlex.split(found.group(1).split(" (under the same launcher")[0])


def kept(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def signalled_run(tiny_models: Path, store: Path, out: Path, hook: str, status: int, where: str) -> tuple[str, str]:
    """`xmei train` (conftest.train_run's, a checkpoint every 3 steps) in its own process, given
    XMEI_TEST_SIGNAL=``hook``: it must end with ``status`` and no traceback. (stderr, flattened stderr)."""
    result = xmei(*train_args(tiny_models, store, out, *KEEP_EVERY_3), env={HOOK: hook}, process=True)
    said = flat(result.stderr)
    assert result.returncode == status, f"{where}: exit {result.returncode}: {said[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr, f"{where}: {result.stderr[-3000:]}"
    return result.stderr, said


# ----------------------------------------------------------------------------- one process

def test_sigterm_at_a_random_step_stops_with_a_checkpoint_and_resumes_exactly(tiny_models, patch_store, trained_run,
                                                                               tmp_path):
    """Against conftest's trained_run (the same 6 steps, uninterrupted). The SIGTERM comes twice
    back to back, as the workers of `srun torchrun` get it (from SLURM and from the launcher): one
    signal. At step 6 the stop comes at the epoch's end and the resume writes step 6 again."""
    step = draw(1, 1, 7)
    where = f"SIGTERM after step {step} of 6"
    out = tmp_path / "run"
    stderr, said = signalled_run(tiny_models, patch_store, out, f"SIGTERM:{step}:all:2:0", 143, where)
    assert "stopped: a second" not in said, f"{where}: {said[-3000:]}"  # the second copy is the same signal
    checkpoint = out / "checkpoints" / f"step_{step:07d}"
    assert f"stopped by SIGTERM after step {step} (epoch 0); the checkpoint {checkpoint} is whole" in said, where
    assert kept(out) == [*(["step_0000003"] if step > 3 else []), checkpoint.name], where  # no .partial
    args = resume_command(stderr)
    assert args[0] == "xmei" and args[-1] == "--resume" and str(out) in args, f"{where}: {args}"
    resumed = xmei(*args[1:])
    assert resumed.returncode == 0 and "done: 6 steps" in resumed.stdout, f"{where}: {resumed.stderr[-3000:]}"
    assert losses_by_step(out) == losses_by_step(trained_run), where
    assert_same_weights(out, trained_run, where)


def test_a_second_signal_exits_at_once_leaving_the_last_whole_checkpoint(tiny_models, patch_store, tmp_path):
    step = draw(2, 4, 6)  # after the checkpoint of step 3
    where = f"SIGINT twice after step {step}"
    out = tmp_path / "run"
    _, said = signalled_run(tiny_models, patch_store, out, f"SIGINT:{step}:all:2", 130, where)
    last = out / "checkpoints" / "step_0000003"
    assert (f"stopped: a second SIGINT: exiting at once; the last whole checkpoint is {last} (resume from it with "
            "--resume)") in said, f"{where}: {said[-3000:]}"
    # The main thread may begin step N's checkpoint before the watcher thread's exit lands: its
    # step_N.partial folder may stay, never taken for whole (xmei.checkpoint.checkpoints).
    assert [p.name for p in checkpoints(out)] == ["step_0000003"], f"{where}: {kept(out)}"
    assert set(kept(out)) <= {"step_0000003", f"step_{step:07d}.partial"}, f"{where}: {kept(out)}"
    assert max(losses_by_step(out)) == step, where  # no step after the signals


def test_ctrl_c_reaches_the_dataloader_workers_too_and_the_run_stops_with_a_checkpoint(tiny_models, patch_store,
                                                                                     tmp_path):
    """SIGINT to the process group, as a terminal sends it: the DataLoader workers ignore it (one
    that died of it would fail the next batch, and one that ran the handler it inherits would
    count as a second signal), the run stops with a checkpoint, and no process of the group stays."""
    after = draw(3, 1, 4)
    out = tmp_path / "run"
    args = train_args(tiny_models, patch_store, out, "run.num_workers=2", "run.max_epoch=3", "run.save_every_steps=100")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "xmei"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    log, deadline = out / "logs" / "train.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (
            log.exists() and len(log.read_text().splitlines()) >= after):
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before step {after}: {proc.communicate()[1][-3000:]}"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    where, said = f"Ctrl-C after step {after} or later", flat(stderr)
    assert proc.returncode == 130, f"{where}: exit {proc.returncode}: {said[-3000:]}"
    assert "Traceback" not in stdout + stderr and "DataLoader worker" not in said, f"{where}: {stderr[-3000:]}"
    found = re.search(r"stopped by SIGINT after step (\d+) \(epoch (\d+)\); the checkpoint (\S+) is whole", said)
    assert found and int(found.group(1)) >= after, f"{where}: {said[-3000:]}"
    assert kept(out) == [Path(found.group(3)).name] and (Path(found.group(3)) / "trainer_state.pt").is_file(), where
    for _ in range(100):  # the workers end with the main process
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        left = subprocess.run(["ps", "-o", "pid,cmd", "-g", str(proc.pid)], capture_output=True, text=True).stdout
        pytest.fail(f"{where}: processes of the run's group are left: {left}")


# ----------------------------------------------------------------------------- the watcher's rules

def bare(script: str, *signals_after: tuple[float, int], grace_s: float = 60) -> tuple[subprocess.CompletedProcess,
                                                                                       float]:
    """``script`` in a bare Python (xmei.preempt its only import of this project), with ``signals``
    a StopSignals of ``grace_s``: it prints "ready" once that is entered, then blocks. ``signals_after``:
    (seconds after ready, signal) to send it. Returns the finished process and the seconds from
    the last signal to its end."""
    code = textwrap.dedent(f"""
        import time
        from xmei.preempt import StopSignals
        signals = StopSignals({grace_s}, lambda: "the last whole checkpoint is X")
        """) + textwrap.dedent(script)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready"
    ready, last = time.monotonic(), time.monotonic()
    for seconds, signum in signals_after:
        time.sleep(max(0.0, ready + seconds - time.monotonic()))
        proc.send_signal(signum)
        last = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.monotonic() - last


BLOCKED = """
with signals:
    print("ready", flush=True)
    time.sleep(30)  # a step, a collective or a checkpoint that does not end
print("left", signals.requested, flush=True)
"""


def test_a_second_signal_ends_a_blocked_process_at_once():
    result, seconds = bare(BLOCKED, (0, signal.SIGTERM), (REPEAT_S + 0.3, signal.SIGINT))
    assert result.returncode == 130 and seconds < 5, (result, seconds)
    assert "SIGTERM received" in result.stderr
    assert "stopped: a second SIGINT: exiting at once; the last whole checkpoint is X" in result.stderr


def test_the_same_signal_delivered_twice_at_once_is_one():
    script = BLOCKED.replace("time.sleep(30)", f"time.sleep({2 * REPEAT_S})")
    result, _ = bare(script, (0, signal.SIGTERM), (0.01, signal.SIGTERM))
    assert result.returncode == 0 and "left 15" in result.stdout, result  # it went on, the stop requested


def test_the_grace_ends_a_process_that_does_not_stop_in_time():
    result, seconds = bare(BLOCKED, (0, signal.SIGTERM), grace_s=0.5)
    assert result.returncode == 143 and seconds < 5, (result, seconds)
    assert ("stopped: the grace of 0.5 s (run.preempt_grace_s) ran out before the checkpoint was whole: exiting at "
            "once; the last whole checkpoint is X") in result.stderr


def test_ranks_agree_on_the_signal_one_of_them_got():
    quiet = StopSignals(120, str)  # a rank that got none: never entered, nothing installed
    assert quiet.flags() == [0.0, 0.0] and not quiet.agreed([0.0, 0.0])
    assert quiet.agreed([0.0, 1.0]) and quiet.stop_signal == signal.SIGINT and quiet.status == 130
    assert quiet.ranks_signalled == 1
    got = StopSignals(120, str)
    got.requested = signal.SIGINT
    assert got.flags() == [0.0, 1.0]
    assert got.agreed([1.0, 1.0]) and got.status == 130  # its own signal first
