"""`xmei report`: the browsable page of an evaluation or of a prediction folder, from hand-made
predictions (no model, but for the attention drawn with a prediction's own checkpoint).

The page is checked with the standard library's HTML parser: a card per clip, the cards each
filter selects counted from the rows, confusion cells, escaping, --compare, images, the label
probabilities' bars; a prediction folder's page (no references: label counts, no metrics); a
2,000-clip page for its build time and size; and in a real headless browser (Debian's chromium,
installed here when missing): a screenshot, and the page's own script filtering and sorting the
cards from the URL's fragment, read back from the DOM it leaves.
"""
from __future__ import annotations

import json
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import LAST, debian_program
from faults import xmei
from stores import create_store
from test_reader import SPECS
from xmei.classification import classification_report, joint_report
from xmei.config import Config
from xmei.evaluate import _calibration, write_predictions, write_report
from xmei.report import ASSETS, ReportError, build_report, clip_rouge_l

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<script>alert(1)</script>"
EMOTIONS, INTENTS = Config().emotions, Config().intents


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` predictions of every kind: right, one label wrong, both wrong, invalid (null labels
    and explanation), a label synonym ("joy") as `xmei score` may read."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ref_e, ref_i = EMOTIONS.labels[i % 7], INTENTS.labels[(i // 7) % 9]
        kind = int(rng.integers(6))
        emotion = ref_e if kind in (0, 2) else EMOTIONS.labels[(i + 1 + kind) % 7]
        intent = ref_i if kind in (0, 1) else INTENTS.labels[(i + 2 + kind) % 9]
        explanation = f"the speaker sounds {emotion} and is {intent} about clip {i}"
        if kind == 5:
            emotion = intent = explanation = None  # an unparsed answer
        elif emotion == "happy" and kind == 1:
            emotion = "joy"  # a synonym: the happy label
        rows.append({"video_id": f"clip_{i:05d}", "text": f"raw answer {i}", "cut_off": kind == 5,
                     "emotion": emotion, "intent": intent, "explanation": explanation, "ref_emotion": ref_e,
                     "ref_intent": ref_i, "ref_explanation": f"the speaker is {ref_e} and is {ref_i} in clip {i}"})
    return rows


def add_probs(rows: list[dict], seed: int = 0) -> list[dict]:
    """``rows`` with emotion_probs / intent_probs (random, the answer's label the most probable; keys
    shuffled: the page puts them in the label set's order), but every fourth row, which has none."""
    rng = np.random.default_rng(seed)
    for i, row in enumerate(rows):
        if i % 4 == 3:
            continue
        for kind, labels in (("emotion", EMOTIONS), ("intent", INTENTS)):
            logits = rng.normal(size=len(labels)) * 2
            if row[kind] is not None:
                logits[labels.index(labels.normalize(row[kind]))] = logits.max() + 0.5
            probs = np.exp(logits) / np.exp(logits).sum()
            order = rng.permutation(len(labels))
            row[f"{kind}_probs"] = {labels.labels[k]: float(probs[k]) for k in order}
    return rows


def sure(row: dict, kind: str) -> float | None:
    """The probability of the row's answer for ``kind``; None without probabilities or a valid answer."""
    labels = EMOTIONS if kind == "emotion" else INTENTS
    probs = row.get(f"{kind}_probs")
    return probs[labels.normalize(row[kind])] if probs and row[kind] else None


def canon(label, labels) -> str:
    return labels.normalize(label) if label else "invalid"


def expected(rows: list[dict]) -> dict[str, set[str]]:
    """The clips each filter must show, computed from the rows."""
    out = {k: set() for k in ("correct", "emotion", "intent", "both", "invalid")}
    for r in rows:
        e_ok = canon(r["emotion"], EMOTIONS) == r["ref_emotion"]
        i_ok = canon(r["intent"], INTENTS) == r["ref_intent"]
        out["correct" if e_ok and i_ok else "emotion" if i_ok else "intent" if e_ok else "both"].add(r["video_id"])
        if r["emotion"] is None or r["intent"] is None:
            out["invalid"].add(r["video_id"])
    return out


def quick_results(rows: list[dict]) -> dict:
    """results.json as `score` makes it (its classification and calibration functions), the
    explanation metrics stubbed, one unavailable (the real ones run Java for seconds)."""
    results = {"count": len(rows), "model": "hand-made"}
    flags = {}
    for kind, labels in (("emotion", EMOTIONS), ("intent", INTENTS)):
        preds = [labels.normalize(r[kind]) if r[kind] else None for r in rows]
        results[kind] = classification_report([r[f"ref_{kind}"] for r in rows], preds, labels.labels)
        flags[kind] = [p == r[f"ref_{kind}"] for p, r in zip(preds, rows)]
    results["joint"] = joint_report(results["emotion"], results["intent"], flags["emotion"], flags["intent"])
    results["explanation"] = {m: {"value": 0.25} for m in ("bleu4", "meteor", "rouge_l", "cider_d", "bertscore")}
    results["explanation"]["bleurt"] = {"unavailable": "no eval.bleurt_checkpoint <set>"}
    for kind, labels in (("emotion", EMOTIONS), ("intent", INTENTS)):
        results[kind]["calibration"] = _calibration(rows, [r[f"ref_{kind}"] for r in rows], kind, labels)
    return results


def eval_folder(path: Path, rows: list[dict], with_report: bool = False) -> Path:
    """predictions.jsonl and results.json (``with_report``: written by `score`'s write_report, with
    report.md and the PNGs, as `xmei score` leaves them)."""
    write_predictions(rows, path / "predictions.jsonl")
    if with_report:
        write_report(quick_results(rows), path, EMOTIONS, INTENTS, "test")
    else:
        (path / "results.json").write_text(json.dumps(quick_results(rows)))
    return path


def tiny_video(path: Path, frames: int = 10) -> Path:
    """A real mp4 of ``frames`` 160x120 frames (PyAV)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for k in range(frames):
            image = np.full((120, 160, 3), 20 * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


SOURCES = ("srt", "csv", "asr", "none")


def predicted(rows: list[dict]) -> list[dict]:
    """The rows as `xmei predict --out` writes them: no references; a subtitle and its source."""
    return [{**{k: v for k, v in r.items() if not k.startswith("ref_")}, "subtitle": f"said in clip {i}",
             "subtitle_source": SOURCES[i % 4]} for i, r in enumerate(rows)]


def predict_folder(path: Path, rows: list[dict], **record) -> Path:
    """A prediction folder as `xmei predict --out` leaves it: predictions.jsonl and predict.json
    (``record``: its paths; the rest a bulk run's)."""
    path.mkdir(parents=True, exist_ok=True)
    write_predictions(rows, path / "predictions.jsonl")
    (path / "predict.json").write_text(json.dumps({
        "checkpoint": None, "store": None, "annotations": "clips.json", "media_root": None,
        "generation": {"max_new_tokens": 48}, "counts": {"ok": len(rows), "failed": 0},
        **{k: str(v) for k, v in record.items()}}))
    return path


def text_store(path: Path, rows: list[dict]) -> Path:
    """A store of the rows' clips (texts only; no features are read): the first two clips' video is
    a real mp4 without sound, the first's audio a wav file; the others' are missing; the second's
    subtitle holds a script tag. 4 frames and 3 audio windows of 0.5 s a clip."""
    n = len(rows)
    texts = {"video_id": [r["video_id"] for r in rows],
             "subtitle": [EVIL if i == 1 else f"subtitle {i}" for i in range(n)],
             "video_description": [f"a face, clip {i}" for i in range(n)],
             "audio_description": [f"a voice, clip {i}" for i in range(n)],
             "video_path": ["video/clip0.mp4"] * 2 + [f"video/missing_{i}.mp4" for i in range(2, n)],
             "audio_path": ["audio/clip0.wav"] + [""] * (n - 1)}
    create_store(path, n, 8, SPECS, texts, {}, {"extract": {"num_frames": 4, "num_audio_clips": 3,
                                                            "audio_clip_seconds": 0.5}})
    return path


def tiny_wav(path: Path, seconds: float = 2.0) -> Path:
    """A 16 kHz wav: silence, with a loud burst in the second quarter."""
    import soundfile

    wave = np.zeros(int(16000 * seconds), np.float32)
    wave[len(wave) // 4:len(wave) // 2] = 0.8 * np.sin(np.arange(len(wave) // 4) / 5)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, 16000)
    return path


class Page(HTMLParser):
    """Cards (their attributes and text), confusion cells, script elements and images of a page."""

    def __init__(self, html: str):
        super().__init__()
        self.cards, self.cells, self.scripts, self.images, self._card = [], [], 0, [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "article" and "card" in attrs.get("class", "").split():
            self._card = {**attrs, "text": "", "bars": {}}
            self.cards.append(self._card)
        elif tag == "table" and attrs.get("class") == "bars":  # a card's probabilities: {kind: [bar, ...]}
            self._bars = self._card["bars"].setdefault(attrs["data-kind"], [])
        elif tag == "tr" and "data-label" in attrs:
            self._bars.append({"label": attrs["data-label"], "marks": attrs.get("class", "").split()})
        elif tag == "span" and attrs.get("style", "").startswith("width:"):  # a bar: its width in %
            self._bars[-1]["width"] = float(attrs["style"].removeprefix("width:").strip().removesuffix("%"))
        elif tag == "td" and "data-kind" in attrs:
            self.cells.append(attrs)
        elif tag == "script":
            self.scripts += 1
        elif tag == "img":  # the page's script sets src when the card comes near the view
            self.images.append(attrs.get("data-src") or attrs["src"])

    def handle_endtag(self, tag):
        if tag == "article":
            self._card = None

    def handle_data(self, data):
        if self._card is not None:
            self._card["text"] += data

    def ids(self, **attrs) -> set[str]:
        """video_ids of the cards with these data attributes (data_ref_emotion="sad", ...)."""
        want = {k.replace("_", "-"): v for k, v in attrs.items()}
        return {c["text"].split()[0] for c in self.cards if all(c.get(k) == v for k, v in want.items())}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    rows = add_probs(make_rows(40))
    rows[3]["explanation"] = rows[3]["ref_explanation"] = EVIL + " & more"
    return rows


@pytest.fixture(scope="module")
def page(rows, tmp_path_factory) -> tuple[Page, Path]:
    base = tmp_path_factory.mktemp("report")
    folder = eval_folder(base / "eval", rows, with_report=True)
    tiny_video(base / "media" / "video" / "clip0.mp4")
    tiny_wav(base / "media" / "audio" / "clip0.wav")
    path = build_report(folder, store=text_store(base / "store", rows), media_root=base / "media")
    return Page(path.read_text()), folder


def test_every_clip_has_one_card_and_each_filter_selects_its_clips(rows, page):
    parsed, _ = page
    assert [c["text"].split()[0] for c in parsed.cards] == [r["video_id"] for r in rows]
    want = expected(rows)
    assert all(want.values())  # every filter has clips here
    for outcome in ("correct", "emotion", "intent", "both"):
        assert parsed.ids(data_outcome=outcome) == want[outcome], outcome
    assert parsed.ids(data_invalid="1") == want["invalid"]
    for r in rows:  # the label filters: by reference and by predicted label
        e, i = r["ref_emotion"], canon(r["intent"], INTENTS)
        assert r["video_id"] in parsed.ids(data_ref_emotion=e) & parsed.ids(data_pred_intent=i)
    assert len(parsed.ids(data_pred_emotion="happy")) == sum(canon(r["emotion"], EMOTIONS) == "happy" for r in rows)
    scores = {c["text"].split()[0]: float(c["data-m-rouge_l"]) for c in parsed.cards}  # no clip_scores.jsonl
    assert all(abs(scores[r["video_id"]] - clip_rouge_l(r["explanation"] or "", r["ref_explanation"])) < 1e-4
               for r in rows)


def test_confusion_cells_count_the_rows_and_agree_with_results(rows, page):
    parsed, folder = page
    results = json.loads((folder / "results.json").read_text())
    for kind, labels in (("emotion", EMOTIONS), ("intent", INTENTS)):
        cells = [c for c in parsed.cells if c["data-kind"] == kind]
        assert len(cells) == len(labels) * (len(labels) + 1)  # with the invalid column
        for cell in cells:
            n = sum(r[f"ref_{kind}"] == cell["data-ref"] and canon(r[kind], labels) == cell["data-pred"] for r in rows)
            assert int(cell["data-count"]) == n
            # a cell shows the cards whose reference and predicted labels are the cell's
            assert len(parsed.ids(**{f"data_ref_{kind}": cell["data-ref"],
                                     f"data_pred_{kind}": cell["data-pred"]})) == n
        grid = [[int(c["data-count"]) for c in cells[i * (len(labels) + 1):(i + 1) * (len(labels) + 1)]]
                for i in range(len(labels))]
        assert grid == results[kind]["confusion"]


def test_texts_show_as_text_and_frames_or_a_note(page):
    parsed, folder = page
    assert parsed.scripts == 1  # the page's own
    html = (folder / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert EVIL in parsed.cards[1]["text"] and EVIL + " & more" in parsed.cards[3]["text"]
    # clips 0 and 1: their 4 frames in one strip (relative links); clip 0 its wav's waveform and windows
    assert parsed.images == [f"{ASSETS}/{name}" for name in ("000000_frames.jpg", "000000_audio.png",
                                                              "000001_frames.jpg")]
    from PIL import Image
    assert Image.open(folder / parsed.images[0]).size == (4 * 96 + 3 * 2, 72)  # 160x120 frames at 72 px high
    assert "no audio: the video has no audio track" in parsed.cards[1]["text"]
    assert "frames not shown" in parsed.cards[2]["text"] and "missing video file" in parsed.cards[2]["text"]
    assert "audio not shown" in parsed.cards[2]["text"] and "no model given: no attention maps" in html
    assert "2.0 s; below, the 3 sampled windows of 0.5 s" in parsed.cards[0]["text"] and "unavailable" in html


def test_the_audio_strip_marks_each_sampled_window_over_the_waveform(page):
    """Each window's lane is grey exactly over the window's span as stage 1 spreads them, and the
    waveform's envelope is drawn where the sound is loud (the wav's second quarter)."""
    from PIL import Image

    from pipeline.decode import window_starts
    from xmei.report import AUDIO_SIZE

    _, folder = page
    strip = np.asarray(Image.open(folder / ASSETS / "000000_audio.png").convert("RGB")).astype(int)
    width, wave_height, lane = AUDIO_SIZE
    assert strip.shape == (wave_height + 4 + 3 * lane, width, 3)
    starts, size = window_starts(32000, 3, 8000), 8000  # 2 s at 16 kHz, 3 windows of 0.5 s
    for w, start in enumerate(starts):
        row = strip[wave_height + 4 + w * lane + 1]
        grey = np.flatnonzero((row == 170).all(axis=1))
        assert abs(grey[0] - start * width / 32000) <= 1 and abs(grey[-1] - (start + size) * width / 32000) <= 2
    inked = (strip[:wave_height] < 200).all(axis=2).sum(axis=0)  # dark pixels per column of the waveform
    quarter = width // 4
    assert inked[quarter + 5:2 * quarter - 5].min() > wave_height / 2 > inked[2 * quarter + 5:].max()


def test_compare_marks_the_clips_whose_labels_differ(rows, tmp_path):
    other = [dict(r) for r in rows[:-1]]  # the last clip is not in the other evaluation
    for k in (0, 5, 9):
        other[k]["intent"] = INTENTS.labels[(INTENTS.labels.index(rows[k]["ref_intent"]) + 1) % 9] \
            if rows[k]["intent"] is not None and canon(rows[k]["intent"], INTENTS) == rows[k]["ref_intent"] \
            else rows[k]["ref_intent"]
    other[12]["emotion"] = None  # now invalid
    path = build_report(eval_folder(tmp_path / "a", rows), compare=eval_folder(tmp_path / "b", other))
    parsed = Page(path.read_text())
    differ = {r["video_id"] for r, o in zip(rows, other)
              if canon(r["emotion"], EMOTIONS) != canon(o["emotion"], EMOTIONS)
              or canon(r["intent"], INTENTS) != canon(o["intent"], INTENTS)}
    assert len(differ) >= 3
    assert parsed.ids(data_disagree="1") == differ
    assert "not in the compared evaluation" in parsed.cards[-1]["text"]
    assert f"({len(differ)} clips answered differently; 1 clips only here, 0 only there)" in path.read_text()


def test_a_folder_without_results_or_predictions_is_a_clear_error(rows, tmp_path):
    folder = eval_folder(tmp_path / "eval", rows[:5])
    (folder / "predictions.jsonl").unlink()
    with pytest.raises(ReportError, match="predictions.jsonl does not exist"):
        build_report(folder)
    with pytest.raises(ReportError, match="results.json does not exist"):
        build_report(tmp_path)
    (folder / "results.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"results.json \(the results file\) is not valid JSON: Expecting property "
                                          "name enclosed in double quotes at line 1, column 2$"):
        build_report(folder)


def test_cli_report_writes_the_page_and_a_missing_file_ends_cleanly(rows, tmp_path):
    folder = eval_folder(tmp_path / "eval", rows[:10])
    done = xmei("report", folder)
    assert done.returncode == 0, done.stderr
    assert f"wrote {folder / 'report.html'}" in done.stdout and "MB" in done.stdout
    (folder / "predictions.jsonl").unlink()
    failed = xmei("report", folder)
    assert failed.returncode == 1
    assert "predictions.jsonl does not exist" in failed.stderr and "Traceback" not in failed.stderr


def test_a_2000_clip_page_builds_quickly_and_stays_small(tmp_path):
    rows = make_rows(2000, seed=1)
    folder = eval_folder(tmp_path / "eval", rows)
    start = time.perf_counter()
    page = build_report(folder)
    seconds = time.perf_counter() - start
    size = page.stat().st_size / 1e6
    print(f"2,000 clips: report.html {size:.2f} MB (no thumbnails), built in {seconds:.1f} s")
    parsed = Page(page.read_text())
    assert len(parsed.cards) == 2000
    assert parsed.ids(data_invalid="1") == expected(rows)["invalid"]
    assert size < 10 and seconds < 20


def test_cards_carry_the_clip_scores_of_the_evaluation(rows, tmp_path):
    """With clip_scores.jsonl (xmei eval / score write it) each card shows and sorts by those scores;
    a file that is damaged or lacks a clip is an error naming it."""
    folder = eval_folder(tmp_path / "eval", rows[:6])
    clips = [{"video_id": r["video_id"], "bleu4": i / 10, "rouge_l": 1 - i / 10, "bertscore": 0.5} for i, r in
             enumerate(rows[:6])]
    (folder / "clip_scores.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clips))
    html = build_report(folder).read_text()
    parsed = Page(html)
    assert [{m: float(c[f"data-m-{m}"]) for m in ("bleu4", "rouge_l", "bertscore")} for c in parsed.cards] == \
        [{m: c[m] for m in ("bleu4", "rouge_l", "bertscore")} for c in clips]
    assert 'value="bertscore-desc"' in html and 'value="cider_d-asc"' not in html  # sorts by what there is
    (folder / "clip_scores.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clips[:5]))
    with pytest.raises(ReportError, match=r"clip_scores.jsonl has no scores for 1 clips"):
        build_report(folder)
    (folder / "clip_scores.jsonl").write_text('{"video_id": "clip_00000", "bleu4": "x"}\n')
    with pytest.raises(ReportError, match=r"clip_scores.jsonl \(the clip scores file\): line 1 is not a clip's "
                                          "scores; rescore with xmei score$"):
        build_report(folder)


def test_a_damaged_results_file_is_named(rows, tmp_path):
    folder = eval_folder(tmp_path / "eval", rows[:5])
    results = json.loads((folder / "results.json").read_text())
    del results["joint"]
    (folder / "results.json").write_text(json.dumps(results))
    with pytest.raises(ReportError, match=r"results.json lacks a field the report shows \(.*joint"):
        build_report(folder)
    (folder / "results.json").write_text("[]")
    with pytest.raises(ReportError, match=r"results.json \(the results file\) holds a JSON array, expected an object$"):
        build_report(folder)
    (folder / "results.json").write_text("{}")
    with pytest.raises(ReportError, match="lacks the emotion / intent label lists"):
        build_report(folder)


def test_label_probabilities_show_as_bars_in_label_order(rows, page):
    """A row's probabilities: one bar a label in the label set's order, as wide as its probability,
    the answer's label marked predicted, the reference's marked; the card carries the answer's
    probability to sort by. A row without them shows no bar and no such attribute."""
    parsed, folder = page
    assert sum("emotion_probs" in r for r in rows) == 30  # and 10 rows without
    for row, card in zip(rows, parsed.cards):
        if "emotion_probs" not in row:
            assert card["bars"] == {} and "data-p-emotion" not in card and "probabilities" not in card["text"]
            continue
        for kind, labels in (("emotion", EMOTIONS), ("intent", INTENTS)):
            bars, probs = card["bars"][kind], row[f"{kind}_probs"]
            assert [b["label"] for b in bars] == list(labels.labels)
            assert all(abs(b["width"] - 100 * probs[b["label"]]) <= 0.05 for b in bars)
            answer = canon(row[kind], labels)
            assert [b["label"] for b in bars if "pred" in b["marks"]] == ([] if answer == "invalid" else [answer])
            assert [b["label"] for b in bars if "ref" in b["marks"]] == [row[f"ref_{kind}"]]
            p = sure(row, kind)
            assert card.get(f"data-p-{kind}") == (None if p is None else f"{p:.4f}")
    assert sum(card.get("data-p-emotion") is None for card in parsed.cards) == \
        sum(sure(r, "emotion") is None for r in rows) > 10  # no probabilities, or an invalid answer
    html = (folder / "report.html").read_text()
    assert 'value="p_emotion-asc" data-key="data-p-emotion"' in html and 'value="p_intent-desc"' in html


def test_a_page_without_probabilities_offers_no_probability_sort(tmp_path):
    html = build_report(eval_folder(tmp_path / "eval", make_rows(8))).read_text()
    assert 'class="bars"' not in html and "p_emotion" not in html and "data-p-" not in html


def test_a_prediction_folders_page_counts_the_labels_and_shows_every_clip(tmp_path):
    """`xmei report DIR` on `xmei predict`'s folder: no metrics or references, the count of each
    predicted label, a card for every row with its subtitle, source and bars; the frames from
    DIR/store and predict.json's media root; a checkpoint predict.json names and that is gone, a
    warning; the clips whose extraction failed listed."""
    rows = predicted(add_probs(make_rows(20, seed=2), seed=2))
    tiny_video(tmp_path / "media" / "video" / "clip0.mp4")
    tiny_wav(tmp_path / "media" / "audio" / "clip0.wav")
    folder = predict_folder(tmp_path / "out", rows, media_root=tmp_path / "media", checkpoint=tmp_path / "gone")
    text_store(folder / "store", rows)
    (folder / "failures.jsonl").write_text(json.dumps({"video_id": "broken", "stage": "decode",
                                                       "reason": "not a video"}) + "\n")
    done = xmei("report", folder)
    assert done.returncode == 0, done.stderr
    assert f"names the checkpoint {tmp_path / 'gone'}, which is not a folder" in done.stderr.replace("\n", "")
    html = (folder / "report.html").read_text()
    parsed = Page(html)
    assert [c["text"].split()[0] for c in parsed.cards] == [r["video_id"] for r in rows]
    for absent in ('id="classification"', 'id="explanation"', 'class="confusion"', "data-outcome", "data-ref-",
                   'id="f-ref-emotion"', ">reference<", "correct ("):
        assert absent not in html, absent
    assert 'id="f-pred-emotion"' in html and 'id="f-pred-intent"' in html
    for kind, labels in (("emotion", EMOTIONS), ("intent", INTENTS)):
        cells = {c["data-pred"]: int(c["data-count"]) for c in parsed.cells if c["data-kind"] == kind}
        assert list(cells) == [*labels.labels, "invalid"]
        assert cells == {label: sum(canon(r[kind], labels) == label for r in rows) for label in cells}
        for label in cells:  # a count shows the cards its filter selects
            assert len(parsed.ids(**{f"data_pred_{kind}": label})) == cells[label]
    assert parsed.ids(data_invalid="1") == {r["video_id"] for r in rows if r["emotion"] is None}
    assert parsed.images == [f"{ASSETS}/{name}" for name in ("000000_frames.jpg", "000000_audio.png",
                                                              "000001_frames.jpg")]
    for row, card in zip(rows, parsed.cards):  # the row's own subtitle (not the store's) and its source
        assert f"said in clip {row['video_id'][-2:].lstrip('0') or '0'}" in card["text"]
        assert "source: " in card["text"] and bool(card["bars"]) == ("emotion_probs" in row)
    assert "source: a .srt file beside the video" in parsed.cards[0]["text"]
    assert "source: speech recognition" in parsed.cards[2]["text"]
    assert "broken" in html and "not a video" in html and "1 clips not predicted" in html
    assert f"20 clips predicted by {tmp_path / 'gone'} from clips.json, {sum(r['cut_off'] for r in rows)} answers " \
        "cut off" in html


def test_damaged_prediction_files_are_named(tmp_path):
    rows = predicted(add_probs(make_rows(4)))
    folder = predict_folder(tmp_path / "out", rows)
    record = (folder / "predict.json").read_text()
    lines = (folder / "predictions.jsonl").read_text().splitlines()

    def fails(match: str, name: str = "predictions.jsonl", text: str | None = None, line: int = 2) -> None:
        """The page of ``folder`` whose file ``name`` holds ``text`` (else: line ``line`` replaced)."""
        changed = list(lines)
        changed[line - 1] = text
        (folder / name).write_text(text if name == "predict.json" else "\n".join(changed) + "\n")
        with pytest.raises(ReportError, match=match):
            build_report(folder)
        (folder / "predict.json").write_text(record)
        (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")

    fails(r"predict.json \(the prediction's record\) is not valid JSON: .* line 1, column 2", "predict.json",
          "{broken")
    fails(r"predict.json \(the prediction's record\): checkpoint is a JSON number, expected a string",
          "predict.json", '{"checkpoint": 3}')
    fails(r"predictions.jsonl \(the predictions file\): line 2 is not valid JSON", text="{cut")
    fails(r"predictions.jsonl: line 3 is not a clip's prediction", text="[1, 2]", line=3)
    row = json.loads(lines[1])
    fails(r"predictions.jsonl: line 2: cut_off is a JSON string, expected a boolean$",
          text=json.dumps({**row, "cut_off": "yes"}))
    fails(r"predictions.jsonl: line 2 repeats video_id 'clip_00000' of line 1",
          text=json.dumps({**row, "video_id": "clip_00000"}))
    probs = row["emotion_probs"]
    fails(r"predictions.jsonl: line 2 \('clip_00001'\): emotion_probs must hold exactly the config's emotion labels "
          rf".*; missing \['{list(probs)[0]}'\]$",
          text=json.dumps({**row, "emotion_probs": {k: v for k, v in list(probs.items())[1:]}}))
    fails(r"line 2 \('clip_00001'\): intent_probs sums to 0\.5, expected 1 \(within 0\.001\)",
          text=json.dumps({**row, "intent_probs": {k: v / 2 for k, v in row["intent_probs"].items()}}))
    fails(r"line 2 \('clip_00001'\): emotion_probs is a JSON array, expected an object \{label: probability\}",
          text=json.dumps({**row, "emotion_probs": [0.5, 0.5]}))
    with pytest.raises(ReportError, match="is a prediction folder .* --compare compares evaluations"):
        build_report(folder, compare=folder)
    build_report(folder)  # whole again: the page is made
    (folder / "predictions.jsonl").unlink()
    with pytest.raises(ReportError, match=r"predictions.jsonl does not exist: the prediction in .* has not"):
        build_report(folder)


def test_an_evaluations_damaged_probabilities_are_named(tmp_path):
    """Read by xmei.evaluate's read_predictions (as `xmei score` reads them): its EvaluationError."""
    from xmei.evaluate import EvaluationError

    rows = add_probs(make_rows(4))
    rows[2]["intent_probs"] = {"happy": 1.0}
    with pytest.raises(EvaluationError, match=r"predictions.jsonl: line 3 \('clip_00002'\): intent_probs must hold "
                                              r"exactly the config's intent labels .*; not labels \['happy'\]"):
        build_report(eval_folder(tmp_path / "eval", rows))


def test_a_predictions_own_checkpoint_draws_the_attention(trained_run, patch_store, corpus, tmp_path):
    """With no option, `xmei report DIR` draws each clip's attention with the checkpoint predict.json
    names, over the store it names (no DIR/store here) and the media root it names."""
    from stores import FeatureStore

    ids = [str(v) for v in FeatureStore(patch_store).read_whole("video_id")][:3]
    rows = predicted(add_probs([{**r, "video_id": v} for r, v in zip(make_rows(3), ids)]))
    folder = predict_folder(tmp_path / "out", rows, checkpoint=trained_run / LAST, store=patch_store,
                            media_root=corpus)
    done = xmei("report", folder)
    assert done.returncode == 0, done.stderr
    images = sorted(f.name for f in (folder / ASSETS).iterdir())
    assert [name for name in images if name.endswith("attention.jpg")] == \
        [f"{i:06d}_attention.jpg" for i in range(3)]
    assert "visual LQ-Former attention" in (folder / "report.html").read_text()


# ----------------------------------------------------------------------------- a real browser

@pytest.fixture(scope="session")
def chromium() -> list[str]:
    """Headless chromium's command line; Debian's package is installed when missing (as root)."""
    debian_program("chromium", "chromium")
    return ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            "--virtual-time-budget=5000"]


def browse(chromium: list[str], page: Path, fragment: str = "", *options: str) -> str:
    """What chromium prints for the page opened at ``#fragment`` (its DOM with --dump-dom)."""
    done = subprocess.run([*chromium, *options, f"{page.resolve().as_uri()}{fragment}"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def shown(dom: str) -> list[str]:
    """video_ids of the cards the page's script left visible, in page order."""
    return [c["text"].split()[0] for c in Page(dom).cards if "hidden" not in c["class"].split()]


def test_the_page_renders_in_a_real_browser(chromium, page, tmp_path):
    from PIL import Image

    _, folder = page
    shot = tmp_path / "report.png"
    browse(chromium, folder / "report.html", "", f"--screenshot={shot}", "--window-size=1280,1600")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600) and shot.stat().st_size > 50_000
    pixels = np.asarray(image).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 100  # tables, tags and the clip's frames: not a blank or error page
    # the images of the cards near the view were loaded, from report_files/ beside the page
    dom = browse(chromium, folder / "report.html", "", "--dump-dom")
    assert f'src="{ASSETS}/000000_frames.jpg"' in dom and len(Page(dom).cards) == 40


def test_the_pages_script_filters_and_sorts_from_the_url(chromium, rows, page):
    """report.html#outcome=intent shows the intent errors of predictions.jsonl, and only them; labels
    and sort work the same way, and the counter says how many are shown."""
    _, folder = page
    lines = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    want = expected(lines)
    dom = browse(chromium, folder / "report.html", "#outcome=intent", "--dump-dom")
    assert set(shown(dom)) == want["intent"] and want["intent"]
    assert f'<span id="shown">{len(want["intent"])}</span>' in dom
    happy_both = [r["video_id"] for r in lines if canon(r["emotion"], EMOTIONS) == "happy"
                  and r["video_id"] in want["both"]]
    assert happy_both
    assert shown(browse(chromium, folder / "report.html", "#outcome=both&pred-emotion=happy", "--dump-dom")) == \
        happy_both
    ordered = [c for c in Page(browse(chromium, folder / "report.html", "#sort=rouge_l-asc", "--dump-dom")).cards]
    scores = [float(c["data-m-rouge_l"]) for c in ordered]
    assert scores == sorted(scores) and len(ordered) == 40
    # the answers' probability: the least sure emotion first, then the cards without one in page order
    server = Page((folder / "report.html").read_text()).cards
    want = [c["text"].split()[0] for c in sorted((c for c in server if "data-p-emotion" in c),
                                                 key=lambda c: (float(c["data-p-emotion"]), int(c["data-index"])))]
    want += [c["text"].split()[0] for c in server if "data-p-emotion" not in c]
    assert [c["text"].split()[0] for c in Page(browse(chromium, folder / "report.html", "#sort=p_emotion-asc",
                                                      "--dump-dom")).cards] == want


def test_a_prediction_pages_script_filters_and_sorts(chromium, tmp_path):
    """The script of a page with no references: a predicted label from the URL, sorted by the
    answers' probability, surest first."""
    rows = predicted(add_probs(make_rows(30, seed=4), seed=4))
    page = build_report(predict_folder(tmp_path / "out", rows))
    intent = INTENTS.normalize(rows[0]["intent"])
    chosen = [r for r in rows if canon(r["intent"], INTENTS) == intent]
    assert len(chosen) >= 2
    want = [r["video_id"] for r in sorted((r for r in chosen if sure(r, "intent") is not None),
                                          key=lambda r: -round(sure(r, "intent"), 4))]
    want += [r["video_id"] for r in chosen if sure(r, "intent") is None]
    dom = browse(chromium, page, f"#pred-intent={intent}&sort=p_intent-desc", "--dump-dom")
    assert shown(dom) == want and f'<span id="shown">{len(chosen)}</span>' in dom
    # a click on a label's count (by a script added to a copy of the page) shows that label's clips
    clicked = page.with_name("clicked.html")
    clicked.write_text(page.read_text().replace("</body>", '<script>document.querySelector('
                                                '"#counts-emotion td[data-pred=sad]").click();</script></body>'))
    sad = [r["video_id"] for r in rows if canon(r["emotion"], EMOTIONS) == "sad"]
    assert sad and shown(browse(chromium, clicked, "", "--dump-dom")) == sad
