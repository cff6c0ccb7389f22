"""Errors a user can fix, and how a command ends on one.

Every error class for a mistake outside the code (a bad file or record, a damaged store or
checkpoint, a wrong config or device, a missing model) derives from ``UserError``. `xmei`'s
entry point ends on one with its message, which names the culprit, and exit status 1, no
traceback; ``--debug`` or ``XMEI_DEBUG=1`` shows the traceback too. Any other exception is a bug
and keeps its traceback. This module imports nothing of the project: both stages use it.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["UserError", "debugging", "message_of", "read_text"]

DEBUG_VARIABLE = "XMEI_DEBUG"


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


def read_text(path: Path, what: str, error: type[UserError] = UserError) -> str:
    """The UTF-8 text of a file the user gave (``what``: "config file", ...); ``error`` naming the
    file when it is a folder, missing, unreadable, or not UTF-8 (with the byte and line)."""
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(f"{path}: not UTF-8 text: byte {err.start} (line {line}) is 0x{data[err.start]:02x}; "
                    "save the file as UTF-8") from None
