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
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["JSON_TYPES", "UserError", "debugging", "json_lines", "json_type", "message_of", "parse_json", "read_json",
           "read_text"]

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


def _failure(path: Path, what: str, error: type[UserError], hint: str,
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
        fail = _failure(Path(path), what, error, hint, line)
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
    text = read_text(path, what, error, hint)
    fail = _failure(Path(path), what, error, hint)
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
    text = read_text(path, what, error, hint)
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit in a string
        if line.strip():
            yield number, parse_json(line, path, what, error, hint, line=number)
