"""Fault suite: bad annotation files, media paths and config files, as a user meets them.

Each case runs `xmei` on one bad input and checks that it ends with the expected status, names the
culprit (file, record, field, key, line) and prints no traceback, and that nothing already written
(the input itself, an existing store) is lost or changed. An annotation fault is checked in both
`xmei validate` and `xmei extract`: extract reads the annotations before it touches its store, so
a bad file given to resume an existing store leaves that store as it was.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, config
from faults import assert_clean_error, assert_kept, flat, snapshot, xmei


@pytest.fixture(scope="module")
def rows(corpus) -> list[dict]:
    """Two good records of the corpus, both with an audio file; paths relative to the corpus."""
    train = json.loads((corpus / "annotations" / "train.json").read_text())
    return [r for r in train if r["audio_path"]][:2]


@pytest.fixture(scope="module")
def store(tiny_models, corpus, rows, tmp_path_factory) -> Path:
    """An existing store of the two records: every extract fault is a rerun into it."""
    from pipeline.extract import extract

    folder = tmp_path_factory.mktemp("faults_inputs")
    (folder / "good.json").write_text(json.dumps(rows))
    extract(config(tiny_models, "extract.shard_size=2"), folder / "good.json", corpus, folder / "store", workers=0)
    return folder / "store"


def models_args(tiny_models: Path) -> list[str]:
    """The settings the ``store`` fixture was made with, in this process (no dask)."""
    return ["--config", ROOT / "configs" / "tiny.yaml", "--models", tiny_models, "--set", "extract.shard_size=2",
            "--workers", "0"]


def run(command: str, path: Path, corpus: Path, tiny_models: Path, store: Path, *extra):
    """`xmei validate` or `xmei extract` (a rerun into ``store``) on the annotation file ``path``."""
    if command == "validate":
        return xmei("validate", path, "--media-root", corpus, *extra)
    return xmei("extract", "--annotations", path, "--out", store, "--media-root", corpus,
                *models_args(tiny_models), *extra)


def changed(rows: list[dict], index: int, **values) -> list[dict]:
    out = [dict(r) for r in rows]
    out[index].update(values)
    return out


def without(rows: list[dict], index: int, field: str) -> list[dict]:
    out = [dict(r) for r in rows]
    del out[index][field]
    return out


def where(rows: list[dict], index: int, field: str) -> str:
    return f"record {index}, video_id {rows[index]['video_id']!r}, field {field!r}"


# ------------------------------------------------------------------------ 1. annotation files

def non_utf8(rows, folder):
    text = json.dumps(rows, indent=1).encode()
    at = text.index(b'"subtitle": "') + len(b'"subtitle": "')
    path = folder / "latin1.json"
    path.write_bytes(text[:at] + b"caf\xe9 " + text[at:])  # a Latin-1 subtitle
    line, column = text[:at].count(b"\n") + 1, at + 3 - text.rfind(b"\n", 0, at)
    return path, [f"{path} (the annotation file) is not UTF-8 text: byte {at + 3} (line {line}, column {column}) "
                  "is 0xe9"]


def invalid_json(rows, folder):
    text = json.dumps(rows, indent=1)
    cut = text[:text.rindex("}")] + ",]"  # a trailing comma, the last object left open
    with pytest.raises(json.JSONDecodeError) as err:
        json.loads(cut)
    path = folder / "broken.json"
    path.write_text(cut)
    return path, [f"{path} (the annotation file) is not valid JSON: {err.value.msg} at line {err.value.lineno}, "
                  f"column {err.value.colno}"]


def jsonl_bad_line(rows, folder):
    path = folder / "broken.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n{oops\n" + json.dumps(rows[1]) + "\n")
    return path, [f"record 1: {path} (the annotation file): line 2 is not valid JSON: Expecting property name "
                  "enclosed in double quotes at column 2"]


def a_folder(rows, folder):
    path = folder / "split.json"
    path.mkdir()
    return path, [f"{path} (the annotation file) is a folder, not a file"]


def write(name: str, content, culprit):
    """A fault that is a file of ``content`` (text, or rows as JSON; or a function of the good rows)."""
    def make(rows, folder):
        path = folder / name
        body = content(rows) if callable(content) else content
        path.write_text(body if isinstance(body, str) else json.dumps(body))
        return path, [culprit(rows) if callable(culprit) else culprit]
    return make


ANNOTATION_FAULTS = {
    "non-utf8": non_utf8,
    "empty-list": write("a.json", "[]", "the file holds no records"),
    "json-object": write("a.json", lambda rows: {"records": rows},
                         "the file holds one JSON object, not a list of records; expected a JSON list of records or "
                         "JSONL, one object a line"),
    "pretty-printed-record": write("a.json", lambda rows: json.dumps(rows[0], indent=1), "one JSON object"),
    "invalid-json": invalid_json,
    "jsonl-bad-line": jsonl_bad_line,
    "not-an-object": write("a.json", lambda rows: [rows[0], "clip two"], "record 1: expected an object, got str"),
    "missing-field": write("a.json", lambda rows: without(rows, 1, "explanation"),
                           lambda rows: f"{where(rows, 1, 'explanation')}: missing field"),
    "number-as-subtitle": write("a.json", lambda rows: changed(rows, 0, subtitle=42),
                                lambda rows: f"{where(rows, 0, 'subtitle')}: expected a string, got int 42"),
    "unknown-label": write("a.json", lambda rows: changed(rows, 1, intent="gloating"),
                           lambda rows: f"{where(rows, 1, 'intent')}: unknown label 'gloating'"),
    "duplicate-id": write("a.json", lambda rows: changed(rows, 1, video_id=rows[0]["video_id"]),
                          lambda rows: f"record 1, video_id {rows[0]['video_id']!r}, field 'video_id': "
                                       "duplicate: record 0 has the same video_id"),
    "empty-id": write("a.json", lambda rows: changed(rows, 0, video_id=""),
                      "record 0, video_id '', field 'video_id': empty"),
    # a JSON "\ud800" escape without its pair: a text no UTF-8 store can keep (json.dumps writes the escape)
    "lone-surrogate-in-a-text": write("a.json", lambda rows: changed(rows, 1, explanation="So \ud83d. Then"),
                                      lambda rows: f"{where(rows, 1, 'explanation')}: character 3 (counting from 0) "
                                                   "is U+D83D, a lone UTF-16 surrogate"),
    "lone-surrogate-in-an-id": write("a.json", lambda rows: changed(rows, 0, video_id="clip\udc00"),
                                     "record 0, video_id 'clip\\udc00', field 'video_id': character 4 (counting "
                                     "from 0) is U+DC00"),
    "nul-in-a-media-path": write("a.json", lambda rows: changed(rows, 1, audio_path="audio/a\x00.wav"),
                                 lambda rows: f"{where(rows, 1, 'audio_path')}: character 7 (counting from 0) is NUL, "
                                              "which no file path can hold"),
    "empty-file": write("a.json", "", "the file is empty"),
    "blank-jsonl": write("a.jsonl", "\n  \n", "the file is empty"),
    "no-such-file": lambda rows, folder: (folder / "absent.json",
                                          [f"{folder / 'absent.json'} (the annotation file) does not exist"]),
    "a-folder": a_folder,
}


@pytest.mark.parametrize("command", ["validate", "extract"])
@pytest.mark.parametrize("fault", list(ANNOTATION_FAULTS))
def test_bad_annotation_file_ends_cleanly(fault, command, rows, corpus, tiny_models, store, tmp_path):
    path, culprits = ANNOTATION_FAULTS[fault](rows, tmp_path)
    kept = snapshot(store, *([path] if path.is_file() else []))
    result = run(command, path, corpus, tiny_models, store)
    said = assert_clean_error(result, path, *culprits)
    assert "problem(s)" in said
    assert_kept(kept)


def test_an_extra_field_named_with_a_lone_surrogate_is_shown_escaped(rows, corpus, tmp_path):
    """Extra fields are ignored, and named: one whose name no UTF-8 can print shows its escape (not a traceback)."""
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{**rows[0], "note\ud800": "x"}, rows[1]]))
    result = xmei("validate", path, "--media-root", corpus)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "fields beyond the published 11, ignored: note\\ud800" in result.stdout


def test_validate_lists_every_problem_at_once(rows, corpus, tmp_path):
    bad = changed(rows, 0, emotion="ecstatic", subtitle=None)
    bad[1]["video_path"] = "videos/nowhere.mp4"
    path = tmp_path / "a.json"
    path.write_text(json.dumps(bad))
    said = assert_clean_error(xmei("validate", path, "--media-root", corpus, process=True), path, "3 problem(s)",
                              f"{where(bad, 0, 'subtitle')}: expected a string, got NoneType None",
                              f"{where(bad, 0, 'emotion')}: unknown label 'ecstatic'",
                              f"{where(bad, 1, 'video_path')}: missing media file {corpus / 'videos/nowhere.mp4'}")
    assert said.count("record ") == 3


@pytest.mark.parametrize("field", ["video_path", "audio_path"])
def test_validate_names_missing_media_and_folders_in_their_place(field, rows, corpus, tmp_path):
    (tmp_path / "media" / "videos").mkdir(parents=True)
    (tmp_path / "media" / "audios").mkdir()
    (tmp_path / "media" / rows[1][field]).mkdir()                  # a folder where record 1's file should be
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    result = xmei("validate", path, "--media-root", tmp_path / "media")
    assert_clean_error(result, path,
                       f"{where(rows, 0, field)}: missing media file {tmp_path / 'media' / rows[0][field]}",
                       f"{where(rows, 1, field)}: media file {tmp_path / 'media' / rows[1][field]} is a folder")


def test_extract_records_missing_media_and_folders_as_failed_clips(rows, corpus, tiny_models, tmp_path):
    """Stage 1 by design marks such a clip failed with its reason and goes on. Extracted here in this
    process (the encoders are loaded already); the command, resuming the store, names each failed
    clip and its file on stderr, without a traceback."""
    from pipeline.extract import extract

    media = tmp_path / "media"
    for r in rows:
        for field in ("video_path", "audio_path"):
            (media / r[field]).parent.mkdir(parents=True, exist_ok=True)
            (media / r[field]).symlink_to(corpus / r[field])
    (media / rows[0]["video_path"]).unlink()                   # missing video
    (media / rows[1]["audio_path"]).unlink()
    (media / rows[1]["audio_path"]).mkdir()                    # a folder in place of the wav
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    summary = extract(config(tiny_models, "extract.shard_size=2"), path, media, tmp_path / "store", workers=0)
    assert summary.ok == 0 and [row["stage"] for row in summary.failed] == ["video", "audio"]
    kept = snapshot(path, tmp_path / "store")
    result = xmei("extract", "--annotations", path, "--out", tmp_path / "store", "--media-root", media,
                  *models_args(tiny_models))
    said = flat(result.stderr)
    assert result.returncode == 0 and "Traceback" not in said, said[-3000:]
    assert f"failed {rows[0]['video_id']} (video): " in said and str(media / rows[0]["video_path"]) in said
    assert f"failed {rows[1]['video_id']} (audio): " in said and str(media / rows[1]["audio_path"]) in said
    assert "0 ok, 2 failed of 2 clips" in flat(result.stdout)
    assert_kept(kept)


# ------------------------------------------------------------------------ 2. media paths inside the root

@pytest.mark.parametrize("command", ["validate", "extract"])
@pytest.mark.parametrize("field,value", [("video_path", "../../../etc/passwd"), ("video_path", "videos/../../x.mp4"),
                                         ("audio_path", "audios/./../../../x.wav")])
def test_media_path_leaving_the_root_is_refused(command, field, value, rows, corpus, tiny_models, store, tmp_path):
    bad = changed(rows, 1, **{field: value})
    path = tmp_path / "a.json"
    path.write_text(json.dumps(bad))
    kept = snapshot(store, path)
    result = run(command, path, corpus, tiny_models, store)
    assert_clean_error(result, path, f"{where(bad, 1, field)}: {value!r} leaves the media root")
    assert_kept(kept)


@pytest.mark.parametrize("command", ["validate", "extract"])
def test_absolute_media_path_is_refused_by_default(command, rows, corpus, tiny_models, store, tmp_path):
    absolute = str(corpus / rows[0]["video_path"])  # the file is there: only the form is refused
    bad = changed(rows, 0, video_path=absolute)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(bad))
    kept = snapshot(store, path)
    result = run(command, path, corpus, tiny_models, store)
    assert_clean_error(result, path, f"{where(bad, 0, 'video_path')}: {absolute!r} is an absolute path",
                       "--allow-absolute-paths", "extract.allow_absolute_paths: true")
    assert_kept(kept)


def test_absolute_media_paths_are_accepted_when_allowed(rows, corpus, tiny_models, tmp_path):
    """By the config key (validate; an extraction in this process) and by the flag (validate; the
    command resuming that store)."""
    from pipeline.extract import extract

    one = [changed(rows, 1, video_path=str(corpus / rows[1]["video_path"]),
                   audio_path=str(corpus / rows[1]["audio_path"]))[1]]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(one))
    for allow in (["--allow-absolute-paths"], ["--set", "extract.allow_absolute_paths=true"]):
        result = xmei("validate", path, "--media-root", tmp_path, *allow)  # another root: absolute paths win
        assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    cfg = config(tiny_models, "extract.shard_size=2", "extract.allow_absolute_paths=true")
    summary = extract(cfg, path, tmp_path, tmp_path / "store", workers=0)
    assert summary.ok == 1 and not summary.failed
    kept = snapshot(path, tmp_path / "store")
    result = xmei("extract", "--annotations", path, "--out", tmp_path / "store", "--media-root", tmp_path,
                  *models_args(tiny_models), "--allow-absolute-paths")
    assert result.returncode == 0 and "1 ok, 0 failed of 1 clips" in flat(result.stdout), result.stderr
    assert_kept(kept)


def test_allowing_absolute_paths_does_not_change_what_a_store_is_made_with(rows, corpus, tiny_models, store):
    """extract.allow_absolute_paths is a run setting (RUN_ONLY): a rerun with it resumes the store."""
    kept = snapshot(store)
    result = xmei("extract", "--annotations", store.parent / "good.json", "--out", store, "--media-root", corpus,
                  *models_args(tiny_models), "--allow-absolute-paths")
    assert result.returncode == 0 and "resuming: 1 of 1 shards already done" in flat(result.stderr), result.stderr
    assert_kept(kept)


# ------------------------------------------------------------------------ 3. config files

def yaml_file(name: str, content: bytes | str):
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return make


# name: (the config file or None, extra arguments, culprits); the file is named too when there is one
CONFIG_FAULTS = {
    "non-utf8": (yaml_file("c.yaml", b"run:\n  init_lr: 1e-4  # r\xe9glage\n"), [],
                 ["(the config file) is not UTF-8 text: byte 25 (line 2, column 21) is 0xe9"]),
    "syntax-error": (yaml_file("c.yaml", "run:\n  init_lr: [1e-4\n  max_epoch: 2\n"), [],
                     ["not valid YAML at line 3, column 12", "while parsing a flow sequence at line 2"]),
    "top-level-list": (yaml_file("c.yaml", "- run\n- model\n"), [], ["the top level must be a mapping of sections"]),
    "unknown-key": (yaml_file("c.yaml", "run:\n  init_lr: 1e-4\n  warmup: 10\n"), [], ["run.warmup: unknown key"]),
    "section-not-mapping": (yaml_file("c.yaml", "run: 3\n"), [], ["run: expected a mapping, got int 3"]),
    "wrong-type": (yaml_file("c.yaml", "run:\n  init_lr: fast\n"), [], ["run.init_lr: expected float, got str 'fast'"]),
    "out-of-range": (yaml_file("c.yaml", "model:\n  caption_dropout: 1.5\n"), [],
                     ["model.caption_dropout: a probability in [0, 1), got 1.5"]),
    "set-without-value": (None, ["--set", "run.init_lr"], ["--set 'run.init_lr': expected section.key=value"]),
    "set-unknown-section": (None, ["--set", "trainer.lr=1"], ["trainer: unknown key"]),
    "set-bad-value": (None, ["--set", "extract.allow_absolute_paths=maybe"],
                      ["extract.allow_absolute_paths: expected bool, got str 'maybe'"]),
    "config-missing": (lambda folder: folder / "none.yaml", [], ["(the config file) does not exist"]),
    "config-is-folder": (lambda folder: (folder / "cfg").mkdir() or folder / "cfg", [],
                         ["(the config file) is a folder, not a file"]),
    "models-missing": (None, ["--models", "no/such/models"], ["--models no/such/models: no such folder"]),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_bad_config_ends_cleanly(fault, tmp_path):
    make, extra, culprits = CONFIG_FAULTS[fault]
    path = make(tmp_path) if make else None
    args = ["--config", path] if path is not None else []
    kept = snapshot(path) if path is not None and path.is_file() else {}
    result = xmei("config", *args, *extra, cwd=tmp_path)
    assert_clean_error(result, *([path] if path is not None else []), *culprits, status=2)
    assert_kept(kept)


def test_model_folder_that_is_not_a_model_is_named_by_extract(rows, corpus, tiny_models, store, tmp_path):
    empty = tmp_path / "clip"
    empty.mkdir()
    kept = snapshot(store)
    result = xmei("extract", "--annotations", store.parent / "good.json", "--out", store, "--media-root", corpus,
                  "--workers", "0", "--set", f"model.visual_encoder_path={empty}",
                  "--set", f"model.acoustic_encoder_path={tiny_models / 'audio_encoder'}",
                  "--set", f"model.caption_tokenizer_path={tiny_models / 'caption_tokenizer'}")
    assert_clean_error(result, f"model.visual_encoder_path: {empty} is not a model folder",
                       "no config.json, no preprocessor_config.json")
    assert_kept(kept)


def test_model_folder_that_is_not_a_model_is_named_by_train(tiny_models, store, tmp_path):
    empty = tmp_path / "qwen"
    empty.mkdir()
    (empty / "config.json").write_text("{}")  # half a checkpoint: no tokenizer
    result = xmei("train", "--store", store, "--output-dir", tmp_path / "run",
                  "--set", f"model.llama_model_path={empty}",
                  "--set", f"model.caption_tokenizer_path={tiny_models / 'caption_tokenizer'}", process=True)
    assert_clean_error(result, f"model.llama_model_path: {empty} is not a model folder",
                       "no tokenizer_config.json or tokenizer.json", status=2)
    assert not (tmp_path / "run").exists()
