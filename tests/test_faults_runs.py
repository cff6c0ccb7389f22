"""Faults of the runs that read predictions, raw clips and checkpoints: `xmei score` on bad
predictions files, `xmei predict` on bad clips, `xmei eval` on a bad --out or store, and
`xmei eval` killed mid-write. Each ends with a message naming the culprit, no traceback, and
nothing already written lost (see tests/faults.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from faults import XMEI, assert_clean_error, assert_kept, flat, snapshot, xmei
from test_eval import train_checkpoint
from xmei.runlock import LOCK_NAME

FAST = ("--set", "eval.max_new_tokens=16", "--set", "run.batch_size_eval=24")  # one batch, short answers
ROW = {"video_id": "v0", "text": "", "cut_off": False, "emotion": "happy", "intent": "agreeing",
       "explanation": "the face is yellow", "ref_emotion": "happy", "ref_intent": "agreeing",
       "ref_explanation": "the face is yellow and round"}


@pytest.fixture(scope="module")
def checkpoint(tiny_models, patch_store, tmp_path_factory) -> Path:
    """A briefly trained checkpoint whose prompts hold 256 tokens (a long subtitle is cut there)."""
    return train_checkpoint(tiny_models, patch_store, tmp_path_factory.mktemp("run") / "language",
                            "model.max_length=256")


def lines(*rows: dict | str | bytes) -> bytes:
    """A predictions file: a dict as its JSON, a str or bytes as it is, one a line."""
    encoded = [r if isinstance(r, bytes) else (json.dumps(r) if isinstance(r, dict) else r).encode() for r in rows]
    return b"".join(line + b"\n" for line in encoded)


def row(i: int, **fields) -> dict:
    """ROW as clip v<i>, with ``fields`` changed (None: the field left out)."""
    changed = {**ROW, "video_id": f"v{i}", **fields}
    return {k: v for k, v in changed.items() if v is not None}


# --------------------------------------------------------------------------- xmei score

LATIN = lines(row(0), json.dumps(row(1)).encode().replace(b"yellow", b"yell\xffow"))  # 0xff on line 2
AT, LINE_2 = LATIN.index(b"\xff"), LATIN.index(b"\n") + 1
SCORE_FAULTS = {  # name: (file contents or None for no file, what the message names besides the file)
    "no file": (None, ["(the predictions file) does not exist"]),
    "not UTF-8": (LATIN, [f"(the predictions file) is not UTF-8 text: byte {AT} (line 2, column {AT - LINE_2 + 1}) "
                          "is 0xff"]),
    "bad JSON": (lines(row(0), row(1), '{"video_id": "v2", '),
                 ["(the predictions file): line 3 is not valid JSON: Expecting property name enclosed in double quotes "
                  "at column 20"]),
    "not an object": (lines(row(0), "[1, 2]"), ["line 2", "JSON array, expected an object"]),
    "no reference": (lines(row(0), row(1, ref_emotion=None)), ["line 2", "'v1'", "lacks ['ref_emotion']"]),
    "no video_id": (lines(row(0, video_id=None)), ["line 1", "lacks ['video_id']"]),
    "unknown reference": (lines(row(0), row(1, ref_intent="bored")), ["line 2", "ref_intent 'bored'"]),
    "answer of the wrong type": (lines(row(0, emotion=3)), ["line 1", "emotion is a JSON number, expected a string"]),
    "reference of the wrong type": (lines(row(0), row(1, ref_explanation=["a"])),
                                    ["line 2", "ref_explanation is a JSON array"]),
    "cut_off of the wrong type": (lines(row(0, cut_off="no")),
                                  ["line 1", "cut_off is a JSON string, expected a boolean"]),
    "empty file": (b"", ["no predictions"]),
    "blank lines only": (b"\n  \n\n", ["no predictions"]),
    "repeated video_id": (lines(row(0), row(1), row(0)), ["line 3", "repeats video_id 'v0' of line 1"]),
    "free answers on some lines only": (lines(row(0, free={"emotion": "sad"}), row(1)),
                                        ["line 2", "no free answer"]),
}


@pytest.mark.parametrize("fault", SCORE_FAULTS)
def test_score_names_the_file_and_line_of_a_bad_predictions_file(fault, tmp_path):
    contents, culprits = SCORE_FAULTS[fault]
    path = tmp_path / "predictions.jsonl"
    if contents is not None:
        path.write_bytes(contents)
    before = snapshot(tmp_path)
    result = xmei("score", path, "--out", tmp_path / "scored")
    assert_clean_error(result, path, *culprits)
    assert_kept(before)
    assert not (tmp_path / "scored").exists()  # nothing written


def test_score_of_a_folder_or_into_a_file(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(lines(row(0)))
    assert_clean_error(xmei("score", tmp_path, "--out", tmp_path / "scored"),
                       f"{tmp_path} (the predictions file) is a folder, not a file")
    before = snapshot(tmp_path)
    assert_clean_error(xmei("score", path, "--out", path), f"--out {path}", "is a file, not a folder")
    assert_kept(before)


def test_missing_answers_are_read_as_invalid(cfg, tmp_path):
    """A missing answer field is an invalid answer (null, as `eval` writes one); only references
    must be there. (That `xmei score` counts null answers as invalid: tests/test_eval.py.)"""
    from xmei.evaluate import read_predictions

    path = tmp_path / "baseline.jsonl"
    path.write_bytes(lines(row(0), row(1, emotion=None), row(2, intent=None, explanation=None), "",
                           row(3, emotion=None, intent=None, explanation=None, text=None, cut_off=None)))
    rows = read_predictions(path, cfg.emotions, cfg.intents)
    assert [(r["emotion"], r["intent"], r["explanation"]) for r in rows] == [
        ("happy", "agreeing", ROW["explanation"]), (None, "agreeing", ROW["explanation"]), ("happy", None, None),
        (None, None, None)]


# --------------------------------------------------------------------------- xmei predict

@pytest.fixture(scope="module")
def bad_media(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_media")
    rng = np.random.default_rng(0)
    (folder / "random.mp4").write_bytes(rng.bytes(5000))
    (folder / "random.wav").write_bytes(rng.bytes(3000))
    (folder / "folder.mp4").mkdir()
    return folder


PREDICT_FAULTS = {  # name: (video, --audio or None, what the message names), in {corpus} or {bad} (bad_media)
    "missing video": ("{corpus}/videos/nothing.mp4", None, ["missing video file"]),
    "corrupt video": ("{bad}/random.mp4", None, ["cannot decode video"]),
    "folder as video": ("{bad}/folder.mp4", None, ["a folder, not the video file"]),
    "missing audio": ("{corpus}/videos/synth_00000.mp4", "{bad}/nothing.wav", ["missing audio file"]),
    "corrupt audio": ("{corpus}/videos/synth_00000.mp4", "{bad}/random.wav", ["cannot decode audio"]),
}


@pytest.mark.parametrize("fault", PREDICT_FAULTS)
def test_predict_names_a_bad_clip(fault, checkpoint, corpus, bad_media):
    video, audio, culprits = (p.format(corpus=corpus, bad=bad_media) if isinstance(p, str) else p
                              for p in PREDICT_FAULTS[fault])
    before = snapshot(bad_media)
    result = xmei("predict", video, *(("--audio", audio) if audio else ()), "--subtitle", "hi",
                  "--checkpoint", checkpoint)
    assert_clean_error(result, "cannot read the clip", audio or video, *culprits)
    assert result.stdout == ""
    assert_kept(before)


def test_predict_on_a_video_without_audio_uses_the_no_audio_context(checkpoint, corpus, patch_store):
    from stores import FeatureStore

    store = FeatureStore(patch_store)
    silent = int(np.flatnonzero(store.clip_reader("has_audio").read(range(len(store))) == 0)[0])
    video = corpus / store[silent]["video_path"]
    result = xmei("predict", video, "--subtitle", "Hi.", "--checkpoint", checkpoint, *FAST[:2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"no audio: {video} has no audio track and no --audio was given" in " ".join(result.stderr.split())
    assert "emotion: " in result.stdout and "intent: " in result.stdout


def test_predict_cuts_a_subtitle_longer_than_max_length_and_answers(checkpoint, corpus):
    subtitle = "Well, the train was late again and nobody said a word about it. " * 100  # far over 256 tokens
    result = xmei("predict", corpus / "videos" / "synth_00000.mp4", "--subtitle", subtitle, "--checkpoint",
                  checkpoint, "--json", *FAST[:2])
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["subtitle_cut"] is True and out["emotion"] and out["intent"]


# --------------------------------------------------------------------------- xmei eval

def test_eval_into_a_file(checkpoint, patch_store, tmp_path):
    out = tmp_path / "results.txt"
    out.write_text("keep me\n")
    before = snapshot(tmp_path)
    result = xmei("eval", "--checkpoint", checkpoint, "--store", patch_store, "--out", out)
    assert_clean_error(result, f"--out {out}", "is a file, not a folder")
    assert_kept(before)


def test_eval_on_a_store_of_other_labels(checkpoint, patch_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(patch_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    emotions = meta["attributes"]["labels"]["emotions"]
    meta["attributes"]["labels"]["emotions"] = [*emotions[:-1], "contempt"]
    (store / "zarr.json").write_text(json.dumps(meta))
    result = xmei("eval", "--checkpoint", checkpoint, "--store", store, "--out", tmp_path / "eval")
    assert_clean_error(result, store, "'contempt'", f"the config of {checkpoint}", repr(emotions[-1]))
    assert not (tmp_path / "eval").exists()


def test_a_killed_eval_leaves_the_earlier_files_whole_and_a_rerun_completes(checkpoint, patch_store, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    earlier = ["predictions.jsonl", "results.json", "clip_scores.jsonl", "report.md", "confusion_emotion.png",
               "confusion_intent.png", "reliability_emotion.png", "reliability_intent.png"]
    for name in earlier:  # an earlier evaluation's files (of another checkpoint, say)
        (out / name).write_text(f"the earlier {name}\n")
    before = snapshot(out)
    environment = {k: v for k, v in os.environ.items() if k != "XMEI_DEBUG"}
    args = [str(XMEI), "eval", "--checkpoint", str(checkpoint), "--store", str(patch_store), "--out", str(out), *FAST]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**environment, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(".outputs.partial-*/*")):
        time.sleep(0.02)  # until it writes its first output
    os.killpg(proc.pid, signal.SIGKILL)  # eval and its METEOR java, while it scores and writes its outputs
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"it ended before the kill: {stderr.decode()[-3000:]}"
    assert_kept(before)  # every earlier file whole and unchanged
    assert list(out.glob(".outputs.partial-*"))  # what the killed run had written is apart from them

    result = xmei("eval", "--checkpoint", checkpoint, "--store", patch_store, "--out", out, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"taking over {out / LOCK_NAME}: the run that held it (`xmei eval " in flat(result.stderr)  # the kill's
    assert sorted(p.name for p in out.iterdir()) == sorted(earlier)  # the killed run's partial folder and lock are gone
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == json.loads((out / "results.json").read_text())["count"] == 24
    assert (out / "report.md").read_text().startswith("# xmei eval: ")


def test_sigterm_stops_eval_at_a_batch_boundary_writing_nothing(checkpoint, patch_store, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text('{"count": 1}\n')  # an earlier evaluation's
    before = snapshot(out)
    environment = {k: v for k, v in os.environ.items() if k != "XMEI_DEBUG"}
    args = [str(XMEI), "eval", "--checkpoint", str(checkpoint), "--store", str(patch_store), "--out", str(out),
            "--set", "eval.max_new_tokens=16", "--set", "run.batch_size_eval=4"]  # 6 batches
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**environment, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (out / LOCK_NAME).exists():
        time.sleep(0.02)  # the lock is taken just before the model loads: the signal comes before any batch ends
    proc.send_signal(signal.SIGTERM)
    output, stderr = proc.communicate(timeout=300)
    said = assert_clean_error(subprocess.CompletedProcess(args, proc.returncode, output, stderr),
                              "SIGTERM received: stopping at the next safe point",
                              f"error: SIGTERM: stopped at a batch boundary after 4 of 24 clips; nothing was written, "
                              f"{out} holds what it held before: run the same command again", status=143)
    assert_kept(before)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"], said  # no partial folder, no lock


def test_outputs_of_a_failed_run_stay_apart(tmp_path):
    """An error while staging leaves the earlier outputs as they were; the next run publishes whole."""
    from xmei.evaluate import staged

    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text('{"count": 1}\n')
    before = snapshot(out)
    with pytest.raises(RuntimeError) as caught, staged(out) as partial:
        (partial / "predictions.jsonl").write_text("{}\n")
        raise RuntimeError("scoring failed")
    assert f"the outputs written so far are in {partial}" in caught.value.__notes__
    assert_kept(before)
    assert (partial / "predictions.jsonl").is_file()  # generated answers are not lost
    with staged(out) as again:
        (again / "results.json").write_text('{"count": 2}\n')
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert json.loads((out / "results.json").read_text()) == {"count": 2}
