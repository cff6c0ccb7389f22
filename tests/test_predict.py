"""Prediction on one's own clips: the Python API (xmei.predictor) and bulk `xmei predict
--annotations / --store` (xmei.predict), on the briefly trained tiny model of conftest."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import LAST
from faults import flat, xmei

XMEI = Path(sys.executable).parent / "xmei"
FAST = ("run.batch_size_eval=2", "eval.max_new_tokens=16", "run.device=cpu")  # 3 batches of the 5 ok clips
CLIPS = 6  # of the corpus, in the bulk annotation file; one more is broken


def sets(*values: str) -> list[str]:
    return [a for v in values for a in ("--set", v)]


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    return trained_run / LAST


@pytest.fixture(scope="module")
def predictor(checkpoint):
    from xmei import Predictor

    with Predictor.from_checkpoint(checkpoint, device="cpu") as loaded:
        yield loaded


@pytest.fixture(scope="module")
def unlabeled(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(annotation file, media root): CLIPS clips of the corpus without labels, the second with
    an extra subtitle_source, and a corrupt mp4 among them (4th)."""
    root = tmp_path_factory.mktemp("media")
    for folder in ("videos", "audios"):
        (root / folder).symlink_to(corpus / folder)
    (root / "bad").mkdir()
    (root / "bad" / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    records = json.loads((corpus / "annotations" / "train.json").read_text())[:CLIPS]
    for r in records:
        r.update(emotion="", intent="")
    records[1]["subtitle_source"] = "srt"
    records.insert(3, {**records[0], "video_id": "broken", "video_path": "bad/broken.mp4", "audio_path": ""})
    path = root / "unlabeled.json"
    path.write_text(json.dumps(records))
    return path, root


@pytest.fixture(scope="module")
def bulk(checkpoint, unlabeled, tmp_path_factory) -> Path:
    """`xmei predict --annotations` of the unlabeled clips, uninterrupted."""
    annotations, root = unlabeled
    out = tmp_path_factory.mktemp("bulk") / "out"
    result = xmei("predict", "--annotations", annotations, "--media-root", root, "--checkpoint", checkpoint,
                  "--out", out, "--workers", "0", *sets(*FAST))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- the Python API

def test_predict_is_the_one_clip_command_and_typed(predictor, checkpoint, corpus):
    from xmei import Prediction

    video = corpus / "videos" / "synth_00000.mp4"
    result = predictor.predict(video, subtitle="Well, the train was late.", video_description="A face.")
    said = xmei("predict", video, "--subtitle", "Well, the train was late.", "--video-description", "A face.",
                "--checkpoint", checkpoint, "--json")
    assert said.returncode == 0, said.stderr[-3000:]
    assert json.loads(said.stdout) == result.to_json()
    assert isinstance(result, Prediction) and result.subtitle_source == "given" and result.has_audio
    assert result.emotion in predictor.cfg.emotions.labels and result.without_descriptions == ("audio",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.emotion = "sad"
    assert list(result.visual_attention) == ["caption queries", "learned queries"]
    assert all(m.shape == (8, 16, 16) and np.isfinite(m).all() for m in result.visual_attention.values())
    assert all(m.shape == (8,) and abs(m.sum() - 1) < 1e-3 for m in result.audio_attention.values())
    assert result.audio_attention  # the model uses audio and the clip has some


def test_the_answer_streams_as_it_is_generated(predictor, corpus):
    """``on_text`` sees the answer grow token by token to the text of the result, which is the
    answer without streaming (`xmei serve` shows the explanation so)."""
    video, said = corpus / "videos" / "synth_00001.mp4", []
    streamed = predictor.predict(video, "Hi.", on_text=said.append)
    assert streamed.to_json() == predictor.predict(video, "Hi.").to_json() and len(said) > 3
    assert all(later.startswith(earlier.rstrip()) for earlier, later in zip(said, said[1:]))
    assert said[-1].strip() == streamed.text.strip()


def test_predict_many_equals_predict_one_by_one(predictor, corpus, annotations):
    from pipeline.annotations import read_annotations

    records = read_annotations(annotations, predictor.cfg.emotions, predictor.cfg.intents)[:3]
    many = predictor.predict_many(records, media_root=corpus)
    one = [predictor.predict(corpus / r.video_path, r.subtitle, corpus / r.audio_path if r.audio_path else None,
                             r.video_description, r.audio_description) for r in records]
    probs = ("emotion_probs", "intent_probs")  # a batch's padding moves them by float rounding only
    assert [{k: v for k, v in m.to_json().items() if k not in probs} for m in many] == \
        [{k: v for k, v in o.to_json().items() if k not in probs} for o in one]
    for m, o in zip(many, one):
        for field in probs:
            assert getattr(m, field).keys() == getattr(o, field).keys()
            np.testing.assert_allclose(list(getattr(m, field).values()), list(getattr(o, field).values()), atol=1e-5)
        for group in o.visual_attention:
            np.testing.assert_allclose(m.visual_attention[group], o.visual_attention[group], atol=1e-5)
    as_dicts = predictor.predict_many([{"video": m.video, "subtitle": m.subtitle} for m in many[:2]])
    assert [d.video for d in as_dicts] == [m.video for m in many[:2]]
    [alone] = predictor.predict_many([{"video": many[0].video, "subtitle": many[0].subtitle, "subtitle_source": "srt"}])
    assert alone.subtitle_source == "srt" and alone.text == many[0].text


def test_a_clip_without_subtitle_finds_one_and_unreadable_media_is_named(predictor, checkpoint, corpus, tmp_path):
    """No subtitle given: a sidecar beside the video, else the Whisper of model.asr_path, else none
    (xmei.annotate's rules), for the API and the one-clip command alike."""
    from pipeline.decode import MediaError
    from xmei.predictor import PredictError

    video = tmp_path / "clip.mp4"
    shutil.copy(corpus / "videos" / "synth_00000.mp4", video)
    heard = predictor.predict(video)
    assert (heard.subtitle, heard.subtitle_source) == predictor.subtitle_of(video)
    assert heard.subtitle_source == ("asr" if heard.subtitle else "none")
    assert heard.subtitle_source == "none" or predictor.cfg.model.asr_path is not None
    (tmp_path / "clip.srt").write_text("1\n00:00:00,000 --> 00:00:01,500\n<i>Well, the train</i>\nwas late.\n")
    found = predictor.predict(video)
    assert (found.subtitle, found.subtitle_source) == ("Well, the train was late.", "srt")
    assert found.text == predictor.predict(video, "Well, the train was late.").text
    said = xmei("predict", video, "--checkpoint", checkpoint)
    assert said.returncode == 0 and "subtitle (srt): Well, the train was late." in flat(said.stderr)
    missing = tmp_path / "nothing.mp4"  # read before any subtitle is looked for: named as unreadable media
    with pytest.raises(MediaError, match=f"{missing}: missing video file"):
        predictor.predict(missing)
    said = xmei("predict", missing, "--checkpoint", checkpoint)
    assert said.returncode == 1 and f"cannot read the clip: {missing}: missing video file" in flat(said.stderr)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(PredictError, match=f"cannot read clip 1 \\({broken}\\)"):
        predictor.predict_many([{"video": video, "subtitle": "Hi."}, {"video": broken, "subtitle": "Hi."}])


# --------------------------------------------------------------------------- bulk

def test_bulk_predicts_every_readable_clip_and_names_the_broken_one(bulk, unlabeled):
    from xmei.predict import CSV_FIELDS, ROW_FIELDS

    rows = rows_of(bulk / "predictions.jsonl")
    records = json.loads(unlabeled[0].read_text())
    assert [r["video_id"] for r in rows] == [r["video_id"] for r in records if r["video_id"] != "broken"]
    assert all(tuple(r) == ROW_FIELDS for r in rows)
    assert [r["subtitle_source"] for r in rows] == ["given", "srt", "given", "given", "given", "given"]
    assert [r["subtitle"] for r in rows] == [r["subtitle"] for r in records if r["video_id"] != "broken"]
    assert all(r["emotion"] and r["intent"] and r["explanation"] is not None for r in rows)
    [failed] = rows_of(bulk / "failures.jsonl")
    assert failed["video_id"] == "broken" and "broken.mp4" in failed["reason"]
    with open(bulk / "predictions.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_FIELDS and len(table) == len(rows)
    for line, row in zip(table, rows):
        assert (line["video_id"], line["emotion"], line["intent"]) == (row["video_id"], row["emotion"], row["intent"])
        p = (row["emotion_probs"] or {}).get(row["emotion"])
        assert line["emotion_p"] == ("" if p is None else f"{p:.6f}")
    record = json.loads((bulk / "predict.json").read_text())
    assert record["done"] and (record["predicted"], record["failed"]) == (6, 1)
    assert not (bulk / "predictions.partial.jsonl").exists()


def test_a_rerun_generates_nothing_and_another_checkpoint_is_refused(bulk, unlabeled, checkpoint, trained_run,
                                                                     tmp_path, monkeypatch):
    import shutil

    annotations, root = unlabeled
    out = tmp_path / "out"
    shutil.copytree(bulk, out)
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file() and f.name != "predict.json"}
    monkeypatch.setattr("xmei.predict.answer_rows", lambda *a, **k: pytest.fail("a clip was generated again"))
    again = xmei("predict", "--annotations", annotations, "--media-root", root, "--checkpoint", checkpoint,
                 "--out", out, "--workers", "0", *sets(*FAST))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming: 1 of 1 shards already done" in again.stderr
    assert {f: (out / f).read_bytes() for f in before} == before
    other = xmei("predict", "--store", out / "store", "--checkpoint", trained_run / "checkpoints" / "step_0000003",
                 "--out", out, *sets(*FAST))
    assert other.returncode == 1 and f"{out} holds the predictions of another run (checkpoint" in flat(other.stderr)
    assert "--overwrite" in other.stderr and "Traceback" not in other.stderr


def test_the_store_path_equals_the_annotations_path(bulk, checkpoint, tmp_path):
    result = xmei("predict", "--store", bulk / "store", "--checkpoint", checkpoint, "--out", tmp_path / "out",
                  *sets(*FAST))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("predictions.jsonl", "predictions.csv", "failures.jsonl"):
        assert (tmp_path / "out" / name).read_text() == (bulk / name).read_text(), name


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(bulk, checkpoint, tmp_path):
    """A SIGTERM (its request, as xmei.interrupt's handler makes it) after the first batch: the run
    stops at the batch boundary keeping that batch; a torn line (a kill during an append) is cut
    off; the rerun predicts the rest, giving the uninterrupted run's files."""
    from xmei.generate import GenerationSettings
    from xmei.interrupt import Interrupted, StopRequest
    from xmei.model import XMEIQwen
    from xmei.predict import PARTIAL, predict_store, subtitle_sources, write_outputs
    from xmei.predictor import checkpoint_config

    cfg = checkpoint_config(checkpoint, sets=FAST)
    model = XMEIQwen.from_checkpoint(checkpoint)
    store, out = bulk / "store", tmp_path / "out"
    out.mkdir()
    sources = subtitle_sources(Path(json.loads((bulk / "predict.json").read_text())["annotations"]))
    stop = StopRequest(60)

    def first_batch_done(done: int, total: int) -> None:
        if done:
            stop.signum = signal.SIGTERM

    with pytest.raises(Interrupted, match="stopped at a batch boundary after 2 of 6 clips"):
        predict_store(model, store, out, cfg, GenerationSettings.from_config(cfg), sources, progress=first_batch_done,
                      stop=stop)
    kept = rows_of(out / PARTIAL)
    assert [r["video_id"] for r in kept] == [r["video_id"] for r in rows_of(bulk / "predictions.jsonl")[:2]]
    with open(out / PARTIAL, "a") as f:
        f.write('{"video_id": "synth_0')  # torn
    generated = []
    rows = predict_store(model, store, out, cfg, GenerationSettings.from_config(cfg), sources,
                         progress=lambda done, total: generated.append(total))
    assert generated[0] == 4  # the two kept clips were not generated again
    write_outputs(out, rows, store, {})
    for name in ("predictions.jsonl", "predictions.csv", "failures.jsonl"):
        assert (out / name).read_text() == (bulk / name).read_text(), name


def test_two_processes_under_torchrun_equal_one(bulk, checkpoint, tmp_path):
    from test_train import free_port

    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                           str(free_port()), str(XMEI), "predict", "--store", str(bulk / "store"), "--checkpoint",
                           str(checkpoint), "--out", str(tmp_path / "out"), *sets(*FAST)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("predictions.jsonl", "predictions.csv"):
        assert (tmp_path / "out" / name).read_text() == (bulk / name).read_text(), name


def test_eval_on_an_unlabeled_store_says_to_predict(bulk, checkpoint, tmp_path):
    result = xmei("eval", "--checkpoint", checkpoint, "--store", bulk / "store", "--out", tmp_path / "eval")
    said = flat(result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr, said[-3000:]
    assert f"{bulk / 'store'}: 6 of its 6 ok clips have no reference labels" in said
    assert f"use `xmei predict --store {bulk / 'store'} --checkpoint CK --out DIR`" in said
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("args, message", [
    ((), "give exactly one of VIDEO (one clip), --annotations FILE or --store STORE (in bulk); got none"),
    (("clip.mp4", "--store", "s"), "got VIDEO and --store"),
    (("--store", "s"), "in bulk (--annotations / --store), give --out DIR"),
    (("--store", "s", "--out", "o", "--subtitle", "Hi."), "--subtitle: options of one clip (VIDEO)"),
    (("clip.mp4", "--out", "o"), "--out: options of bulk prediction"),
])
def test_the_forms_of_predict_are_told_apart(args, message, checkpoint):
    result = xmei("predict", *args, "--checkpoint", checkpoint)
    assert result.returncode == 2 and message in flat(result.stderr), result.stderr[-2000:]
