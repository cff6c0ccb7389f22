"""The one reader of given files (xmei.errors: read_text, read_json, json_lines): each fault named
with the file, what it holds and where (byte, line, column), in the caller's error class; and one
damaged file named the same way by the readers of both stages. In-process, on files of a few bytes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xmei.errors import UserError, json_lines, read_json, read_text

CUT_OFF = " (the end of the file: cut off?)"


class CallerError(UserError):
    """A caller's own error class: the reader raises it, not UserError."""


def written(tmp_path: Path, content: bytes, name: str = "f.json") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def failure(read, *args, error: type[UserError] = CallerError, **kwargs) -> str:
    """The message of the ``error`` that ``read(*args, **kwargs)`` raises (a generator read whole)."""
    with pytest.raises(error) as err:
        result = read(*args, **kwargs)
        if read is json_lines:
            list(result)  # a generator reads as it is iterated
    return str(err.value)


def test_missing_folder_and_unreadable_files(tmp_path, monkeypatch):
    assert failure(read_json, tmp_path / "none.json", "the thing", CallerError) == \
        f"{tmp_path / 'none.json'} (the thing) does not exist"
    assert failure(read_text, tmp_path, "the thing", CallerError) == f"{tmp_path} (the thing) is a folder, not a file"
    locked = written(tmp_path, b"{}")

    def denied(self):
        raise PermissionError(13, "Permission denied")  # as a file of mode 0 is to anyone but root (the tests' user)

    monkeypatch.setattr(Path, "read_bytes", denied)
    assert failure(read_json, locked, "the thing", CallerError) == \
        f"{locked} (the thing) cannot be read: Permission denied"


def test_not_utf8_names_byte_line_and_column(tmp_path):
    path = written(tmp_path, '{"a": 1,\n "é": "caf'.encode() + b"\xe9" + b'"}\n')
    expected = f"{path} (the thing) is not UTF-8 text: byte 20 (line 2, column 11) is 0xe9"  # é: 2 bytes, 1 column
    assert failure(read_text, path, "the thing", CallerError) == expected
    assert failure(read_json, path, "the thing", CallerError) == expected


def test_invalid_json_names_line_and_column(tmp_path):
    path = written(tmp_path, b'{"a": 1,\n "b" 2}\n')
    assert failure(read_json, path, "the thing", CallerError) == \
        f"{path} (the thing) is not valid JSON: Expecting ':' delimiter at line 2, column 6"
    cut = written(tmp_path, json.dumps({"a": [1, 2, 3], "b": "text"}).encode()[:25], "cut.json")
    assert failure(read_json, cut, "the thing", CallerError) == \
        f"{cut} (the thing) is not valid JSON: Unterminated string starting at line 1, column 23" + CUT_OFF


@pytest.mark.parametrize("content, cut", [(b'{"a": [1, 2', True), (b'{"a": tru', True), (b'{"a": 1.5e', True),
                                          (b'{"a": "caf\xc3', True), (b'{"a" 1}', False), (b'{"a": 1} x', False),
                                          (b'{"a": 1,\n"b": x}', False), (b'{"a": "caf\xe9"}', False)])
def test_a_file_that_stops_where_it_fails_is_said_cut_off(tmp_path, content, cut):
    """The file's text stops within its last value (a number, a word, a string, a character's bytes)."""
    said = failure(read_json, written(tmp_path, content), "the thing", CallerError)
    assert said.endswith(CUT_OFF) == cut, said


@pytest.mark.parametrize("content", [b"", b" \n\t\n"])
def test_an_empty_file_is_said_empty(tmp_path, content):
    path = written(tmp_path, content)
    assert failure(read_json, path, "the thing", CallerError) == f"{path} (the thing) is empty"


def test_the_wrong_top_level_type(tmp_path):
    path = written(tmp_path, b"[1, 2]")
    assert failure(read_json, path, "the thing", CallerError) == \
        f"{path} (the thing) holds a JSON array, expected an object"
    other = written(tmp_path, b'{"a": 1}', "g.json")
    assert failure(read_json, other, "the thing", CallerError, list, hint="fix it") == \
        f"{other} (the thing) holds a JSON object, expected an array; fix it"
    assert read_json(path, "the thing", CallerError, None) == [1, 2]


def test_a_byte_order_mark_is_no_content(tmp_path):
    assert read_json(written(tmp_path, b'\xef\xbb\xbf{"a": 1}'), "the thing") == {"a": 1}
    path = written(tmp_path, b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n', "f.jsonl")
    assert list(json_lines(path, "the thing")) == [(1, {"a": 1}), (3, {"a": 2})]


def test_json_lines_name_the_line_and_column(tmp_path):
    path = written(tmp_path, '{"a": "x\u2028y"}\n{"a": 2}\n{"a" 3}\n'.encode(), "f.jsonl")  # U+2028 is no line end
    rows = json_lines(path, "the thing", CallerError, hint="rewrite it")
    assert next(rows) == (1, {"a": "x\u2028y"}) and next(rows) == (2, {"a": 2})
    assert failure(next, rows) == \
        f"{path} (the thing): line 3 is not valid JSON: Expecting ':' delimiter at column 6; rewrite it"
    bad = written(tmp_path, b'{"a": 1}\n{"a": "\xff"}\n', "bad.jsonl")
    assert failure(json_lines, bad, "the thing", CallerError) == \
        f"{bad} (the thing) is not UTF-8 text: byte 16 (line 2, column 8) is 0xff"


def test_one_damaged_file_is_named_alike_by_every_reader(tmp_path, cfg):
    """A Latin-1 byte in a JSON file: the annotations, predictions, store and checkpoint readers name
    it with the same words, each in its own error class."""
    from pipeline.annotations import check_annotations
    from stores.store import FeatureStore, StoreError
    from xmei.checkpoint import CheckpointError
    from xmei.checkpoint import read_json as checkpoint_json
    from xmei.evaluate import EvaluationError, read_predictions

    path = written(tmp_path, b'{"video_id": "caf\xe9"}\n', "zarr.json")

    def said(what: str) -> str:
        return f"{path} ({what}) is not UTF-8 text: byte 17 (line 1, column 18) is 0xe9"

    _, problems, _ = check_annotations(path, cfg.emotions, cfg.intents)
    assert [str(p) for p in problems] == ["file: " + said("the annotation file")]
    assert failure(read_predictions, path, cfg.emotions, cfg.intents, error=EvaluationError) == \
        said("the predictions file")
    assert failure(FeatureStore, tmp_path, error=StoreError) == said("the store's attributes")
    assert failure(checkpoint_json, path, "the checkpoint's settings", error=CheckpointError) == \
        said("the checkpoint's settings")
