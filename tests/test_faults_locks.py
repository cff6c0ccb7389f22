"""One run per folder (xmei.runlock): `xmei train`, `extract` and `eval` hold a lock on what they
write. Two runs started together into one folder (exactly one runs, the other stops at once naming
it), a stale lock of a dead process (taken over, said so), another host's lock (refused, saying
which file to delete), a damaged lock, a lock under several ranks, and the lock gone after a run
that ended well or badly. A SIGKILLed run's lock is taken over by the rerun in the kill tests
(test_extract.py, test_faults_runs.py)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TRAIN
from faults import XMEI, assert_clean_error, assert_kept, flat, snapshot, xmei
from xmei.runlock import LOCK_NAME, RunLockError, run_lock, store_lock

HOST = socket.gethostname()
ONE_STEP = ("--set", "run.iters_per_epoch=1", "--set", "run.max_epoch=1")


def write_lock(lock: Path, **holder) -> bytes:
    """A lock file naming ``holder`` (a run started earlier); its bytes."""
    raw = json.dumps({"host": HOST, "started": "2026-01-02T03:04:05+00:00", "command": "xmei train --the-first-run",
                      **holder}, indent=1).encode() + b"\n"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_bytes(raw)
    return raw


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_process():
    """A process of this host that outlives the test's commands (a run that still holds its lock)."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def train_args(tiny_models: Path, store: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--store", store,
            "--output-dir", out, *[a for s in TRAIN for a in ("--set", s)], *ONE_STEP, *extra]


# --------------------------------------------------------------------------- the lock itself

def test_a_held_lock_refuses_a_second_run_naming_the_first_and_is_gone_after(tmp_path):
    folder = tmp_path / "run"
    with run_lock(folder / LOCK_NAME, folder, "--out"):
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["host"] == HOST and holder["pid"] == os.getpid() and holder["started"] and holder["command"]
        with pytest.raises(RunLockError) as refused, run_lock(folder / LOCK_NAME, folder, "--out"):
            pass
    said = str(refused.value)
    assert f"--out {folder} is in use by another run on this host" in said
    assert f"`{holder['command']}` (pid {os.getpid()} on {HOST}, started {holder['started']})" in said
    assert not folder.exists()  # the lock is gone, and the folder it made, left empty


def test_the_lock_is_gone_after_an_error(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with pytest.raises(ValueError), run_lock(folder / LOCK_NAME, folder, "--out"):
        raise ValueError("the run failed")
    assert list(folder.iterdir()) == []  # an existing folder is kept


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    folder, notes = tmp_path / "run", []
    write_lock(folder / LOCK_NAME, pid=dead_pid())
    with run_lock(folder / LOCK_NAME, folder, "--output-dir", say=notes.append):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    [note] = notes
    assert note.startswith(f"taking over {folder / LOCK_NAME}: the run that held it (`xmei train --the-first-run`")
    assert note.endswith("is no longer running (killed?)")


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """The holder's pid runs again, but another process: its start time tells them apart."""
    folder, notes = tmp_path / "run", []
    write_lock(folder / LOCK_NAME, pid=os.getpid(), process_start=1)
    with run_lock(folder / LOCK_NAME, folder, "--out", say=notes.append):
        pass
    assert len(notes) == 1 and "taking over" in notes[0]


def test_a_lock_of_another_host_is_refused_saying_how_to_clear_it(tmp_path):
    folder = tmp_path / "run"
    raw = write_lock(folder / LOCK_NAME, host="gpu-node-17", pid=4242, slurm_job="998877")
    with pytest.raises(RunLockError) as refused, run_lock(folder / LOCK_NAME, folder, "--output-dir"):
        pass
    said = str(refused.value)
    assert (f"--output-dir {folder} is in use by a run on another host: `xmei train --the-first-run` (pid 4242 on "
            "gpu-node-17, SLURM job 998877, started 2026-01-02T03:04:05+00:00)") in said
    assert (f"if that run is gone (check: `ssh gpu-node-17 ps -p 4242` or `squeue -j 998877`), delete "
            f"{folder / LOCK_NAME} and run again") in said
    assert (folder / LOCK_NAME).read_bytes() == raw  # never taken over: its end cannot be seen from here


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_run_on_another_host(tmp_path, monkeypatch):
    folder, notes = tmp_path / "run", []
    write_lock(folder / LOCK_NAME, host="gpu-node-17", pid=4242, slurm_job="998877", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "998877")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # another step of the same run: refused as any other host's
    with pytest.raises(RunLockError, match="in use by a run on another host"), run_lock(folder / LOCK_NAME, folder, "-o"):
        pass
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # preempted and requeued: SLURM ended the earlier run
    with run_lock(folder / LOCK_NAME, folder, "-o", say=notes.append):
        assert json.loads((folder / LOCK_NAME).read_text())["slurm_restart"] == 1
    assert notes == [f"taking over {folder / LOCK_NAME}: the run that held it (`xmei train --the-first-run` (pid 4242 "
                     "on gpu-node-17, SLURM job 998877, started 2026-01-02T03:04:05+00:00)) was this SLURM job's before "
                     "it was requeued"]


def test_a_damaged_lock_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_bytes(b'{"host": "a", "pi\n')
    with pytest.raises(RunLockError) as refused, run_lock(folder / LOCK_NAME, folder, "--out"):
        pass
    assert f"delete {folder / LOCK_NAME} and run again" in str(refused.value)


def test_a_store_is_locked_beside_it_whatever_the_path_spelled(tmp_path):
    (tmp_path / "stores").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "stores")
    lock = tmp_path.resolve() / "stores" / ".train.xmei.lock"
    assert store_lock(tmp_path / "link" / "train") == store_lock(tmp_path / "stores" / "train") == lock


CONTENDER = """
import json, sys, time
from pathlib import Path
from xmei.runlock import RunLockError, run_lock
folder, start = Path(sys.argv[1]), float(sys.argv[2])
notes = []
time.sleep(max(start - time.time(), 0))
try:
    with run_lock(folder / ".xmei.lock", folder, "--out", say=notes.append):
        time.sleep(1.5)  # held while the others try
        print(json.dumps({"held": True, "notes": notes}))
except RunLockError as err:
    print(json.dumps({"held": False, "notes": notes, "refused": str(err)}))
"""


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_runs_started_at_the_same_instant_exactly_one_holds_the_lock(stale, tmp_path):
    folder, dead = tmp_path / "run", dead_pid()
    if stale:  # all of them see it dead and take it over together: one wins
        write_lock(folder / LOCK_NAME, pid=dead)
    start = time.time() + 1.0  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(folder), str(start)], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in range(6)]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    winners = [(p, r) for p, r in zip(procs, results) if r["held"]]
    assert len(winners) == 1, results
    (winner, _), = winners
    for result in results:
        if not result["held"]:
            assert f"(pid {winner.pid} on {HOST}" in result["refused"]  # the one that won, never the dead one
    # one run removes the stale lock and says so; the exclusive creation then decides again, and
    # another run may win it (xmei.runlock's module docstring)
    notes = [note for r in results for note in r["notes"]]
    assert len(notes) == (1 if stale else 0), results
    assert all(f"(pid {dead} on {HOST}" in note and "is no longer running" in note for note in notes), notes
    assert (list(folder.iterdir()) == []) if stale else not folder.exists()  # no lock, nor a file of one, left


# --------------------------------------------------------------------------- the commands

def started_together(args: list) -> tuple[subprocess.Popen, str, subprocess.CompletedProcess]:
    """Two `xmei ARGS` started together: (the one that ran, its stdout, how the other ended). The
    other must end first, while the one still runs."""
    procs = [subprocess.Popen([str(XMEI), *map(str, args)], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    ended = None
    while ended is None:
        ended = next((p for p in procs if p.poll() is not None), None)
        time.sleep(0.05)
    first = next(p for p in procs if p is not ended)
    assert first.poll() is None, "the run that holds the lock ended first"
    _, stderr = ended.communicate()
    output, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors[-3000:]
    return first, output, subprocess.CompletedProcess(args, ended.returncode, "", stderr)


def test_two_trainings_started_together_into_one_folder(tiny_models, patch_store, tmp_path):
    out = tmp_path / "run"
    first, output, second = started_together(train_args(tiny_models, patch_store, out))
    assert_clean_error(second, f"--output-dir {out} is in use by another run on this host: `xmei train ",
                       f"(pid {first.pid} on {HOST}, started ")
    assert "done: 1 steps" in output and (out / "checkpoints" / "step_0000001").is_dir()
    assert not (out / LOCK_NAME).exists()


def test_two_extractions_started_together_into_one_store(tiny_models, corpus, annotations, tmp_path):
    few = tmp_path / "few.json"
    few.write_text(json.dumps(json.loads(annotations.read_text())[:4]))
    out = tmp_path / "store"
    first, output, second = started_together([
        "extract", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--annotations", few,
        "--media-root", corpus, "--out", out, "--workers", "0", "--set", "extract.decode_workers=1"])
    assert_clean_error(second, f"--out {out} is in use by another run on this host: `xmei extract ",
                       f"(pid {first.pid} on {HOST}, started ")
    assert "4 ok, 0 failed of 4 clips" in output
    assert not store_lock(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["few.json", "store"]


def test_eval_into_a_folder_in_use_stops_before_loading_anything(trained_run, patch_store, live_process, tmp_path):
    from conftest import LAST

    out = tmp_path / "eval"
    raw = write_lock(out / LOCK_NAME, pid=live_process.pid, command="xmei eval --the-first-run")
    before = snapshot(out)
    started = time.monotonic()
    result = xmei("eval", "--checkpoint", trained_run / LAST, "--store", patch_store, "--out", out)
    assert_clean_error(result, f"--out {out} is in use by another run on this host: `xmei eval --the-first-run` "
                               f"(pid {live_process.pid} on {HOST}, started 2026-01-02T03:04:05+00:00)")
    assert time.monotonic() - started < 10  # no model loaded
    assert_kept(before)
    assert (out / LOCK_NAME).read_bytes() == raw


def test_train_refuses_another_hosts_lock_and_leaves_no_lock_after_an_error(tiny_models, patch_store, tmp_path):
    out = tmp_path / "run"
    write_lock(out / LOCK_NAME, host="gpu-node-3", pid=77)
    result = xmei(*train_args(tiny_models, patch_store, out))
    said = assert_clean_error(result, f"--output-dir {out} is in use by a run on another host",
                              f"delete {out / LOCK_NAME} and run again")
    assert "(pid 77 on gpu-node-3, started" in said
    (out / LOCK_NAME).unlink()  # what the message says to do, once the other host's run is gone
    result = xmei(*train_args(tiny_models, patch_store, out, "--resume"))  # an error after the lock was taken
    assert_clean_error(result, f"--resume: {out} holds no checkpoint to resume from")
    assert not (out / LOCK_NAME).exists()


def test_extract_takes_over_the_lock_of_a_dead_run(tiny_models, corpus, annotations, tmp_path):
    few = tmp_path / "few.json"
    few.write_text(json.dumps(json.loads(annotations.read_text())[:2]))
    out = tmp_path / "store"
    write_lock(store_lock(out), pid=dead_pid(), command="xmei extract --killed")
    result = xmei("extract", "--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--annotations",
                  few, "--media-root", corpus, "--out", out, "--workers", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"warning: taking over {store_lock(out)}: the run that held it (`xmei extract --killed` (pid"
            in flat(result.stderr))
    assert not store_lock(out).exists()


def test_under_several_ranks_rank_0_takes_the_lock_and_every_rank_stops(tiny_models, patch_store, live_process,
                                                                        tmp_path):
    from test_train import torchrun

    out = tmp_path / "run"
    write_lock(out / LOCK_NAME, pid=live_process.pid)
    proc, seconds = torchrun(2, [str(XMEI), *map(str, train_args(tiny_models, patch_store, out))], timeout=300)
    said = flat(proc.stdout + proc.stderr)
    assert proc.returncode != 0 and not re.search(rf'File "{ROOT}/(cli.py|xmei/|pipeline/|stores/)', said), \
        said[-3000:]  # torchrun prints its own traceback; none of ours
    assert said.count(f"error: --output-dir {out} is in use by another run on this host") == 2  # each rank, none hangs
    assert f"(pid {live_process.pid} on {HOST}," in said and seconds < 120  # a rank left waiting: gloo's 30 minutes
