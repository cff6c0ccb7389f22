"""The harness of the tests that run `xmei` as a user would (tests/test_faults_*.py and others):
run it on a bad input or after a fault, and check how it ends.

Every fault test asserts that the command ends with the expected exit status, that its message
names the culprit (file, record, field, array, shard, key), that no traceback is printed, and that
nothing already written is lost (``snapshot`` before, ``assert_kept`` after).

``xmei`` runs the command in this process by default: ``cli.main`` -- the entry point of the
installed script, with its boundary that turns a user's mistake into "error: ..." and status 1 --
with ``sys.argv``, the environment, the working folder, stdout and stderr its own, and an exception
that escapes printed as the interpreter prints it (a traceback, status 1). Starting an interpreter
that imports torch, transformers and peft took most of a fault test's time and proves nothing more.
``process=True`` starts the installed script instead: for signals, kills, launchers and the few
tests that check the real script's exit status and stderr.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

XMEI = Path(sys.executable).parent / "xmei"


def xmei(*args, env: dict | None = None, timeout: float = 600, cwd: Path | None = None,
         process: bool = False) -> subprocess.CompletedProcess:
    """`xmei ARGS`, offline, without --debug (even when the suite runs with it): in this process,
    or with ``process`` in a fresh one (``timeout`` applies to that one only)."""
    changes = {"HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    if process:
        environment = {k: v for k, v in os.environ.items() if k != "XMEI_DEBUG"}
        return subprocess.run([str(XMEI), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env={**environment, **changes}, cwd=cwd)
    from cli import main

    out, err = io.StringIO(), io.StringIO()
    with _as_a_process(["xmei", *map(str, args)], changes, cwd), redirect_stdout(out), redirect_stderr(err):
        try:
            main()
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - what the interpreter does with an exception that escapes
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(["xmei", *map(str, args)], status, out.getvalue(), err.getvalue())


@contextmanager
def _as_a_process(argv: list[str], changes: dict[str, str], cwd: Path | None):
    """What a fresh process would have, put back after: argv, environment (without XMEI_DEBUG),
    working folder, the interpreter's default warning filters printing to stderr, no process group."""
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    os.environ.pop("XMEI_DEBUG", None)
    os.environ.update(changes)
    sys.argv = argv
    try:
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _print_warning
            yield
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        if "torch" in sys.modules:
            import torch.distributed as tdist

            if tdist.is_available() and tdist.is_initialized():  # left by a command that failed
                tdist.destroy_process_group()


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def flat(text: str) -> str:
    """Whitespace collapsed (a long message may wrap)."""
    return re.sub(r"\s+", " ", text)


def assert_clean_error(result: subprocess.CompletedProcess, *culprits: str, status: int = 1) -> str:
    """The command failed with ``status``, said "error:" naming every one of ``culprits``, and
    printed no traceback. Returns the flattened stderr."""
    said = flat(result.stderr)
    assert result.returncode == status, f"exit {result.returncode}, expected {status}: {said[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-4000:]
    assert "error:" in said, said[-3000:]
    for culprit in culprits:
        assert flat(str(culprit)) in said, f"{culprit!r} not named in: {said[-3000:]}"
    return said


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file under ``folders`` (a file as itself), by path."""
    digests = {}
    for folder in folders:
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for path in paths:
            digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def assert_kept(before: dict[str, str]) -> None:
    """Every file of an earlier ``snapshot`` is still there with the same bytes."""
    for path, digest in before.items():
        assert Path(path).is_file(), f"{path} was lost"
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, f"{path} was changed"


# ----------------------------------------------------------------------------- full disks

@contextmanager
def tmpfs(folder: Path, size: int) -> Iterator[Path]:
    """A disk of ``size`` bytes to fill: a tmpfs mounted on ``folder`` (made), unmounted after.
    Skips the test, saying why, where it cannot be mounted (mounting needs root)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"a full disk is made by mounting a small tmpfs, which failed here (mounting needs root): "
                    f"{mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a file a worker still holds


def resize(folder: Path, size: int) -> None:
    """The tmpfs on ``folder`` made ``size`` bytes large, its files kept (space freed by the user)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)


def leave_free(folder: Path, free: int) -> Path:
    """A file of zeros in ``folder`` taking all its filesystem's space but ``free`` bytes."""
    stat = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(bytes(max(stat.f_bavail * stat.f_frsize - free, 0)))
    return filler


def assert_full_disk(result: subprocess.CompletedProcess, mount: Path, *culprits: str) -> str:
    """The command ended as on a full disk: exit 1, "no space left on" / "not enough space on" the
    tmpfs at ``mount``, naming ``culprits``, no traceback. Returns the flattened stderr."""
    said = assert_clean_error(result, *culprits)
    assert re.search(rf"(no|not enough) space (left )?on {re.escape(str(mount))} \(tmpfs, tmpfs: [\d.]+ [kMG]?B "
                     r"free of [\d.]+ [kMG]?B\)", said), said[-3000:]
    return said
