"""The fault-injection suite's harness (tests/test_faults_*.py): run `xmei` as a user would, on a
bad input or after a fault, and check how it ends.

Every fault test asserts that the command ends with the expected exit status, that its message
names the culprit (file, record, field, array, shard, key), that no traceback is printed, and that
nothing already written is lost (``snapshot`` before, ``assert_kept`` after).
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

XMEI = Path(sys.executable).parent / "xmei"


def xmei(*args, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`xmei ARGS` in a fresh process, offline, without --debug (even when the suite runs with it)."""
    environment = {k: v for k, v in os.environ.items() if k != "XMEI_DEBUG"}
    environment.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})})
    return subprocess.run([str(XMEI), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=environment, cwd=cwd)


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
