"""`xmei report` (and `xmei eval --html`): one browsable page of an evaluation or of a prediction.

Reads an evaluation folder (``results.json`` and ``predictions.jsonl`` of `xmei eval`, or of
`xmei score`, whose results name the predictions file), or a prediction folder (``predict.json``
and ``predictions.jsonl`` of `xmei predict --out`, no references: :func:`prediction_folder`), and
writes beside them::

    EVAL_DIR/report.html         the page: metric tables, both confusion matrices, one card a clip
                                 (a prediction folder: the count of each predicted label, no metrics)
    EVAL_DIR/report_files/       a clip's images (only with a store and media root), which the page's
                                 script loads when the clip's card comes near the view:
        <i>_frames.jpg           its sampled frames in a row, 72 px high
        <i>_attention.jpg        (with a model) the visual LQ-Former's attention over each frame, one row
                                 per query group: the maps of `xmei attention`, 64 px a frame
        <i>_audio.png            its waveform with the sampled audio windows marked, one lane a window;
                                 with a model the lanes are shaded by the audio LQ-Former's attention

The page needs no server and no network: its script and style are inline, its images beside it
(relative links). Filtering and sorting happen in the browser over data attributes of the cards:
``data-outcome`` (correct / emotion / intent / both: which of the two labels are wrong, an invalid
label counting as wrong), ``data-invalid`` (1: the answer named no label for emotion or intent),
``data-ref-emotion`` ... ``data-pred-intent`` (``invalid`` for an invalid prediction),
``data-m-<metric>`` (the clip's own explanation scores, below), ``data-p-emotion`` /
``data-p-intent`` (the probability of the predicted label, where the row has the label
probabilities and the label is valid) and, with ``--compare``, ``data-disagree``. The filters
and the sort are kept in the URL's fragment
(``report.html#outcome=intent&pred-emotion=sad&sort=rouge_l-asc``, ``#sort=p_emotion-asc``: the
least sure emotions first): a link opens the page filtered. A card without the sort's value goes last.

A row's label probabilities (``emotion_probs`` / ``intent_probs``: {label: probability} over the
label set, :mod:`xmei.generate`) show as one bar a label, in the label set's order, the predicted
label's bar dark and the reference label's name marked; a row without them shows its answer alone.
A prediction folder's page has no reference column, metric or confusion matrix: the count of each
predicted label (a click filters the cards) and each clip's subtitle with where it came from.

The clip's own explanation scores are those `xmei eval` / `xmei score` computed with the corpus
metrics (clip_scores.jsonl beside results.json: sentence BLEU-4 and METEOR, ROUGE-L, CIDEr-D,
BERTScore, BLEURT, each where available). An evaluation folder without that file (an older one)
gets the clip's ROUGE-L only, computed here: pycocoevalcap's (F with beta 1.2) on the simple
tokenization (:func:`xmei.text_metrics.simple_tokenize`), where eval's is on PTB tokens.

The HTML comes from ``templates/report.html.j2`` with autoescaping: a clip's texts show as text.
The page and its images are written beside the earlier ones (``.report.html.partial-<pid>``,
``.report_files.partial-<pid>``) and renamed into place once whole: a kill or a full disk (a
DiskFullError naming the filesystem) leaves the earlier page as it was.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.decode import SAMPLE_RATE
from stores.location import Location
from stores.store import PARTIAL, remove_dead_partials  # the stores' partial folders: one convention
from xmei.classification import INVALID
from xmei.errors import JSON_TYPES, UserError, json_lines, json_type, read_json, writing
from xmei.evaluate import CLIP_SCORES, PUBLISHED_ORDER, TITLES, check_probabilities, read_predictions
from xmei.labels import DEFAULT_SYNONYMS, LabelSet

if TYPE_CHECKING:
    from xmei.model import LQFormers, XMEIQwen

__all__ = ["ASSETS", "PAGE", "Prediction", "ReportError", "attention_strip", "audio_strip", "build_report", "clip_rouge_l",
           "frames_strip", "prediction_folder"]

PAGE = "report.html"
ASSETS = "report_files"  # the cards' images, linked relative to the page
FRAME_HEIGHT = 72  # px of a frame in the frames strip (aspect kept)
CELL = 64  # px of a frame's center crop (what CLIP sees) under its attention map
AUDIO_SIZE = (640, 40, 5)  # the audio strip's width, the waveform's height and a window lane's, px
SCORES_NOTE = {  # the page's note on the clips' scores, with clip_scores.jsonl or without
    True: "Scores: the clip's own explanation scores from the evaluation (clip_scores.jsonl): sentence BLEU-4 and "
          "METEOR, ROUGE-L, CIDEr-D (with the corpus's idf), BERTScore F1, BLEURT, where available",
    False: "Score: the clip's ROUGE-L (pycocoevalcap, F with beta 1.2, simple tokenization) of its explanation "
           "against its reference; this evaluation has no clip_scores.jsonl (an older xmei)"}
RESCORE = "rescore with xmei score"  # rewrites clip_scores.jsonl beside the predictions
PREDICT_RECORD = "predict.json"  # beside a prediction folder's predictions.jsonl: what made them
PREDICTED = {"video_id": (str,), "emotion": (str, type(None)), "intent": (str, type(None)),  # a prediction row's
             "explanation": (str, type(None)), "text": (str,), "cut_off": (bool,), "subtitle": (str,),  # fields and
             "subtitle_source": (str, type(None))}  # their JSON types; video_id is required
SUBTITLE_SOURCES = {"srt": "a .srt file beside the video", "vtt": "a .vtt file beside the video",  # a row's
                    "txt": "a .txt file beside the video", "csv": "the subtitles CSV",  # subtitle_source,
                    "asr": "speech recognition", "none": "none found"}  # as the page says it
OUTCOMES = {"correct": "correct", "emotion": "emotion wrong (intent right)", "intent": "intent wrong (emotion right)",
            "both": "both wrong"}


class ReportError(UserError, ValueError):
    """An evaluation folder the report cannot be made from; the message names the file."""


@dataclass
class Card:
    """One test clip on the page."""

    video_id: str
    ref: dict[str, str] | None  # {"emotion": ..., "intent": ..., "explanation": ...}; None: a prediction's clip
    pred: dict[str, str | None]  # labels canonical, None: invalid
    outcome: str | None  # a key of OUTCOMES; None without references
    invalid: bool
    cut_off: bool
    scores: dict[str, float]  # the clip's explanation scores: {metric: value}, in PUBLISHED_ORDER
    probs: dict[str, dict[str, float]] = field(default_factory=dict)  # {kind: {label: p}} in label-set order
    subtitle_source: str | None = None  # a prediction's row: where its subtitle came from (srt, asr, none, ...)
    texts: dict[str, str] = field(default_factory=dict)  # subtitle, video / audio description (from a store)
    images: dict[str, dict] = field(default_factory=dict)  # frames / attention / audio: {src (relative), width, height}
    attention_rows: list[str] = field(default_factory=list)  # the attention strip's rows, top to bottom
    audio_lanes: str = ""  # what the audio strip's lanes show
    notes: list[str] = field(default_factory=list)
    other: dict[str, str | None] | None = None  # the compared evaluation's labels and explanation
    disagree: bool = False

    def sure(self, kind: str) -> float | None:
        """The probability of the predicted ``kind`` label; None without probabilities or a valid label."""
        return self.probs.get(kind, {}).get(self.pred[kind])


@dataclass(frozen=True)
class Prediction:
    """A folder of `xmei predict --out` (predict.json, no results.json) and what its predict.json
    names, each where it exists (else None): the store (``DIR/store``, else the one predict.json
    names), the media root and the checkpoint: the defaults of `xmei report DIR`."""

    folder: Path
    record: dict  # predict.json: checkpoint, store, annotations, media_root, generation, counts
    store: Path | None
    media_root: Path | None
    checkpoint: Path | None
    missing: tuple[str, ...]  # what predict.json names and is not there, one sentence each


def clip_rouge_l(candidate: str, reference: str) -> float:
    """pycocoevalcap's ROUGE-L of one clip (F, beta 1.2) on simple-tokenized text."""
    from pycocoevalcap.rouge.rouge import Rouge

    from xmei.text_metrics import simple_tokenize

    return float(Rouge().calc_score([simple_tokenize(candidate)], [simple_tokenize(reference)]))


def build_report(eval_dir: Path, store: Path | None = None, media_root: Path | None = None,
                 compare: Path | None = None, synonyms: dict[str, dict[str, str]] | None = None,
                 model: XMEIQwen | LQFormers | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 label_sets: dict[str, LabelSet] | None = None) -> Path:
    """Write ``EVAL_DIR/report.html`` (and, with ``store`` and ``media_root``, its images in
    ``EVAL_DIR/report_files/``); returns the page's path. ``compare``: another evaluation folder of
    the same clips, whose labels each card shows beside these. ``synonyms``: {"emotion": {variant:
    label}, "intent": ...} for predictions files holding label variants (default: the built-in
    table). ``model``: the evaluated model (or its :class:`LQFormers`), for the attention over each
    clip's frames and audio windows. Label order is the one the evaluation was scored with (its
    results.json). ``EVAL_DIR`` may be a prediction folder (:func:`prediction_folder`), whose
    answers are read in ``label_sets`` ({"emotion": ..., "intent": ...}; default: the built-in
    sets); its ``store`` and ``media_root`` are not defaulted here (the command does that)."""
    eval_dir = Path(eval_dir)
    found = prediction_folder(eval_dir)
    if found is None:
        page = _evaluation_page(eval_dir, compare, synonyms)
    elif compare is not None:
        raise ReportError(f"{eval_dir} is a prediction folder ({PREDICT_RECORD}, no references): --compare "
                          "compares evaluations")
    else:
        page = _prediction_page(found, label_sets or _default_label_sets())
    cards = page["cards"]
    for name in (ASSETS, PAGE):  # what a killed run was writing
        remove_dead_partials(eval_dir / f".{name}")
    assets = eval_dir / f".{ASSETS}{PARTIAL}{os.getpid()}"  # renamed to ASSETS with the page
    try:
        with writing(eval_dir, "the report page and its images", f"the earlier page in {eval_dir} is as it was"):
            media_note = _add_store(cards, store, media_root, assets, model, progress) if store is not None \
                else "no store given: no subtitles, captions, frames or audio (xmei report EVAL_DIR --store STORE)"
            sortable = {kind: any(c.sure(kind) is not None for c in cards) for kind in ("emotion", "intent")}
            html = _render(page.pop("source"), **page, media_note=media_note, outcomes=OUTCOMES, invalid=INVALID,
                           sources=SUBTITLE_SOURCES, titles=TITLES, metric_order=PUBLISHED_ORDER,
                           by_probability=sortable)
            return _publish(eval_dir, html, assets)
    finally:
        shutil.rmtree(assets, ignore_errors=True)


def _evaluation_page(eval_dir: Path, compare: Path | None, synonyms) -> dict[str, Any]:
    """The template's context of an evaluation folder's page (``source``: the file it names when
    a field the page shows is missing)."""
    results, rows, labels, predictions = _evaluation(eval_dir, synonyms)
    scores = _clip_scores(eval_dir, rows)
    cards = [_card(row, labels, scores.get(row["video_id"]), predictions) for row in rows]
    confusion = _confusion(cards, labels)
    _check_agrees(results, confusion, eval_dir)
    other = None
    if compare is not None:
        other_results, other_rows, other_labels, other_predictions = _evaluation(Path(compare), synonyms)
        if {k: v.labels for k, v in other_labels.items()} != {k: v.labels for k, v in labels.items()}:
            raise ReportError(f"--compare {compare} was scored with other label sets than {eval_dir}")
        _add_other(cards, [_card(r, other_labels, {}, other_predictions) for r in other_rows])
        other = {"name": _name(other_results, Path(compare)), "results": other_results,
                 "only_here": sum(c.other is None for c in cards),
                 "only_there": len({r["video_id"] for r in other_rows} - {c.video_id for c in cards})}
    return {"source": eval_dir / "results.json", "name": _name(results, eval_dir), "results": results,
            "labels": {k: list(v.labels) for k, v in labels.items()}, "cards": cards, "confusion": confusion,
            "other": other, "counts": _counts(cards), "scored": list(cards[0].scores) if cards else [],
            "scores_note": SCORES_NOTE[bool(scores)], "predicted": None, "record": None, "failures": None}


def _prediction_page(found: Prediction, label_sets: dict[str, LabelSet]) -> dict[str, Any]:
    """The template's context of a prediction folder's page: no references, no metrics."""
    path = found.folder / "predictions.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} does not exist: the prediction in {found.folder} has not written its answers "
                          "(run the same xmei predict again)")
    cards = [_answer_card(row, label_sets, where) for where, row in _predicted_rows(path)]
    predicted = {kind: {label: sum(c.pred[kind] == label for c in cards) for label in label_set.labels}
                 | {INVALID: sum(c.pred[kind] is None for c in cards)} for kind, label_set in label_sets.items()}
    return {"source": found.folder / PREDICT_RECORD, "name": f"predictions ({found.folder.name})", "results": None,
            "labels": {k: list(v.labels) for k, v in label_sets.items()}, "cards": cards, "confusion": None,
            "other": None, "counts": _counts(cards), "scored": [], "scores_note": "", "predicted": predicted,
            "record": {k: found.record.get(k) for k in ("checkpoint", "annotations")},
            "failures": _failures(found.folder)}


def prediction_folder(folder: Path) -> Prediction | None:
    """The prediction folder ``folder`` (it holds predict.json and no results.json), None for any
    other folder; a damaged predict.json is a ReportError naming it (and the field)."""
    folder = Path(folder)
    record_path = folder / PREDICT_RECORD
    if not record_path.is_file() or (folder / "results.json").exists():
        return None
    record = read_json(record_path, "the prediction's record", ReportError)
    named = {}
    for key in ("checkpoint", "store", "media_root", "annotations"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ReportError(f"{record_path} (the prediction's record): {key} is a JSON {json_type(record[key])}, "
                              "expected a string (a path): damaged?")
        named[key] = Path(record[key]) if record.get(key) else None
    url = record.get("store") if Location.parse(record.get("store") or ".").remote else None  # seen when opened
    store = folder / "store" if (folder / "store").is_dir() else url or named["store"]
    found = {"store": store if url or (store is not None and store.is_dir()) else None,
             "media_root": named["media_root"] if named["media_root"] and named["media_root"].is_dir() else None,
             "checkpoint": named["checkpoint"] if named["checkpoint"] and named["checkpoint"].is_dir() else None}
    missing = tuple(f"{record_path} names the {key.replace('_', ' ')} {named[key]}, which is not a folder"
                    for key, value in found.items() if value is None and named[key] is not None)
    return Prediction(folder, record, missing=missing, **found)


def _default_label_sets() -> dict[str, LabelSet]:
    from xmei.config import Config

    config = Config()
    return {"emotion": config.emotions, "intent": config.intents}


def _publish(eval_dir: Path, html: str, assets: Path) -> Path:
    """The page ``html`` written beside the earlier one, then it and its images (the folder
    ``assets``, where there is one) put in place of the earlier ones: renames, which need no space."""
    page, partial = eval_dir / PAGE, eval_dir / f".{PAGE}{PARTIAL}{os.getpid()}"
    try:
        partial.write_text(html, encoding="utf-8")
        if (eval_dir / ASSETS).is_dir():
            shutil.rmtree(eval_dir / ASSETS)  # images of an earlier page: this page has its own
        if assets.is_dir():
            assets.rename(eval_dir / ASSETS)
        os.replace(partial, page)  # a kill or a full disk never leaves half a page
    finally:
        partial.unlink(missing_ok=True)
    return page


def _evaluation(folder: Path, synonyms) -> tuple[dict, list[dict], dict[str, LabelSet], Path]:
    """results.json, the rows of its predictions file, the label sets it was scored with and that file."""
    results_path = folder / "results.json"
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder (an evaluation folder of xmei eval or xmei score)")
    if not results_path.is_file():
        raise ReportError(f"{results_path} does not exist: {folder} is not an evaluation folder (xmei eval --out "
                          "or xmei score --out writes it)")
    results = read_json(results_path, "the results file", ReportError)
    names = {kind: results[kind].get("labels") if isinstance(results.get(kind), dict) else None
             for kind in ("emotion", "intent")}
    if not (all(isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in names.values())
            and isinstance(results.get("explanation"), dict)):
        raise ReportError(f"{results_path} lacks the emotion / intent label lists or the explanation metrics: "
                          "not the results of xmei eval or xmei score (damaged?)")
    table = synonyms or DEFAULT_SYNONYMS
    labels = {kind: LabelSet(kind, tuple(names[kind]),
                             {k: v for k, v in table.get(kind, {}).items() if v in names[kind]})
              for kind in ("emotion", "intent")}
    predictions = folder / "predictions.jsonl"
    if not predictions.exists() and isinstance(results.get("predictions"), str):
        predictions = Path(results["predictions"])  # xmei score: the file it scored
    if not predictions.is_file():
        raise ReportError(f"{folder / 'predictions.jsonl'} does not exist: the report needs each clip's answer "
                          "(xmei eval writes it beside results.json)")
    return results, read_predictions(predictions, labels["emotion"], labels["intent"]), labels, predictions


def _clip_scores(folder: Path, rows: list[dict]) -> dict[str, dict[str, float]]:
    """{video_id: {metric: value}} from the folder's clip_scores.jsonl; {} without one. A file that
    is damaged or does not hold every clip is an error naming it."""
    path = folder / CLIP_SCORES
    if not path.is_file():
        return {}
    out = {}
    for lineno, row in json_lines(path, "the clip scores file", ReportError, hint=RESCORE):
        try:
            out[row.pop("video_id")] = {m: float(row[m]) for m in PUBLISHED_ORDER if m in row}
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ReportError(f"{path} (the clip scores file): line {lineno} is not a clip's scores; {RESCORE}") \
                from None
    lacking = [r["video_id"] for r in rows if r["video_id"] not in out]
    if lacking:
        raise ReportError(f"{path} has no scores for {len(lacking)} clips of the predictions (first: {lacking[0]!r}):"
                          f" not this evaluation's; {RESCORE}")
    return out


def _card(row: dict, labels: dict[str, LabelSet], scores: dict[str, float] | None, predictions: Path) -> Card:
    """``scores``: the clip's explanation scores; None: compute its ROUGE-L here. ``predictions``:
    the file of ``row``, named when its label probabilities are damaged."""
    card = _answer_card(row, labels, f"{predictions} ({row['video_id']!r})")
    ref = {kind: labels[kind].normalize(row[f"ref_{kind}"]) for kind in labels}
    wrong = {kind: card.pred[kind] != ref[kind] for kind in labels}  # None (invalid) is wrong
    card.outcome = "both" if all(wrong.values()) else "emotion" if wrong["emotion"] else \
        "intent" if wrong["intent"] else "correct"
    card.ref = {**ref, "explanation": row["ref_explanation"]}
    card.scores = scores if scores is not None else {"rouge_l": clip_rouge_l(row["explanation"] or "",
                                                                             row["ref_explanation"])}
    return card


def _answer_card(row: dict, labels: dict[str, LabelSet], where: str) -> Card:
    """The card of a clip's answer alone (no references, no scores): labels canonical, an unknown
    one invalid, the label probabilities checked (``where``: the row, for their errors)."""
    pred = {kind: labels[kind].normalize(row[kind]) if row.get(kind) else None for kind in labels}
    return Card(video_id=row["video_id"], ref=None, pred={**pred, "explanation": row.get("explanation")},
                outcome=None, invalid=None in pred.values(), cut_off=bool(row.get("cut_off")), scores={},
                probs=_probs(row, labels, where), subtitle_source=row.get("subtitle_source"),
                texts={"subtitle": row["subtitle"]} if "subtitle" in row else {})


def _probs(row: dict, labels: dict[str, LabelSet], where: str) -> dict[str, dict[str, float]]:
    """{kind: {label: probability}} in label-set order, of each of the row's ``emotion_probs`` /
    ``intent_probs`` (absent or null: left out); one that is not a distribution over the label
    set is a ReportError naming ``where`` and the field (xmei.evaluate's check, as `xmei score`'s)."""
    return {kind: check_probabilities(row[f"{kind}_probs"], where, f"{kind}_probs", label_set, ReportError)
            for kind, label_set in labels.items() if row.get(f"{kind}_probs") is not None}


def _predicted_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """("FILE: line N (video_id)", row) of each row of a prediction folder's predictions.jsonl; a
    line that is not an object of the fields' JSON types (PREDICTED) or repeats a clip is a
    ReportError naming the file and line."""
    seen = {}  # video_id -> line
    for lineno, row in json_lines(path, "the predictions file", ReportError):
        where = f"{path}: line {lineno}"
        if not isinstance(row, dict) or not isinstance(row.get("video_id"), str):
            raise ReportError(f"{where} is not a clip's prediction (a JSON object with a video_id string): damaged?")
        for name, kinds in PREDICTED.items():
            if name in row and not isinstance(row[name], kinds):
                raise ReportError(f"{where}: {name} is a JSON {json_type(row[name])}, expected a "
                                  f"{JSON_TYPES[kinds[0]]}{' or null' if len(kinds) > 1 else ''}")
        if row["video_id"] in seen:
            raise ReportError(f"{where} repeats video_id {row['video_id']!r} of line {seen[row['video_id']]}")
        seen[row["video_id"]] = lineno
        yield f"{where} ({row['video_id']!r})", row


def _failures(folder: Path) -> list[dict[str, str]]:
    """The clips a prediction could not extract (its failures.jsonl: video_id, stage, reason); [] without one."""
    path = folder / "failures.jsonl"
    if not path.is_file():
        return []
    out = []
    for lineno, row in json_lines(path, "the prediction's failures", ReportError):
        if not isinstance(row, dict):
            raise ReportError(f"{path}: line {lineno} is a JSON {json_type(row)}, expected an object (video_id, "
                              "stage, reason)")
        out.append({k: str(row.get(k, "")) for k in ("video_id", "stage", "reason")})
    return out


def _confusion(cards: list[Card], labels: dict[str, LabelSet]) -> dict[str, list[list[int]]]:
    """{kind: counts[reference][prediction]}, the last column invalid predictions (as results.json)."""
    out = {}
    for kind, label_set in labels.items():
        index = {label: i for i, label in enumerate(label_set.labels)}
        counts = [[0] * (len(index) + 1) for _ in index]
        for card in cards:
            pred = card.pred[kind]
            counts[index[card.ref[kind]]][len(index) if pred is None else index[pred]] += 1
        out[kind] = counts
    return out


def _check_agrees(results: dict, confusion: dict, eval_dir: Path) -> None:
    """The predictions are the ones results.json was scored from (their confusion matrices match)."""
    for kind, counts in confusion.items():
        if results[kind].get("confusion", counts) != counts:
            raise ReportError(f"{eval_dir}: predictions.jsonl and results.json disagree (the {kind} confusion "
                              "matrix of the predictions is not the scored one): rescore with xmei score")


def _add_other(cards: list[Card], others: list[Card]) -> None:
    by_id = {c.video_id: c for c in others}
    for card in cards:
        other = by_id.get(card.video_id)
        if other is None:
            card.notes.append("not in the compared evaluation")
            continue
        card.other = other.pred
        card.disagree = any(other.pred[k] != card.pred[k] for k in ("emotion", "intent"))


def _add_store(cards: list[Card], store_path: str | Path, media_root: Path | None, assets: Path,
               model: XMEIQwen | LQFormers | None, progress: Callable[[int, int], None] | None) -> str:
    """Each card's subtitle and captions from the store, and its images when the media can be read;
    returns the page's note on the images."""
    from stores import FeatureStore

    store = FeatureStore(store_path)
    ids = [str(v) for v in store.read_whole("video_id")]
    texts = {name: [str(v) for v in store.read_whole(name)]
             for name in ("subtitle", "video_description", "audio_description", "video_path", "audio_path")}
    where = {video_id: i for i, video_id in enumerate(ids)}
    facts = store.attrs.get("extract", {})
    if media_root is None:
        note = "no media root: no frames or audio (give --media-root)"
    else:
        note = (f"{facts.get('num_frames', 8)} sampled frames a clip, {FRAME_HEIGHT} px high; the waveform with its "
                f"{facts.get('num_audio_clips', 8)} sampled audio windows, one lane a window")
        note += ("; no model given: no attention maps (xmei report --checkpoint DIR)" if model is None else
                 f"; the attention of the {model.settings.model.query_mode}-query LQ-Formers over frames and windows")
    for done, card in enumerate(cards, start=1):
        i = where.get(card.video_id)
        if i is None:
            card.notes.append(f"not in the store {store_path}: no subtitle, captions, frames or audio")
            continue
        card.texts = {**{name: texts[name][i] for name in ("subtitle", "video_description", "audio_description")},
                      **card.texts}  # a prediction row's own subtitle first
        if media_root is not None:
            clip = store[i] if model is not None else {"video_id": card.video_id}
            paths = {name: texts[name][i] for name in ("video_path", "audio_path")}
            _add_images(card, i, paths, Path(media_root), facts, assets, model, clip)
        if progress:
            progress(done, len(cards))
    return note


def _add_images(card: Card, index: int, paths: dict[str, str], media_root: Path, facts: dict, assets: Path,
                model: XMEIQwen | LQFormers | None, clip: dict) -> None:
    """The card's frames strip, attention strip and audio strip (each a note where it cannot be drawn)."""
    from pipeline.decode import MediaError, read_audio, read_frames

    if model is not None:
        from xmei.attention import attention_maps, audio_attention
    assets.mkdir(parents=True, exist_ok=True)
    video = media_root / paths["video_path"]
    try:
        frames = read_frames(video, int(facts.get("num_frames", 8)))  # (F, H, W, 3) uint8, as stage 1 samples them
    except MediaError as err:
        card.notes.append(f"frames not shown: {err}")
    else:
        card.images["frames"] = _save(frames_strip(frames), assets / f"{index:06d}_frames.jpg")
        if model is not None and "video" in model.settings.modalities:
            try:
                maps = attention_maps(model, clip)  # {group: (F, P, P)}
            except ValueError as err:
                card.notes.append(f"attention over the frames not drawn: {err}")
            else:
                card.images["attention"] = _save(attention_strip(frames, maps), assets / f"{index:06d}_attention.jpg")
                card.attention_rows = list(maps)
    try:
        wave = read_audio(media_root / paths["audio_path"] if paths["audio_path"] else None, video)
    except MediaError as err:
        card.notes.append(f"audio not shown: {err}")
        return
    if wave is None:
        card.notes.append("no audio: the video has no audio track")
        return
    weights = None
    if model is not None and "audio" in model.settings.modalities:
        try:
            weights = audio_attention(model, clip)  # {group: (W,)}
        except ValueError as err:
            card.notes.append(f"attention over the audio windows not drawn: {err}")
    windows, seconds = int(facts.get("num_audio_clips", 8)), float(facts.get("audio_clip_seconds", 1.0))
    card.images["audio"] = _save(audio_strip(wave, windows, seconds, weights), assets / f"{index:06d}_audio.png")
    card.audio_lanes = (f"{len(wave) / SAMPLE_RATE:.1f} s; below, the {windows} sampled windows of {seconds:g} s" +
                        ("" if weights is None else ", coloured by their share of the attention (green: an even "
                         "share, red: twice it or more): " + "; ".join(
                            f"{group} " + " ".join(f"{100 * w / max(v.sum(), 1e-12):.0f}%" for w in v)
                            for group, v in weights.items())))


def frames_strip(frames: np.ndarray) -> Image.Image:
    """The frames side by side, ``FRAME_HEIGHT`` px high."""
    images = [Image.fromarray(f) for f in frames]
    images = [im.resize((max(1, round(im.width * FRAME_HEIGHT / im.height)), FRAME_HEIGHT), Image.BILINEAR)
              for im in images]
    strip = Image.new("RGB", (sum(im.width for im in images) + 2 * (len(images) - 1), FRAME_HEIGHT), "white")
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width + 2
    return strip


def attention_strip(frames: np.ndarray, maps: dict[str, np.ndarray]) -> Image.Image:
    """One row per query group: each frame's center crop (224 px, as CLIP sees it) at ``CELL`` px
    under its attention map (normalized per frame, jet, half transparent): `xmei attention`'s maps."""
    from matplotlib import colormaps

    from xmei.attention import center_crop

    crops = [Image.fromarray(center_crop(f)).resize((CELL, CELL), Image.BILINEAR) for f in frames]
    strip = Image.new("RGB", ((CELL + 2) * len(crops) - 2, (CELL + 2) * len(maps) - 2), "white")
    for r, heat in enumerate(maps.values()):  # heat: (F, P, P)
        for c, crop in enumerate(crops):
            scaled = heat[c] / max(float(heat[c].max()), 1e-12)
            colour = Image.fromarray((colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8))
            strip.paste(Image.blend(crop, colour.resize((CELL, CELL), Image.BILINEAR), 0.5),
                        (c * (CELL + 2), r * (CELL + 2)))
    return strip


def audio_strip(wave: np.ndarray, windows: int, seconds: float, weights: dict[str, np.ndarray] | None) -> Image.Image:
    """The waveform's envelope, then per query group (or once, grey, without a model) one lane per
    window over its span, as stage 1 spreads the windows (:func:`pipeline.decode.window_starts`),
    coloured by the window's share of the group's attention."""
    from matplotlib import colormaps

    from pipeline.decode import window_starts

    width, wave_height, lane = AUDIO_SIZE
    size = int(round(seconds * SAMPLE_RATE))
    starts = window_starts(len(wave), windows, size)
    span = max(len(wave), int(starts[-1]) + size)  # samples the strip covers
    groups = list(weights.values()) if weights else [None]
    height = wave_height + len(groups) * (windows * lane + 4)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    edges = np.linspace(0, span, width + 1).astype(np.int64)
    peak = max(float(np.abs(wave).max()), 1e-6)
    for x in range(width):  # the envelope: each pixel column's lowest and highest sample
        part = wave[edges[x]:max(edges[x + 1], edges[x] + 1)]
        if len(part):
            top, bottom = (wave_height / 2 * (1 - v / peak) for v in (part.max(), part.min()))
            draw.line([(x, top), (x, bottom)], fill=(90, 90, 90))
    for g, share in enumerate(groups):
        y = wave_height + 4 + g * (windows * lane + 4)
        for w, start in enumerate(starts):  # colour: the uniform share 1 / W mid-scale (green), twice it red
            colour = (170, 170, 170) if share is None else \
                tuple(int(255 * v) for v in colormaps["jet"](min(1.0, float(share[w] / share.sum()) * windows / 2))[:3])
            left, right = start * width / span, (start + size) * width / span
            draw.rectangle([left, y + w * lane, max(left + 1, right - 1), y + (w + 1) * lane - 2], fill=colour)
    return image


def _save(image: Image.Image, path: Path) -> dict[str, Any]:
    """Write ``image`` (JPEG or PNG by its suffix); its path relative to the page and its size."""
    image.save(path, **({"quality": 80} if path.suffix == ".jpg" else {"optimize": True}))
    return {"src": f"{ASSETS}/{path.name}", "width": image.width, "height": image.height}


def _counts(cards: list[Card]) -> dict[str, int]:
    counts = {key: sum(c.outcome == key for c in cards) for key in OUTCOMES}
    return {**counts, "invalid": sum(c.invalid for c in cards), "disagree": sum(c.disagree for c in cards),
            "cut_off": sum(c.cut_off for c in cards), "all": len(cards)}


def _name(results: dict, folder: Path) -> str:
    return f"{results.get('model', 'predictions')} ({folder.name})"


def _render(results_path: Path, **context: Any) -> str:
    """The page from ``templates/report.html.j2``, autoescaped; a field of results.json (or
    predict.json: ``results_path``) the page needs and lacks is an error naming the file."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, UndefinedError

    env = Environment(loader=PackageLoader("xmei", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    try:
        return env.get_template("report.html.j2").render(**context)
    except UndefinedError as err:
        raise ReportError(f"{results_path} lacks a field the report shows ({err.message}): damaged?") from None
