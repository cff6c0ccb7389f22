"""The synthetic corpus: real decodable media whose content carries the labels."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import soundfile

from pipeline.annotations import read_annotations
from pipeline.synth import (AUDIO_MODES, ClipPlan, FRAME_RATES, LOOKS, SAMPLE_RATE, SIZES, SOUNDS, plan_corpus,
                            render_audio, render_frames, synth_corpus, write_mp4)


def plans_by_id(corpus: Path) -> dict[str, dict]:
    return {p["video_id"]: p for p in json.loads((corpus / "synth.json").read_text())["clips"]}


def all_records(corpus: Path, cfg):
    return [r for split in ("train", "val", "test")
            for r in read_annotations(corpus / "annotations" / f"{split}.json", cfg.emotions, cfg.intents, corpus)]


def test_layout_and_annotations_are_valid(corpus, cfg):
    records = all_records(corpus, cfg)  # raises on any contract problem, media files included
    assert len(records) == 24 and len({r.video_id for r in records}) == 24
    assert sorted(p.name for p in corpus.iterdir()) == ["annotations", "audios", "synth.json", "videos"]
    plans = plans_by_id(corpus)
    for r in records:
        mode = plans[r.video_id]["audio_mode"]
        assert (r.audio_path != "") == mode.startswith("file")


def test_videos_decode_with_pyav_and_decord(corpus, cfg):
    plans = plans_by_id(corpus)
    for r in all_records(corpus, cfg):
        plan, path = plans[r.video_id], str(corpus / r.video_path)
        with av.open(path) as container:
            kinds = sorted(s.type for s in container.streams)
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert kinds == (["audio", "video"] if "track" in plan["audio_mode"] else ["video"])
        assert len(frames) == max(1, round(plan["duration"] * plan["fps"]))
        assert frames[0].shape == (plan["height"], plan["width"], 3)
        rendered = render_frames(ClipPlan(**plan))
        assert np.abs(np.stack(frames).astype(np.int16) - rendered).mean() < 8  # lossy, but the same picture
        reader = decord.VideoReader(path)
        assert len(reader) == len(frames) and reader.get_avg_fps() == pytest.approx(plan["fps"])
        assert reader.get_batch([0, len(reader) - 1]).asnumpy().shape == (2, plan["height"], plan["width"], 3)


def test_audio_files_and_tracks_hold_the_rendered_voice(corpus, cfg):
    plans = plans_by_id(corpus)
    seen = Counter()
    for r in all_records(corpus, cfg):
        plan = plans[r.video_id]
        if plan["audio_mode"] == "none":
            continue
        expected = render_audio(ClipPlan(**plan))
        if r.audio_path:
            wav, rate = soundfile.read(corpus / r.audio_path, dtype="float32")
            assert rate == SAMPLE_RATE and wav.ndim == 1
            np.testing.assert_allclose(wav, expected, atol=1 / 2**15 + 1e-6)  # PCM16 rounding only
            seen["wav"] += 1
        if "track" in plan["audio_mode"]:
            track = decord.AudioReader(str(corpus / r.video_path), sample_rate=SAMPLE_RATE, mono=True)
            decoded = track[:].asnumpy()[0]
            assert len(expected) <= len(decoded) < len(expected) + 2048  # AAC pads its last frame
            assert np.corrcoef(decoded[:len(expected)], expected)[0, 1] > 0.99
            seen["track"] += 1
    assert seen["wav"] and seen["track"]


def test_plans_cover_lengths_rates_sizes_and_audio_modes():
    plans = plan_corpus(400, 0)
    assert {p.split for p in plans} == {"train", "val", "test"}
    assert Counter(p.split for p in plans) == {"train": 280, "val": 60, "test": 60}
    assert all(1.0 <= p.duration <= 6.0 for p in plans)
    assert {p.fps for p in plans} == set(FRAME_RATES) and {(p.width, p.height) for p in plans} == set(SIZES)
    assert {p.audio_mode for p in plans} == set(AUDIO_MODES)
    assert {p.emotion for p in plans} == set(LOOKS) and {p.intent for p in plans} == set(SOUNDS)


def nearest_centroid_accuracy(features: np.ndarray, labels: list[str]) -> float:
    """Leave-one-out nearest class mean: how well a trivial model reads the label off the feature."""
    labels = np.array(labels)
    hits = 0
    for i in range(len(labels)):
        rest = np.arange(len(labels)) != i
        classes = sorted(set(labels[rest]))
        means = np.stack([features[rest & (labels == c)].mean(0) for c in classes])
        hits += classes[int(np.argmin(((means - features[i]) ** 2).sum(1)))] == labels[i]
    return hits / len(labels)


def test_emotion_is_carried_by_the_picture():
    plans = plan_corpus(120, 5)
    # mean color of the bright pixels (the face; backgrounds stay dim) over the clip
    feats = []
    for p in plans:
        frames = render_frames(p).reshape(-1, 3).astype(np.float32)
        feats.append(frames[frames.max(1) > 100].mean(0))
    assert nearest_centroid_accuracy(np.stack(feats), [p.emotion for p in plans]) > 0.95
    # while the intent is not: the same feature reads intent near chance (1/9)
    assert nearest_centroid_accuracy(np.stack(feats), [p.intent for p in plans]) < 0.3


def test_intent_is_carried_by_the_sound():
    plans = [p for p in plan_corpus(150, 6) if p.audio_mode != "none"]

    def spectrum(audio: np.ndarray) -> np.ndarray:  # time-averaged log spectrum up to 2 kHz
        frames = np.lib.stride_tricks.sliding_window_view(audio, 1024)[::512]
        power = (np.abs(np.fft.rfft(frames * np.hanning(1024), axis=1)) ** 2).mean(0)[:128]
        return np.log(power + 1e-8)

    feats = np.stack([spectrum(render_audio(p)) for p in plans])
    assert nearest_centroid_accuracy(feats, [p.intent for p in plans]) > 0.9
    assert nearest_centroid_accuracy(feats, [p.emotion for p in plans]) < 0.3


def test_texts_alone_do_not_give_the_labels(corpus, cfg):
    records = all_records(corpus, cfg)
    # descriptions name a true cue only sometimes; the label words themselves never appear in them
    for r in records:
        assert r.emotion not in r.video_description.lower().split()
        assert r.intent not in r.audio_description.lower().split()
        assert r.emotion in r.explanation and r.intent in r.explanation


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path, cfg):
    synth_corpus(tmp_path / "a", 8, 11, cfg.emotions, cfg.intents, workers=2)
    synth_corpus(tmp_path / "b", 8, 11, cfg.emotions, cfg.intents, workers=1)
    synth_corpus(tmp_path / "c", 8, 12, cfg.emotions, cfg.intents, workers=1)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b and len(a) >= 8 + 3
    assert a["annotations/train.json"] != c["annotations/train.json"]


def test_clip_bytes_do_not_depend_on_what_the_memory_held(tmp_path):
    """The cause of test_same_seed_same_bytes's flake (issue 22): x264 with MB-tree read memory it
    never wrote, so a clip's bytes depended on what its process had done before, and 2 workers gave
    other bytes than 1 now and then. glibc's M_PERTURB fills each allocation with ~byte and each
    freed block with byte: that test's clips, encoded after the heap was dirtied in different ways,
    must come out the same (with MB-tree on, 4 of these 8 clips did not)."""
    libc = ctypes.CDLL(None)
    m_perturb, usual = -6, int(os.environ.get("MALLOC_PERTURB_", 0))  # M_PERTURB of glibc's malloc.h
    if not hasattr(libc, "mallopt") or not libc.mallopt(m_perturb, usual):
        pytest.skip("unavailable: no glibc mallopt(M_PERTURB) to dirty the heap with")
    seen = {}
    for plan in plan_corpus(8, 11):
        frames = render_frames(plan)[:12]  # (12, H, W, 3): enough for MB-tree's lookahead
        audio = render_audio(plan)[:SAMPLE_RATE * 12 // plan.fps] if "track" in plan.audio_mode else None
        for byte in (0, 1, 254, 0):  # 0: off; the last run reuses blocks freed as 0xfe by the one before
            libc.mallopt(m_perturb, byte)
            try:
                write_mp4(tmp_path / "clip.mp4", frames, plan.fps, audio)
            finally:
                libc.mallopt(m_perturb, usual)
            seen.setdefault(plan.video_id, set()).add(digest(tmp_path)["clip.mp4"])
    varied = [video_id for video_id, digests in seen.items() if len(digests) > 1]
    assert not varied, f"bytes changed with what the memory held: {varied}"


def test_refuses_to_overwrite_data_it_did_not_write(tmp_path, cfg):
    synth_corpus(tmp_path / "a", 3, 0, cfg.emotions, cfg.intents, workers=1)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        synth_corpus(tmp_path / "a", 3, 0, cfg.emotions, cfg.intents, workers=1)
    synth_corpus(tmp_path / "a", 3, 1, cfg.emotions, cfg.intents, workers=1, overwrite=True)
    real = tmp_path / "real"
    (real / "annotations").mkdir(parents=True)
    (real / "annotations" / "train.json").write_text("[]")
    with pytest.raises(FileExistsError, match="did not write"):
        synth_corpus(real, 3, 0, cfg.emotions, cfg.intents, overwrite=True)
    assert (real / "annotations" / "train.json").read_text() == "[]"
    with pytest.raises(ValueError, match="at least 3"):
        synth_corpus(tmp_path / "small", 2, 0, cfg.emotions, cfg.intents)
