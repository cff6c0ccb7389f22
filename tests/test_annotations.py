from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.annotations import (FIELDS, AnnotationError, check_annotations, default_media_root,
                                  read_annotations)


def record(i: int, **changes) -> dict:
    rec = dict(video_id=f"v{i}", video_path=f"videos/v{i}.mp4", audio_path=f"audios/v{i}.wav",
               subtitle="Hello.", emotion="happy", intent="questioning", video_description="A face.",
               audio_description="A voice.", emotion_reason="Smiles.", intent_reason="Rising.",
               explanation="Happy and asking.")
    rec.update(changes)
    return rec


@pytest.fixture
def media(tmp_path: Path) -> Path:
    for sub in ("videos", "audios"):
        (tmp_path / sub).mkdir()
    for i in range(6):
        (tmp_path / "videos" / f"v{i}.mp4").write_bytes(b"x")
        (tmp_path / "audios" / f"v{i}.wav").write_bytes(b"x")
    return tmp_path


def dump(path: Path, rows: list, jsonl: bool = False) -> Path:
    text = "\n".join(json.dumps(r) for r in rows) if jsonl else json.dumps(rows)
    path.write_text(text)
    return path


def test_fields_are_the_published_eleven():
    assert FIELDS == ("video_id", "video_path", "audio_path", "subtitle", "emotion", "intent",
                      "video_description", "audio_description", "emotion_reason", "intent_reason",
                      "explanation")


@pytest.mark.parametrize("jsonl", [False, True])
def test_good_file_reads_with_labels_normalized(tmp_path, media, cfg, jsonl):
    rows = [record(0, emotion=" Happy "), record(1, emotion="ANGRY", intent="sympathising"),
            record(2, audio_path="", intent="Acknowledging  ")]
    path = dump(tmp_path / ("a.jsonl" if jsonl else "a.json"), rows, jsonl)
    records = read_annotations(path, cfg.emotions, cfg.intents, media)
    assert [r.emotion for r in records] == ["happy", "anger", "happy"]
    assert [r.intent for r in records] == ["questioning", "sympathizing", "acknowledging"]
    assert records[2].audio_file(media) is None  # empty audio_path: the video's own track
    assert records[0].video_file(media) == media / "videos" / "v0.mp4"


def test_absolute_media_paths_ignore_the_root(tmp_path, media, cfg):
    path = dump(tmp_path / "a.json", [record(0, video_path=str(media / "videos" / "v0.mp4"), audio_path="")])
    records = read_annotations(path, cfg.emotions, cfg.intents, tmp_path / "elsewhere", allow_absolute=True)
    assert records[0].video_file(tmp_path / "elsewhere") == media / "videos" / "v0.mp4"


def test_every_problem_is_listed_with_index_id_and_field(tmp_path, media, cfg):
    no_subtitle = record(1)
    del no_subtitle["subtitle"]
    rows = [record(0), no_subtitle, record(2, emotion="joyous"), record(3, intent=7),
            record(0), record(4, video_path="videos/gone.mp4"), record(5, audio_path="audios/gone.wav"),
            "not an object", record(6, video_id="")]
    path = dump(tmp_path / "bad.json", rows)
    records, problems, summary = check_annotations(path, cfg.emotions, cfg.intents, media)
    found = {(p.index, p.video_id, p.field) for p in problems}
    assert found == {
        (1, "v1", "subtitle"),        # missing field
        (2, "v2", "emotion"),         # unknown label
        (3, "v3", "intent"),          # wrong type
        (4, "v0", "video_id"),        # duplicate
        (5, "v4", "video_path"),      # missing video file
        (6, "v5", "audio_path"),      # missing audio file
        (7, None, None),              # not an object
        (8, "", "video_id"),          # empty id
    }
    by_index = {p.index: str(p) for p in problems}
    assert "record 2, video_id 'v2', field 'emotion': unknown label 'joyous'" in by_index[2]
    assert "duplicate: record 0 has the same video_id" in by_index[4]
    assert "expected a string, got int 7" in by_index[3]
    assert summary.count == 9 and [r.video_id for r in records] == ["v0", "v4", "v5"]
    assert summary.missing_media == ["v4", "v5"]
    with pytest.raises(AnnotationError) as err:
        read_annotations(path, cfg.emotions, cfg.intents, media)
    assert len(err.value.problems) == 8 and "8 problem(s)" in str(err.value)


def test_unlabeled_split_allows_empty_labels_only(tmp_path, media, cfg):
    path = dump(tmp_path / "u.json", [record(0, emotion="", intent=""), record(1, emotion="bored")])
    _, problems, summary = check_annotations(path, cfg.emotions, cfg.intents, media, labeled=False)
    assert [(p.index, p.field) for p in problems] == [(1, "emotion")]
    _, problems, _ = check_annotations(path, cfg.emotions, cfg.intents, media, labeled=True)
    assert {(p.index, p.field) for p in problems} == {(0, "emotion"), (0, "intent"), (1, "emotion")}


def test_broken_files_are_named(tmp_path, cfg):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"video_id": "a",]')
    _, problems, _ = check_annotations(bad, cfg.emotions, cfg.intents)
    assert problems[0].message == (f"{bad} (the annotation file) is not valid JSON: Expecting property name enclosed "
                                   "in double quotes at line 1, column 19")
    lines = tmp_path / "broken.jsonl"
    lines.write_text(json.dumps(record(0)) + "\n{oops\n" + json.dumps(record(1)) + "\n")
    records, problems, _ = check_annotations(lines, cfg.emotions, cfg.intents)
    assert len(records) == 2 and problems[0].index == 1
    assert problems[0].message == (f"{lines} (the annotation file): line 2 is not valid JSON: Expecting property name "
                                   "enclosed in double quotes at column 2")
    _, problems, _ = check_annotations(tmp_path / "absent.json", cfg.emotions, cfg.intents)
    assert problems[0].message == f"{tmp_path / 'absent.json'} (the annotation file) does not exist"


def test_published_layout_gives_the_default_media_root(tmp_path):
    assert default_media_root(tmp_path / "data" / "annotations" / "train.json") == (tmp_path / "data").resolve()
    assert default_media_root(tmp_path / "train.json") is None
