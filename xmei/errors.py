"""Errors a user can fix, and how a command ends on one.

Every error class for a mistake outside the code (a bad file or record, a damaged store or
checkpoint, a wrong config or device, a missing model) derives from ``UserError``. `xmei`'s
entry point ends on one with its message, which names the culprit, and exit status 1, no
traceback; ``--debug`` or ``XMEI_DEBUG=1`` shows the traceback too. Any other exception is a bug
and keeps its traceback. This module imports nothing of the project: both stages use it.
"""
from __future__ import annotations

import os

__all__ = ["UserError", "debugging", "message_of"]

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
