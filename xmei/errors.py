"""Errors a user can fix, and how a command ends on one.

Every error class for a mistake outside the code (a bad file or record, a damaged store or
checkpoint, a wrong config or device, a missing model) derives from ``UserError``. `xmei`'s
entry point ends on one with its message, which names the culprit, and exit status 1, no
traceback; ``--debug`` or ``XMEI_DEBUG=1`` shows the traceback too. Any other exception is a bug
and keeps its traceback. This module imports nothing of the project: both stages use it.

It also holds the one reader of the files a user or an earlier run gives (annotations, configs,
predictions, store and checkpoint metadata): :func:`read_text`, :func:`read_json` and
:func:`json_lines` raise the caller's error class with one wording, the file and what it holds first:

    PATH (WHAT) does not exist | is a folder, not a file | cannot be read: REASON | is empty
    PATH (WHAT) is not UTF-8 text: byte B (line L, column C) is 0xNN [(the end of the file: cut off?)]
    PATH (WHAT) is not valid JSON: MESSAGE at line L, column C [(the end of the file: cut off?)]
    PATH (WHAT) holds a JSON array, expected an object
    PATH (WHAT): line L is not valid JSON: MESSAGE at column C          (JSON Lines)

followed by ``; HINT`` where the caller gives one (what to do about it). A byte order mark at the
start of a file is no content and is dropped.

And the one wording of a full disk, for every writer (stores, checkpoints, logs, eval outputs,
exports, reports): :func:`writing` turns a write that fails for want of space into a
:class:`DiskFullError`; :func:`check_space` refuses a long write before it starts:

    no space left on MOUNT (DEVICE, TYPE: FREE free of SIZE) while writing PATH (WHAT)[; HINT]
    not enough space on MOUNT (DEVICE, TYPE: FREE free of SIZE) for PATH (WHAT): it needs about NEED[; HINT]

A full disk shows in three ways: an OSError ENOSPC or EDQUOT (Python, Zarr, h5py); the system's
words in another error's message (safetensors and tokenizers, written in Rust); torch's
serializer, which loses the errno (``[enforce fail at inline_container.cc:N] . unexpected pos``,
``PytorchStreamWriter failed writing file``): taken for a full disk only when the filesystem has
less than NEARLY_FULL (or 1% of it) free after it failed.
"""
from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["JSON_TYPES", "DiskFullError", "UserError", "byte_size", "check_space", "debugging", "decode_text",
           "disk_full", "filesystem", "json_lines", "json_type", "json_value", "message_of", "parse_json",
           "parse_json_lines", "read_json", "read_text", "write_whole", "writing"]

DEBUG_VARIABLE = "XMEI_DEBUG"
JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
              type(None): "null"}  # the names a message gives Python's types
CUT_OFF = " (the end of the file: cut off?)"  # said of a file whose text stops where it fails


class UserError(Exception):
    """A mistake the user can fix; its message names the file and, where there is one, the
    record / array / shard / key."""


def debugging() -> bool:
    """True when tracebacks of user errors are asked for (``XMEI_DEBUG`` set to 1 / true / yes)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() in ("1", "true", "yes")


def message_of(err: BaseException) -> str:
    """The error's own message. A DataLoader worker's error comes back re-raised as
    ``Caught X in DataLoader worker process 0. Original Traceback ...: X: message``: only the
    message is kept."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        marker = f"{type(err).__name__}: "
        at = text.rfind(marker)
        if at >= 0:
            return text[at + len(marker):].strip()
    return text


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type ("object", "array", ...)."""
    return JSON_TYPES.get(type(value), type(value).__name__)


def _failure(path: str | Path, what: str, error: type[UserError], hint: str,
             line: int | None = None) -> Callable[[str], UserError]:
    """A function making ``error`` from a problem, worded as the module docstring shows."""
    where = f"{path} ({what})" + ("" if line is None else f": line {line}")
    return lambda problem: error(f"{where} {problem}" + (f"; {hint}" if hint else ""))


def read_text(path: str | Path, what: str, error: type[UserError] = UserError, hint: str = "") -> str:
    """The UTF-8 text of a file (``what``: "the config file", "the store's attributes", ...), a byte
    order mark at its start dropped; ``error`` naming the file when it is missing, a folder,
    unreadable, or not UTF-8 (with the byte, line and column)."""
    path = Path(path)
    fail = _failure(path, what, error, hint)
    if path.is_dir():
        raise fail("is a folder, not a file")
    if not path.is_file():
        raise fail("does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise fail(f"cannot be read: {err.strerror or err}") from None
    return decode_text(data, path, what, error, hint)


def decode_text(data: bytes, path: str | Path, what: str, error: type[UserError] = UserError, hint: str = "") -> str:
    """``data``, the whole of file (or object) ``path``, as :func:`read_text` gives it."""
    fail = _failure(path, what, error, hint)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = len(data[data.rfind(b"\n", 0, err.start) + 1:err.start].decode("utf-8")) + 1  # characters, as JSON's
        ends = err.reason == "unexpected end of data"  # a character's bytes cut short
        raise fail(f"is not UTF-8 text: byte {err.start} (line {line}, column {column}) is "
                   f"0x{data[err.start]:02x}" + (CUT_OFF if ends else "")) from None
    return text.removeprefix("\ufeff")


def parse_json(text: str, path: str | Path, what: str, error: type[UserError] = UserError, hint: str = "",
               line: int | None = None) -> Any:
    """The JSON value of ``text``, the whole of file ``path`` or (``line``) one line of it; else
    ``error`` naming the file, the line and the column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        fail = _failure(path, what, error, hint, line)
        problem = f"is not valid JSON: {err.msg.removesuffix(' at')} at"  # "Unterminated string starting at"
        if line is not None:
            raise fail(f"{problem} column {err.colno}") from None
        rest = text[err.pos:].strip()  # a file cut off stops in its last value: "", "tru", "1e", "\"abc ..."
        ends = err.msg.startswith("Unterminated string") or \
            (err.msg != "Extra data" and re.fullmatch(r"[\w.+-]*", rest) is not None)
        raise fail(f"{problem} line {err.lineno}, column {err.colno}" + (CUT_OFF if ends else "")) from None


def read_json(path: str | Path, what: str, error: type[UserError] = UserError, kind: type | None = dict,
              hint: str = "") -> Any:
    """The JSON value in a file, a ``kind`` (dict: an object, list: an array; None: any); ``error``
    naming the file when it cannot be read (:func:`read_text`), is empty, is not valid JSON (line
    and column) or holds another type."""
    return json_value(read_text(path, what, error, hint), path, what, error, kind, hint)


def json_value(text: str, path: str | Path, what: str, error: type[UserError] = UserError, kind: type | None = dict,
               hint: str = "") -> Any:
    """The JSON value of ``text``, the whole of file (or object) ``path``, as :func:`read_json` gives it."""
    fail = _failure(path, what, error, hint)
    if not text.strip():
        raise fail("is empty")
    value = parse_json(text, path, what, error, hint)
    if kind is not None and not isinstance(value, kind):
        raise fail(f"holds a JSON {json_type(value)}, expected an {JSON_TYPES[kind]}")
    return value


def json_lines(path: str | Path, what: str, error: type[UserError] = UserError,
               hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number from 1, value) of each non-blank line of a JSON Lines file; ``error`` naming the
    file when it cannot be read (:func:`read_text`) and the line and column of one that is not JSON."""
    return parse_json_lines(read_text(path, what, error, hint), path, what, error, hint)


def parse_json_lines(text: str, path: str | Path, what: str, error: type[UserError] = UserError,
                     hint: str = "") -> Iterator[tuple[int, Any]]:
    """The values of the lines of ``text``, the whole of a JSON Lines file (or object) ``path``, as
    :func:`json_lines` gives them."""
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit in a string
        if line.strip():
            yield number, parse_json(line, path, what, error, hint, line=number)


# --------------------------------------------------------------------------- full disks

FULL = {errno.ENOSPC: "no space left", errno.EDQUOT: "no space left (disk quota exceeded)"}
FULL_WORDS = {os.strerror(code): code for code in FULL}  # as Rust's errors and h5py's messages say them
TORCH_WRITER = ("PytorchStreamWriter failed", "] . unexpected pos")  # torch's serializer, errno lost
NEARLY_FULL = 16 * 2**20  # bytes free (or 1% of a small disk) under which torch's failed write met a full disk
CLOSE = 1.2  # check_space warns when less than this many times what is needed is free


class DiskFullError(UserError):
    """A write that found no space (or no quota) on its filesystem, or was refused before it began
    because too little is free; the message names the filesystem, the path and what it is."""


def byte_size(n: float) -> str:
    """1234567 -> "1.2 MB" (decimal units, as ``df -H``)."""
    units, k = ("B", "kB", "MB", "GB", "TB"), 0
    while abs(n) >= 1000 and k < len(units) - 1:
        n, k = n / 1000, k + 1
    return f"{n:.0f} B" if k == 0 else f"{n:.1f} {units[k]}"


def _existing(path: str | Path) -> Path:
    """``path`` or its nearest folder that exists (what a write would land on), symlinks resolved."""
    path = Path(os.path.realpath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: str | Path) -> int:
    """Bytes this user may still write on the filesystem of ``path`` (or of its nearest existing folder)."""
    stat = os.statvfs(_existing(path))
    return stat.f_bavail * stat.f_frsize


def _nearly_full(path: str | Path) -> bool:
    """Whether the filesystem of ``path`` has less than NEARLY_FULL free, or 1% on a small one."""
    stat = os.statvfs(_existing(path))
    return stat.f_bavail < min(NEARLY_FULL // stat.f_frsize, stat.f_blocks // 100)


def _octal(match: re.Match) -> str:
    """The character of an octal escape of /proc/self/mounts ("\\040" is a space)."""
    return chr(int(match[1], 8))


def _mount(path: Path) -> tuple[str, str, str] | None:
    """(mount point, device, type) of the filesystem holding ``path``: the longest mount point of
    /proc/self/mounts above it; None where there is no such file (not Linux)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        device, point, kind = (re.sub(r"\\([0-7]{3})", _octal, field) for field in fields[:3])
        if (path == Path(point) or Path(point) in path.parents) and (best is None or len(point) >= len(best[0])):
            best = (point, device, kind)  # the later of two equal mount points is the one on top
    return best


def filesystem(path: str | Path) -> str:
    """The filesystem of ``path`` in words: "MOUNT (DEVICE, TYPE: FREE free of SIZE)"."""
    where = _existing(path)
    stat = os.statvfs(where)
    space = f"{byte_size(stat.f_bavail * stat.f_frsize)} free of {byte_size(stat.f_blocks * stat.f_frsize)}"
    mount = _mount(where)
    if mount is None:
        return f"the filesystem of {where} ({space})"
    point, device, kind = mount
    return f"{point} ({device}, {kind}: {space})"


def disk_full(err: BaseException, path: str | Path) -> int | None:
    """ENOSPC or EDQUOT when ``err`` (or an error it was raised from) is a write to ``path`` that
    found its filesystem full; else None. See the module docstring for the three ways it shows."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in FULL:
            return err.errno
        text = str(err)
        for words, code in FULL_WORDS.items():
            if words in text:
                return code
        if isinstance(err, RuntimeError) and any(m in text for m in TORCH_WRITER) and _nearly_full(path):
            return errno.ENOSPC
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def writing(path: str | Path, what: str, hint: str = "") -> Iterator[None]:
    """Around the writing of ``path`` (``what`` it is: "checkpoint step_0000006"): an error that is
    a full disk (:func:`disk_full`) becomes a DiskFullError naming the filesystem, the path and
    ``what``, followed by ``hint`` (what was kept, how to go on). A DiskFullError from within (a
    nested ``writing``, which named the file) gets the hint added. Cleaning up is the caller's."""
    try:
        yield
    except DiskFullError as err:
        if not hint or hint in str(err):
            raise
        raise DiskFullError(f"{err}; {hint}") from err
    except Exception as err:  # noqa: BLE001 - only a full disk is taken; anything else goes on as it was
        code = disk_full(err, path)
        if code is None:
            raise
        raise DiskFullError(f"{FULL[code]} on {filesystem(path)} while writing {path} ({what})"
                            + (f"; {hint}" if hint else "")) from err


def write_whole(path: str | Path, content: str | Callable[[Path], object], what: str, hint: str = "") -> Path:
    """Write ``content`` to ``path`` whole or not at all: a text (UTF-8), or a function that writes
    the file it is given. It goes into ``PATH.partial-<pid>`` beside it, then is renamed over it, so
    an earlier file stays as it was until the new one is complete. A full disk is a DiskFullError
    (:func:`writing`), the partial file removed."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        with writing(path, what, hint):
            if isinstance(content, str):
                partial.write_text(content, encoding="utf-8")
            else:
                content(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def check_space(path: str | Path, need: int, what: str, hint: str = "", close: int | None = None) -> str | None:
    """Before writing about ``need`` bytes at ``path`` (``what`` they are): a DiskFullError when its
    filesystem has less free; the text of a warning when it has less than ``close`` (default
    CLOSE times ``need``), which the caller shows; None when there is room."""
    free = _free_bytes(path)
    if free < need:
        raise DiskFullError(f"not enough space on {filesystem(path)} for {path} ({what}): it needs about "
                            f"{byte_size(need)}" + (f"; {hint}" if hint else ""))
    close = int(CLOSE * need) if close is None else close
    if free < close:
        return f"little space on {filesystem(path)} for {path} ({what}): it will take about {byte_size(close)}"
    return None
