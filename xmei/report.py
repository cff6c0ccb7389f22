"""`xmei report` (and `xmei eval --html`): one browsable page of an evaluation.

Reads an evaluation folder (``results.json`` and ``predictions.jsonl`` of `xmei eval`, or of
`xmei score`, whose results name the predictions file) and writes beside them::

    EVAL_DIR/report.html         the page: metric tables, both confusion matrices, one card a clip
    EVAL_DIR/report_files/       the sampled frames as ~96 px JPEGs (only with a store and media root)

The page needs no server and no network: its script and style are inline, its images beside it
(relative links). Filtering and sorting happen in the browser over data attributes of the cards:
``data-outcome`` (correct / emotion / intent / both: which of the two labels are wrong, an invalid
label counting as wrong), ``data-invalid`` (1: the answer named no label for emotion or intent),
``data-ref-emotion`` ... ``data-pred-intent`` (``invalid`` for an invalid prediction),
``data-score`` (the clip's ROUGE-L, below) and, with ``--compare``, ``data-disagree``.

The clip's own explanation score is pycocoevalcap's ROUGE-L (F with beta 1.2) of its parsed
explanation (empty when invalid) against its reference, on the simple tokenization
(:func:`xmei.text_metrics.simple_tokenize`): the corpus ROUGE-L is the mean of these per-clip
scores, but on PTB tokens where Java runs, so the two can differ slightly.

The HTML comes from ``templates/report.html.j2`` with autoescaping: a clip's texts show as text.
Attention maps and audio waveforms are not drawn on the page yet (`xmei attention` draws them).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmei.classification import INVALID
from xmei.errors import UserError, read_text
from xmei.evaluate import PUBLISHED_ORDER, TITLES, read_predictions
from xmei.labels import DEFAULT_SYNONYMS, LabelSet

__all__ = ["ASSETS", "PAGE", "ReportError", "build_report", "clip_rouge_l"]

PAGE = "report.html"
ASSETS = "report_files"  # thumbnails, linked relative to the page
THUMB_SIZE = (128, 96)  # the largest a thumbnail may be (width, height); aspect kept
OUTCOMES = {"correct": "correct", "emotion": "emotion wrong (intent right)", "intent": "intent wrong (emotion right)",
            "both": "both wrong"}
NOT_DRAWN = ("The visual LQ-Former's attention over the frames and the audio waveform with its sampled windows are "
             "not drawn on this page yet; `xmei attention --clip ID` draws them as PNGs.")


class ReportError(UserError, ValueError):
    """An evaluation folder the report cannot be made from; the message names the file."""


@dataclass
class Card:
    """One test clip on the page."""

    video_id: str
    ref: dict[str, str]  # {"emotion": ..., "intent": ..., "explanation": ...}
    pred: dict[str, str | None]  # labels canonical, None: invalid
    outcome: str  # a key of OUTCOMES
    invalid: bool
    cut_off: bool
    score: float  # clip_rouge_l
    texts: dict[str, str] = field(default_factory=dict)  # subtitle, video / audio description (from a store)
    thumbs: list[str] = field(default_factory=list)  # paths relative to the page
    notes: list[str] = field(default_factory=list)
    other: dict[str, str | None] | None = None  # the compared evaluation's labels and explanation
    disagree: bool = False


def clip_rouge_l(candidate: str, reference: str) -> float:
    """pycocoevalcap's ROUGE-L of one clip (F, beta 1.2) on simple-tokenized text."""
    from pycocoevalcap.rouge.rouge import Rouge

    from xmei.text_metrics import simple_tokenize

    return float(Rouge().calc_score([simple_tokenize(candidate)], [simple_tokenize(reference)]))


def build_report(eval_dir: Path, store: Path | None = None, media_root: Path | None = None,
                 compare: Path | None = None, synonyms: dict[str, dict[str, str]] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``EVAL_DIR/report.html`` (and, with ``store`` and ``media_root``, its thumbnails in
    ``EVAL_DIR/report_files/``); returns the page's path. ``compare``: another evaluation folder of
    the same clips, whose labels each card shows beside these. ``synonyms``: {"emotion": {variant:
    label}, "intent": ...} for predictions files holding label variants (default: the built-in
    table). Label order is the one the evaluation was scored with (its results.json)."""
    eval_dir = Path(eval_dir)
    results, rows, labels = _evaluation(eval_dir, synonyms)
    cards = [_card(row, labels) for row in rows]
    confusion = _confusion(cards, labels)
    _check_agrees(results, confusion, eval_dir)
    other = None
    if compare is not None:
        other_results, other_rows, other_labels = _evaluation(Path(compare), synonyms)
        if {k: v.labels for k, v in other_labels.items()} != {k: v.labels for k, v in labels.items()}:
            raise ReportError(f"--compare {compare} was scored with other label sets than {eval_dir}")
        _add_other(cards, [_card(r, other_labels) for r in other_rows])
        other = {"name": _name(other_results, Path(compare)), "results": other_results,
                 "only_here": sum(c.other is None for c in cards),
                 "only_there": len({r["video_id"] for r in other_rows} - {c.video_id for c in cards})}
    assets = eval_dir / ASSETS
    if assets.is_dir():
        shutil.rmtree(assets)  # thumbnails of an earlier page: this page writes its own
    frames_note = _add_store(cards, Path(store), media_root, assets, progress) if store is not None else \
        "no store given: no subtitles, captions or frames (xmei report EVAL_DIR --store STORE)"
    html = _render(eval_dir / "results.json", name=_name(results, eval_dir), results=results,
                   labels={k: list(v.labels) for k, v in labels.items()}, cards=cards, confusion=confusion,
                   other=other, frames_note=frames_note, not_drawn=NOT_DRAWN,
                   outcomes=OUTCOMES, invalid=INVALID, titles=TITLES, metric_order=PUBLISHED_ORDER,
                   counts=_counts(cards))
    page = eval_dir / PAGE
    partial = eval_dir / f".{PAGE}.partial-{os.getpid()}"
    partial.write_text(html, encoding="utf-8")
    os.replace(partial, page)  # a kill never leaves half a page
    return page


def _evaluation(folder: Path, synonyms) -> tuple[dict, list[dict], dict[str, LabelSet]]:
    """results.json, the rows of its predictions file, and the label sets it was scored with."""
    results_path = folder / "results.json"
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder (an evaluation folder of xmei eval or xmei score)")
    if not results_path.is_file():
        raise ReportError(f"{results_path} does not exist: {folder} is not an evaluation folder (xmei eval --out "
                          "or xmei score --out writes it)")
    try:
        results = json.loads(read_text(results_path, "results file", ReportError))
    except json.JSONDecodeError as err:
        raise ReportError(f"{results_path} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") \
            from None
    results = results if isinstance(results, dict) else {}
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
    return results, read_predictions(predictions, labels["emotion"], labels["intent"]), labels


def _card(row: dict, labels: dict[str, LabelSet]) -> Card:
    ref = {kind: labels[kind].normalize(row[f"ref_{kind}"]) for kind in labels}
    pred = {kind: labels[kind].normalize(row[kind]) if row[kind] else None for kind in labels}
    wrong = {kind: pred[kind] != ref[kind] for kind in labels}  # None (invalid) is wrong
    outcome = "both" if all(wrong.values()) else "emotion" if wrong["emotion"] else \
        "intent" if wrong["intent"] else "correct"
    explanation = row["explanation"]
    return Card(video_id=row["video_id"], ref={**ref, "explanation": row["ref_explanation"]},
                pred={**pred, "explanation": explanation}, outcome=outcome,
                invalid=pred["emotion"] is None or pred["intent"] is None, cut_off=bool(row.get("cut_off")),
                score=clip_rouge_l(explanation or "", row["ref_explanation"]))


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


def _add_store(cards: list[Card], store_path: Path, media_root: Path | None, assets: Path,
               progress: Callable[[int, int], None] | None) -> str:
    """Each card's subtitle and captions from the store, and its sampled frames as thumbnails when
    the media can be read; returns the page's note on the frames."""
    from stores import FeatureStore

    store = FeatureStore(store_path)
    ids = [str(v) for v in store.read_whole("video_id")]
    texts = {name: [str(v) for v in store.read_whole(name)]
             for name in ("subtitle", "video_description", "audio_description", "video_path")}
    where = {video_id: i for i, video_id in enumerate(ids)}
    frames = int(store.attrs.get("extract", {}).get("num_frames", 8))
    note = (f"{frames} sampled frames a clip, downscaled to at most {THUMB_SIZE[0]}x{THUMB_SIZE[1]} px"
            if media_root is not None else "no media root: no frames (give --media-root)")
    for done, card in enumerate(cards, start=1):
        i = where.get(card.video_id)
        if i is None:
            card.notes.append(f"not in the store {store_path}: no subtitle, captions or frames")
            continue
        card.texts = {name: texts[name][i] for name in ("subtitle", "video_description", "audio_description")}
        if media_root is not None:
            card.thumbs, problem = _thumbnails(Path(media_root) / texts["video_path"][i], frames, i, assets)
            if problem:
                card.notes.append(problem)
        if progress:
            progress(done, len(cards))
    return note


def _thumbnails(video: Path, n: int, index: int, assets: Path) -> tuple[list[str], str | None]:
    """The clip's ``n`` sampled frames (as stage 1 samples them) as JPEGs ``report_files/<index>_<k>.jpg``;
    no frames and a note when the video cannot be read."""
    from PIL import Image

    from pipeline.decode import MediaError, read_frames

    try:
        frames = read_frames(video, n)  # (n, H, W, 3) uint8
    except MediaError as err:
        return [], f"frames not shown: {err}"
    assets.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, frame in enumerate(frames):
        image = Image.fromarray(frame)
        image.thumbnail(THUMB_SIZE)
        name = f"{index:06d}_{k}.jpg"
        image.save(assets / name, quality=80)
        paths.append(f"{ASSETS}/{name}")
    return paths, None


def _counts(cards: list[Card]) -> dict[str, int]:
    counts = {key: sum(c.outcome == key for c in cards) for key in OUTCOMES}
    return {**counts, "invalid": sum(c.invalid for c in cards), "disagree": sum(c.disagree for c in cards),
            "all": len(cards)}


def _name(results: dict, folder: Path) -> str:
    return f"{results.get('model', 'predictions')} ({folder.name})"


def _render(results_path: Path, **context: Any) -> str:
    """The page from ``templates/report.html.j2``, autoescaped; a field of results.json the page
    needs and lacks is an error naming the file."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, UndefinedError

    env = Environment(loader=PackageLoader("xmei", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    try:
        return env.get_template("report.html.j2").render(**context)
    except UndefinedError as err:
        raise ReportError(f"{results_path} lacks a field the report shows ({err.message}): damaged?") from None
