"""The annotation contract: the input of stage 1.

A JSON list (or JSONL, one object a line) of records with the 11 published fields. Media
paths are relative to a media root; an empty ``audio_path`` means "use the video's own audio
track". Labels are normalized against the configured label sets. Every text is kept by the store
byte for byte (NUL and control characters too); one that no UTF-8 text can hold (a lone UTF-16
surrogate, which a JSON "\\ud800" escape makes) is a problem of its record and field.

A media path stays inside the media root: one that climbs out of it (``../../etc/passwd``,
``videos/../../x.mp4``) is a problem of its record and field. The check is lexical (the path is
normalized, symlinks are not resolved), because datasets often symlink their media folders
elsewhere. An absolute path is refused the same way unless asked for (``allow_absolute``:
``--allow-absolute-paths``, or ``extract.allow_absolute_paths: true``); it then wins over the root.

:func:`check_annotations` never stops at the first problem: it returns the good records and
every problem, each naming record index, video_id and field. :func:`read_annotations` raises
one :class:`AnnotationError` listing them all.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from stores import unstorable
from xmei.errors import UserError, parse_json, read_text
from xmei.labels import LabelSet

__all__ = ["FIELDS", "AnnotationError", "Problem", "Record", "Summary", "check_annotations",
           "default_media_root", "extra_values", "read_annotations", "write_annotations"]


@dataclass(frozen=True)
class Record:
    """One clip. ``emotion``/``intent`` are canonical labels ("" in an unlabeled split)."""

    video_id: str
    video_path: str
    audio_path: str
    subtitle: str
    emotion: str
    intent: str
    video_description: str
    audio_description: str
    emotion_reason: str
    intent_reason: str
    explanation: str

    def video_file(self, media_root: Path) -> Path:
        return media_root / self.video_path  # an absolute video_path wins over media_root

    def audio_file(self, media_root: Path) -> Path | None:
        """The audio file, or None when the audio comes from the video's own track."""
        return media_root / self.audio_path if self.audio_path else None


FIELDS = tuple(f.name for f in fields(Record))
_MAY_BE_EMPTY = {"audio_path", "subtitle", "video_description", "audio_description",
                 "emotion_reason", "intent_reason", "explanation"}


@dataclass(frozen=True)
class Problem:
    index: int | None  # record index in the file (0-based); None for file-level problems
    video_id: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = [] if self.index is None else [f"record {self.index}"]
        if self.video_id is not None:
            where.append(f"video_id {self.video_id!r}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where) or 'file'}: {self.message}"


class AnnotationError(UserError, ValueError):
    def __init__(self, path: Path, problems: list[Problem]):
        self.path, self.problems = path, problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s):\n{lines}")


@dataclass
class Summary:
    count: int
    emotions: dict[str, int]  # in label-set order
    intents: dict[str, int]
    audio_from_file: int
    audio_from_video_track: int
    missing_media: list[str]  # video_ids with a missing video or audio file
    extra_fields: list[str]  # fields beyond the 11, ignored


def default_media_root(annotations: Path) -> Path | None:
    """The dataset folder of the published layout ``DATASET/annotations/SPLIT.json``."""
    parent = Path(annotations).resolve().parent
    return parent.parent if parent.name == "annotations" else None


def check_annotations(path: str | Path, emotions: LabelSet, intents: LabelSet,
                      media_root: str | Path | None = None, labeled: bool = True,
                      allow_absolute: bool = False) -> tuple[list[Record], list[Problem], Summary]:
    """Read and check every record. Media files are checked when ``media_root`` is given."""
    path = Path(path)
    raw, problems = _read_raw(path)
    records: list[Record] = []
    seen: dict[str, int] = {}
    missing: list[str] = []
    extra: set[str] = set()
    root = Path(media_root) if media_root is not None else None
    for index, item in raw:
        if not isinstance(item, dict):
            problems.append(Problem(index, None, None, f"expected an object, got {type(item).__name__}"))
            continue
        video_id = item.get("video_id") if isinstance(item.get("video_id"), str) else None
        extra.update(k for k in item if k not in FIELDS)
        values, bad = _check_fields(index, video_id, item, labeled, emotions, intents)
        bad += _outside_root(index, video_id, values, allow_absolute)
        problems += bad
        if video_id is not None:
            if video_id in seen:
                problems.append(Problem(index, video_id, "video_id",
                                        f"duplicate: record {seen[video_id]} has the same video_id"))
                continue
            seen[video_id] = index
        if bad:
            continue
        record = Record(**values)
        if root is not None:
            gone = _missing_media(index, record, root)
            problems += gone
            if gone:
                missing.append(record.video_id)
        records.append(record)
    summary = Summary(
        count=len(raw),
        emotions=_distribution(emotions, records, "emotion"),
        intents=_distribution(intents, records, "intent"),
        audio_from_file=sum(1 for r in records if r.audio_path),
        audio_from_video_track=sum(1 for r in records if not r.audio_path),
        missing_media=missing,
        extra_fields=sorted(extra),
    )
    return records, problems, summary


def read_annotations(path: str | Path, emotions: LabelSet, intents: LabelSet,
                     media_root: str | Path | None = None, labeled: bool = True,
                     allow_absolute: bool = False) -> list[Record]:
    """All records, or an AnnotationError listing every problem."""
    records, problems, _ = check_annotations(path, emotions, intents, media_root, labeled, allow_absolute)
    if problems:
        raise AnnotationError(Path(path), problems)
    return records


def write_annotations(path: str | Path, records: list[Record]) -> None:
    """Write records as a JSON list (the published format), fields in published order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{f: getattr(r, f) for f in FIELDS} for r in records]
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


def extra_values(path: str | Path, name: str) -> dict[str, str]:
    """video_id -> the string value of the field ``name`` beyond the published 11 (e.g.
    ``subtitle_source``, which `xmei annotate` writes) of each record that has one; a record that
    cannot be read is left out here (:func:`read_annotations` names it)."""
    pairs, _ = _read_raw(Path(path))
    return {item["video_id"]: item[name] for _, item in pairs
            if isinstance(item, dict) and isinstance(item.get("video_id"), str) and isinstance(item.get(name), str)}


_EXPECTED = "expected a JSON list of records or JSONL, one object a line"
_WHAT = "the annotation file"


def _read_raw(path: Path) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """(index, object) pairs from a JSON list or JSONL file, and the file-level problems."""
    def fail(message: str) -> tuple[list, list[Problem]]:
        return [], [Problem(None, None, None, message)]

    try:
        text = read_text(path, _WHAT)
        if not text.strip():
            return fail(f"the file is empty; {_EXPECTED}")
        items = parse_json(text, path, _WHAT) if text.lstrip().startswith("[") else None
    except UserError as err:
        return fail(str(err))
    if items is not None:
        return (list(enumerate(items)), []) if items else fail(f"the file holds no records (an empty list); {_EXPECTED}")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        pass  # several lines of JSONL, or broken lines: read line by line below
    else:
        one_record = isinstance(whole, dict) and path.suffix == ".jsonl" and len(text.strip().splitlines()) == 1
        if isinstance(whole, dict) and not one_record:
            return fail(f"the file holds one JSON object, not a list of records; {_EXPECTED} "
                        "(one record alone: put it in [ ] or name the file .jsonl)")
        if not one_record:
            return fail(f"the file holds the JSON value {text.strip()[:40]}, not records; {_EXPECTED}")
    pairs, problems = [], []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit in a string
        if not line.strip():
            continue
        index = len(pairs) + len(problems)
        try:
            pairs.append((index, parse_json(line, path, _WHAT, line=lineno)))
        except UserError as err:  # every bad line is a problem of its record: read on
            problems.append(Problem(index, None, None, str(err)))
    return pairs, problems


def _check_fields(index: int, video_id: str | None, item: dict, labeled: bool,
                  emotions: LabelSet, intents: LabelSet) -> tuple[dict[str, str], list[Problem]]:
    values, problems = {}, []
    for name in FIELDS:
        if name not in item:
            problems.append(Problem(index, video_id, name, "missing field"))
            continue
        value = item[name]
        if not isinstance(value, str):
            problems.append(Problem(index, video_id, name,
                                    f"expected a string, got {type(value).__name__} {value!r}"))
            continue
        unkept = unstorable(value)
        if unkept:  # a store would change it: refused before anything is extracted
            problems.append(Problem(index, video_id, name, f"{unkept} (a JSON \\ud800-style escape without its "
                                                           "pair?): no store can keep this text as it is"))
            continue
        if not value.strip() and name not in _MAY_BE_EMPTY and (labeled or name not in ("emotion", "intent")):
            problems.append(Problem(index, video_id, name, "empty"))
            continue
        values[name] = value
    for name, labels in (("emotion", emotions), ("intent", intents)):
        value = values.get(name)
        if value is None or (not labeled and not value.strip()):
            continue
        canonical = labels.normalize(value)
        if canonical is None:
            problems.append(Problem(index, video_id, name,
                                    f"unknown label {value!r} (known: {', '.join(labels.labels)})"))
        else:
            values[name] = canonical
    return values, problems


def _outside_root(index: int, video_id: str | None, values: dict[str, str], allow_absolute: bool) -> list[Problem]:
    """A media path that leaves the media root, decided on the path alone (see the module docstring)."""
    problems = []
    for name in ("video_path", "audio_path"):
        value = values.get(name, "")
        if not value:
            continue
        if "\x00" in value:
            problems.append(Problem(index, video_id, name, f"character {value.index(chr(0))} (counting from 0) is NUL, "
                                                           "which no file path can hold"))
        elif os.path.isabs(value):
            if not allow_absolute:
                problems.append(Problem(index, video_id, name, f"{value!r} is an absolute path; media paths are "
                                        "relative to the media root (allow absolute ones with --allow-absolute-paths "
                                        "or extract.allow_absolute_paths: true)"))
        elif os.path.normpath(value).split(os.sep)[0] == "..":
            problems.append(Problem(index, video_id, name, f"{value!r} leaves the media root"))
    return problems


def _missing_media(index: int, record: Record, root: Path) -> list[Problem]:
    problems = []
    for name, path in (("video_path", record.video_file(root)), ("audio_path", record.audio_file(root))):
        if path is None or path.is_file():
            continue
        message = f"media file {path} is a folder, not a file" if path.is_dir() else f"missing media file {path}"
        problems.append(Problem(index, record.video_id, name, message))
    return problems


def _distribution(labels: LabelSet, records: list[Record], name: str) -> dict[str, int]:
    counts = Counter(getattr(r, name) for r in records)
    dist = {label: counts.get(label, 0) for label in labels.labels}
    if counts.get(""):
        dist["(unlabeled)"] = counts[""]
    return dist
