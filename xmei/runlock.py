"""One run per folder: the lock `xmei train`, `extract` and `eval` hold on what they write.

    with run_lock(out / LOCK_NAME, out, "--out", say=print):    # RunLockError when another run holds it
        ...                                                       # released on leaving, error or not

The lock is a small JSON file naming its run: host, pid, the process's start time (its
``/proc`` start tick, so a reused pid is not taken for the run), when it started, the command
line and, under SLURM, the job and its restart count. A folder's lock lives inside it (``FOLDER/.xmei.lock``); a
store's beside it (``.STORE.xmei.lock``), since the store only appears, whole, when its
``STORE.partial-<pid>`` folder is renamed. A run that finds the lock held:

    by a live process of this host        refuses at once, naming the run (RunLockError)
    by a dead process of this host        takes it over, saying whose it was (a SIGKILL leaves one)
    by another host                       refuses, saying which file to delete once that run is gone
    by this SLURM job before its requeue  takes it over, on any host (SLURM ended that run first)
    unreadable                            refuses, saying which file to delete

What is guaranteed where. The lock file is created whole and exclusively: written under a name
of this process, then hard-linked to the lock's name, which fails when that name exists (a link
is atomic on a local disk, NFS v2-v4 and Lustre; over NFS a link whose reply was lost is
recognised by the link count, as in the classic NFS lock recipe). Where hard links are refused
(some FUSE and SMB mounts), ``O_CREAT | O_EXCL`` creates it instead (atomic on local disks,
NFS v3+ and Lustre) and a reader waits for its content. So of two runs started at the same
instant, on one host or on two sharing the folder, exactly one holds the lock. A stale lock is
only ever taken over by a run on its own host (only there can a process's death be seen), and
takeovers are serialised by an ``flock`` on a file of this host's temporary folder, which the
local kernel enforces whatever the shared filesystem (NFS ``nolock``, Lustre ``localflock`` or
``noflock``): the stale file is re-read under it and removed only if unchanged, then the
exclusive creation decides again. Two hosts that call themselves by one name (containers with
a fixed hostname) would take each other's locks for their own host's: give them distinct names.

A store in object storage (s3:// gs:// az://, stores.location) has its lock beside it as an
object (``.STORE.xmei.lock`` under the same parent key), created by a conditional PUT that fails
when the object exists (``If-None-Match: *``; S3, GCS and Azure honour it): the same exclusivity,
the same holders and takeovers.

Under several ranks (torchrun, deepspeed, SLURM; one node or many) a run is one lock: only
global rank 0 takes it and ``share`` (``Distributed.broadcast``) tells every rank the outcome, so
a refusal ends every rank with the same error and none waits on the others.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from stores.location import Location
from xmei.errors import UserError

__all__ = ["LOCK_NAME", "RunLockError", "run_lock", "store_lock"]

LOCK_NAME = ".xmei.lock"  # FOLDER/.xmei.lock; a store's: .STORE.xmei.lock beside it (store_lock)
READ_WAIT_S = 2.0  # how long an empty lock file (O_EXCL being written) is read again before it counts as damaged
TAKEOVER_MUTEX = "xmei-lock-takeover"  # in this host's temporary folder: serialises takeovers of stale locks


class RunLockError(UserError, RuntimeError):
    """Another run holds the folder's lock (named in the message), or the lock cannot be taken."""


def store_lock(store: str | Path) -> Path | Location:
    """The lock file of a store: beside it, as the store appears only at the end of its creation
    (links resolved: two spellings of one store are one lock); for a URL, the lock object beside it."""
    where = Location.parse(store)
    if where.remote:
        return where.parent.child(f".{where.name}.xmei.lock")
    store = where.path.resolve()
    return store.with_name(f".{store.name}.xmei.lock")


@contextmanager
def run_lock(lock: Path | Location, folder: str | Path, option: str, *, rank: int = 0,
             share: Callable[[Any], Any] | None = None, say: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``lock``, the lock of ``folder`` (given as ``option``, e.g. "--output-dir"), while inside.
    ``rank`` 0 takes it; ``share(value)`` returns rank 0's value on every rank, so each rank
    raises the same RunLockError when it is refused. ``say`` gets the note of a takeover. The
    folder holding ``lock`` is created; on leaving, the lock is removed, and so is that folder
    if this run created it and left it empty."""
    lock = lock if isinstance(lock, Location) else Path(lock).absolute()
    held, refused = None, None
    created = isinstance(lock, Path) and not lock.parent.exists()
    if rank == 0:
        try:
            held = _acquire(lock, folder, option, say)
        except RunLockError as err:
            refused = str(err)
        except Exception as err:  # a bug: it keeps its traceback, but no rank may wait for rank 0's answer
            if share is not None:
                share(f"rank 0 could not take the lock {lock}: {type(err).__name__}: {err}")
            raise
    refused = share(refused) if share is not None else refused
    if refused:
        raise RunLockError(refused)
    try:
        yield
    finally:
        if held is not None:
            _release(lock, held)
            if created:
                try:
                    lock.parent.rmdir()  # only when empty: this run wrote nothing there
                except OSError:
                    pass


# --------------------------------------------------------------------------- taking and releasing

def _acquire(lock: Path | Location, folder: str | Path, option: str, say: Callable[[str], None]) -> bytes:
    """Create ``lock`` for this process (its bytes are returned), taking over a stale one of this host."""
    try:
        if isinstance(lock, Path):
            lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunLockError(f"{option} {folder}: cannot create {lock.parent}: {err.strerror or err}") from None
    mine = json.dumps(_this_run(), indent=1).encode() + b"\n"
    for _ in range(10):  # each round: create, else judge the holder (a takeover or a release lets the next round in)
        try:
            if _create(lock, mine):
                return mine
        except OSError as err:
            raise RunLockError(f"{option} {folder}: cannot create the lock {lock}: {err.strerror or err}") from None
        raw = _read(lock)
        if raw is None:  # released meanwhile
            continue
        holder = _holder(raw, lock, folder, option)
        requeued = _requeued(holder)
        if not requeued and holder["host"] != socket.gethostname():
            raise RunLockError(_another_host(holder, lock, folder, option))
        if not requeued and _alive(holder):
            raise RunLockError(f"{option} {folder} is in use by another run on this host: {_named(holder)}. One run "
                               f"at a time writes into a folder: wait for it to end, or choose another {option}")
        if _remove_stale(lock, raw):
            why = "was this SLURM job's before it was requeued" if requeued else "is no longer running (killed?)"
            say(f"taking over {lock}: the run that held it ({_named(holder)}) {why}")
    raise RunLockError(f"{option} {folder}: the lock {lock} kept changing hands; run again")


def _create(lock: Path | Location, data: bytes) -> bool:
    """Create ``lock`` holding ``data``, whole and only if it does not exist; False when it does."""
    if isinstance(lock, Location):
        return _objects(lock).create(lock.name, data)
    temporary = lock.with_name(f"{lock.name}.{socket.gethostname()}.{os.getpid()}")
    temporary.write_bytes(data)
    try:
        os.link(temporary, lock)
        return True
    except FileExistsError:
        return os.stat(temporary).st_nlink == 2  # NFS: the link was made, its reply lost, the retry refused
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
            raise
    finally:
        temporary.unlink(missing_ok=True)
    try:  # a filesystem without hard links
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _release(lock: Path | Location, mine: bytes) -> None:
    """Remove ``lock`` if it is still this run's (a run taken for dead may have lost it)."""
    if _read(lock, wait=False) == mine:
        _unlink(lock)


def _unlink(lock: Path | Location) -> None:
    if isinstance(lock, Location):
        _objects(lock).delete(lock.name)
    else:
        lock.unlink(missing_ok=True)


def _objects(lock: Location):
    """The objects beside a lock object (its parent key), where it is created, read and deleted."""
    from stores.files import ObjectFiles

    return ObjectFiles(lock.parent)


def _remove_stale(lock: Path | Location, stale: bytes) -> bool:
    """Remove ``lock`` if it still holds ``stale``, under this host's takeover mutex (the module
    docstring); True when this run removed it."""
    with _takeover_mutex():
        if _read(lock, wait=False) != stale:
            return False
        _unlink(lock)
        return True


@contextmanager
def _takeover_mutex() -> Iterator[None]:
    path = Path(tempfile.gettempdir()) / TAKEOVER_MUTEX
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # a read-only fd can be flocked: any user may use it
    except OSError:  # no usable temporary folder: unserialised (two takeovers at one instant could both win)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


# --------------------------------------------------------------------------- who holds it

def _this_run() -> dict[str, Any]:
    run = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
           "started": datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": shlex.join(["xmei" if i == 0 else a for i, a in enumerate(sys.argv)])}
    if "SLURM_JOB_ID" in os.environ:
        run["slurm_job"] = os.environ["SLURM_JOB_ID"]
        run["slurm_restart"] = _restarts()
    return run


def _restarts() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", 0))
    except ValueError:
        return 0


def _requeued(holder: dict[str, Any]) -> bool:
    """Whether the holder was an earlier run of this very SLURM job, on any host: a requeued job
    (preempted, or ``scontrol requeue``) keeps its id and counts its restarts, and SLURM ends one
    run of a job before it starts the next."""
    job = os.environ.get("SLURM_JOB_ID")
    restart = holder.get("slurm_restart", 0)
    return job is not None and holder.get("slurm_job") == job and isinstance(restart, int) and restart < _restarts()


def _read(lock: Path | Location, wait: bool = True) -> bytes | None:
    """The bytes of ``lock`` (None when it does not exist); an empty file, one being written after
    an O_EXCL creation, is read again for up to READ_WAIT_S."""
    deadline = time.monotonic() + (READ_WAIT_S if wait else 0)
    while True:
        try:
            raw = _objects(lock).read(lock.name) if isinstance(lock, Location) else lock.read_bytes()
        except FileNotFoundError:
            return None
        if raw.endswith(b"\n") or time.monotonic() >= deadline:
            return raw
        time.sleep(0.05)


def _holder(raw: bytes, lock: Path, folder: Path, option: str) -> dict[str, Any]:
    try:
        holder = json.loads(raw)
        if isinstance(holder, dict) and isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int):
            return holder
    except ValueError:
        pass
    raise RunLockError(f"{option} {folder} holds a lock file that names no run: {lock}. If no other run is writing "
                       f"into {folder}, delete {lock} and run again")


def _named(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (f"`{holder.get('command', '?')}` (pid {holder['pid']} on {holder['host']}{job}, started "
            f"{holder.get('started', '?')})")


def _another_host(holder: dict[str, Any], lock: Path, folder: Path, option: str) -> str:
    check = f"`ssh {holder['host']} ps -p {holder['pid']}`" + (
        f" or `squeue -j {holder['slurm_job']}`" if holder.get("slurm_job") else "")
    return (f"{option} {folder} is in use by a run on another host: {_named(holder)}. Its end cannot be seen from "
            f"here: if that run is gone (check: {check}), delete {lock} and run again; otherwise wait for it, or "
            f"choose another {option}")


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder's process (of this host) still runs: its pid exists and, where both
    are known, started when the holder's did (else the pid was reused)."""
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    started, now = holder.get("process_start"), _process_start(pid)
    return started is None or now is None or started == now


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (Linux); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22; the name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None
