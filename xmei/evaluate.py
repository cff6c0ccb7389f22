"""Scoring predictions: classification of emotion and intent, the six explanation metrics, and
the report. `xmei eval` generates then scores; `xmei score` scores an existing predictions file
(a baseline's, say) with the very same function, so both give the same numbers.

predictions.jsonl, one JSON a line: video_id, text (raw), cut_off (true: generation reached
max_new_tokens before the end-of-turn token; absent from older files and baselines), emotion,
intent, explanation (parsed; emotion / intent null when the answer could not be parsed),
ref_emotion, ref_intent, ref_explanation; emotion_probs, intent_probs: the answer's label
probabilities ({label: probability} over the config's labels, xmei.probabilities; optional, as
baselines have none); and, from `xmei eval --compare-free`, free: the same clip's freely decoded
answer {text, cut_off, emotion, intent, explanation, emotion_probs, intent_probs} beside a
constrained one.

Reading one (`xmei score`): a missing *answer* field (emotion, intent, explanation; null in
`eval`'s files) is an invalid answer; a missing or unknown *reference*, a field of the wrong
type, a line that is not a JSON object, a repeated video_id and an empty file are errors naming
the file and line; so is a probability field that is not an object over exactly the config's
labels with numbers in [0, 1] summing to 1 (within ``SUM_TOLERANCE``).

When every row carries probabilities, each kind's scores gain ``calibration``: top-2 accuracy,
the expected calibration error and its bins (:func:`xmei.classification.calibration`), drawn as
reliability_{kind}.png; otherwise ``calibration`` is {"unavailable": why}, and report.md says so.

Beside results.json, clip_scores.jsonl holds each clip's own explanation scores, one JSON a line:
video_id and the metrics that were available (:mod:`xmei.text_metrics`); `xmei report` shows them.

Outputs are written into ``OUT/.outputs.partial-<pid>`` and renamed into ``OUT`` together once
all are written (:func:`staged`), so a kill leaves the earlier evaluation's files in ``OUT`` whole
and unchanged, never half a file next to a whole one; the next run removes the dead partial folder.
A full disk ends the command with a DiskFullError naming the filesystem, ``OUT`` as it was, and
the partial folder emptied but for the predictions when they were written whole.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stores import OK
from stores.store import PARTIAL, remove_dead_partials  # the stores' partial folders: one convention
from xmei.classification import BINS, calibration, classification_report, joint_report, plot_confusion, plot_reliability
from xmei.errors import JSON_TYPES, DiskFullError, UserError, json_lines, json_type, write_whole, writing
from xmei.text_metrics import explanation_metrics

__all__ = ["CLIP_SCORES", "EvaluationError", "check_out", "check_probabilities", "check_references", "read_predictions", "score", "score_file",
           "staged", "write_evaluation", "write_predictions", "write_report"]

REFERENCES = ("video_id", "ref_emotion", "ref_intent", "ref_explanation")  # missing: an error
ANSWERS = ("emotion", "intent", "explanation")  # missing: an invalid answer (null)
PROBABILITIES = ("emotion_probs", "intent_probs")  # optional: {label: probability}
SUM_TOLERANCE = 1e-3  # how far from 1 a file's label probabilities may sum
NO_PROBABILITIES = "the predictions carry no label probabilities"
CLIP_SCORES = "clip_scores.jsonl"  # beside results.json: {"video_id", "bleu4", ..., "bleurt"} a clip
STAGING = ".outputs"  # OUT/.outputs.partial-<pid>: the outputs process <pid> is writing
TITLES = {"bleu4": "BLEU-4", "rouge_l": "ROUGE-L", "meteor": "METEOR", "bertscore": "BERTScore", "bleurt": "BLEURT",
          "cider_d": "CIDEr-D"}
DECODING = {True: "emotion and intent constrained to the labels", False: "decoded freely"}  # results["constrained"]
PUBLISHED_ORDER = ("bleu4", "rouge_l", "meteor", "bertscore", "bleurt", "cider_d")  # the paper's table


class EvaluationError(UserError, ValueError):
    """A predictions file, output folder or store that evaluation cannot use; the message names
    it and, where there is one, the line and field."""


def write_predictions(rows: list[dict], path: Path) -> None:
    """The predictions file, whole or not at all (:func:`xmei.errors.write_whole`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "the predictions")


def read_predictions(path: Path, emotions, intents) -> list[dict]:
    """The rows of a predictions file, each answer field present (null where it was missing).
    Raises :class:`EvaluationError` naming the file, line and field of what cannot be scored
    (a reference must be a label or synonym of ``emotions`` / ``intents``)."""
    path = Path(path)
    rows, lines, seen = [], [], {}  # seen: video_id -> line
    for lineno, row in json_lines(path, "the predictions file", EvaluationError):
        where = f"{path}: line {lineno}"
        if not isinstance(row, dict):
            raise EvaluationError(f"{where} is a JSON {json_type(row)}, expected an object with {list(REFERENCES)} "
                                  f"and {list(ANSWERS)}")
        row = _checked_row(row, f"{where} ({row.get('video_id')!r})", emotions, intents)
        if row["video_id"] in seen:
            raise EvaluationError(f"{where} repeats video_id {row['video_id']!r} of line {seen[row['video_id']]}")
        seen[row["video_id"]] = lineno
        rows.append(row)
        lines.append(lineno)
    if not rows:
        raise EvaluationError(f"{path} holds no predictions (an empty file)")
    lacking = [lineno for row, lineno in zip(rows, lines) if "free" not in row]
    if lacking and len(lacking) < len(rows):
        raise EvaluationError(f"{path}: line {lacking[0]} has no free answer where other lines have one")
    return rows


def _checked_row(row: dict, where: str, emotions, intents) -> dict:
    """``row`` with each answer field present; an error for a missing reference or a wrong type."""
    missing = [f for f in REFERENCES if f not in row]
    if missing:
        raise EvaluationError(f"{where} lacks {missing}: a reference is needed to score the answer")
    _expect(row, where, "video_id", str)
    _expect(row, where, "ref_explanation", str)
    for field, labels in (("ref_emotion", emotions), ("ref_intent", intents)):
        _expect(row, where, field, str)
        if labels.normalize(row[field]) is None:
            raise EvaluationError(f"{where}: {field} {row[field]!r} is none of the config's {labels.kind} labels "
                                  f"{list(labels.labels)} (nor their synonyms)")
    row = {**row, **_answers(row, where, emotions, intents)}
    if "free" in row:
        if not isinstance(row["free"], dict):
            raise EvaluationError(f"{where}: free is a JSON {json_type(row['free'])}, expected an object")
        row["free"] = {**row["free"], **_answers(row["free"], f"{where} free", emotions, intents)}
    return row


def _answers(row: dict, where: str, emotions, intents) -> dict:
    """The answer fields of ``row``, None where missing (an invalid answer), and its probability
    fields where present (in label order); a wrong type is an error."""
    for field in ANSWERS:
        if row.get(field) is not None:
            _expect(row, where, field, str)
    _expect(row, where, "text", str)
    _expect(row, where, "cut_off", bool)
    probs = {field: check_probabilities(row[field], where, field, labels)
             for field, labels in zip(PROBABILITIES, (emotions, intents)) if field in row}
    return {**{field: row.get(field) for field in ANSWERS}, **probs}


def check_probabilities(value, where: str, field: str, labels,
                        error: type[UserError] = EvaluationError) -> dict[str, float]:
    """A probability field (of a row at ``where``): an object over exactly ``labels``' labels,
    numbers in [0, 1] summing to 1 within SUM_TOLERANCE; returned in label order. Else an
    ``error`` naming ``where`` and ``field`` (the report raises its own class)."""
    if not isinstance(value, dict):
        raise error(f"{where}: {field} is a JSON {json_type(value)}, expected an object "
                              f"{{label: probability}} over {list(labels.labels)}")
    if sorted(value) != sorted(labels.labels):
        missing, extra = sorted(set(labels.labels) - set(value)), sorted(set(value) - set(labels.labels))
        raise error(f"{where}: {field} must hold exactly the config's {labels.kind} labels "
                              f"{list(labels.labels)}" + (f"; missing {missing}" if missing else "")
                              + (f"; not labels {extra}" if extra else ""))
    for label, p in value.items():
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise error(f"{where}: {field}[{label!r}] is {json.dumps(p)}, expected a number in [0, 1]")
    total = sum(value.values())
    if abs(total - 1) > SUM_TOLERANCE:
        raise error(f"{where}: {field} sums to {total:.6g}, expected 1 (within {SUM_TOLERANCE})")
    return {label: float(value[label]) for label in labels.labels}


def _expect(row: dict, where: str, field: str, kind: type) -> None:
    """A field that is present has the JSON type of ``kind``."""
    if field in row and not isinstance(row[field], kind):
        raise EvaluationError(f"{where}: {field} is a JSON {json_type(row[field])}, expected a {JSON_TYPES[kind]}")


def check_out(out: Path) -> None:
    """``out`` can be (or become) the folder of the outputs: not a file, nor under one."""
    out = Path(out)
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise EvaluationError(f"--out {out}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK):
                raise EvaluationError(f"--out {out}: {folder} is not writable")
            return


def check_references(store) -> None:
    """Every ok clip of ``store`` (a FeatureStore) has its reference labels: an EvaluationError
    naming the store and its clips without them otherwise (an unlabeled split is predicted, not scored)."""
    ok = store.status() == OK
    lacking = np.flatnonzero(ok & ((store.read_whole("emotion_label") < 0) | (store.read_whole("intent_label") < 0)))
    if len(lacking):
        ids = store.read_whole("video_id")
        raise EvaluationError(f"{store.path}: {len(lacking)} of its {int(ok.sum())} ok clips have no reference labels "
                              f"(first: {str(ids[lacking[0]])!r}), and xmei eval scores answers against them; to "
                              f"predict an unlabeled store use `xmei predict --store {store.path} --checkpoint CK "
                              "--out DIR`")


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A folder to write the outputs into: ``OUT/.outputs.partial-<pid>``. On leaving without an
    error its files are renamed into ``OUT``, each replacing its earlier version whole (same
    folder: atomic), and it is removed. On an error ``OUT`` is left as it was and the partial
    folder kept (predictions written before scoring failed are not lost; the error's note names
    it) until the next run into ``OUT`` removes it, as it removes those of killed runs. A full
    disk is a DiskFullError (:func:`xmei.errors.writing`) after :func:`_emptied` the partial folder."""
    out = Path(out)
    check_out(out)
    partial = out / f"{STAGING}{PARTIAL}{os.getpid()}"
    try:
        with writing(partial, f"the outputs of this evaluation, renamed into {out} once all are written"):
            out.mkdir(parents=True, exist_ok=True)
            remove_dead_partials(out / STAGING)
            partial.mkdir()
            yield partial
    except DiskFullError as err:
        raise DiskFullError(f"{err}; {_emptied(partial, out)}") from err
    except BaseException as err:
        err.add_note(f"the outputs written so far are in {partial}")
        raise
    for file in sorted(partial.iterdir(), key=lambda f: f.name == "results.json"):  # results.json last
        os.replace(file, out / file.name)
    partial.rmdir()


def _emptied(partial: Path, out: Path) -> str:
    """After a full disk: every file of the ``partial`` folder removed but the predictions (whole
    whenever they are there, see :func:`write_predictions`); the folder too when they are not.
    Says what is kept."""
    kept = partial / "predictions.jsonl"
    for file in partial.iterdir() if partial.is_dir() else ():
        if file != kept:
            file.unlink()
    if kept.is_file():
        return (f"the outputs in {out} are as they were; this run's predictions are whole in {kept}: move them "
                f"elsewhere (the next evaluation into {out} removes that folder) and score them with xmei score "
                "once there is space")
    if partial.is_dir():
        partial.rmdir()
    return f"the outputs in {out} are as they were, and nothing of this run is kept"


def score(rows: list[dict], emotions, intents, eval_cfg) -> dict[str, Any]:
    """Every classification and explanation metric of ``rows`` (and how many answers were cut off,
    when the rows say); with rows that carry a ``free`` answer, ``free_decoding``: its cut-offs and
    classification scores on the same clips. ``clip_scores``: each clip's own explanation scores,
    {"video_id", metric: value ...} per row (the available metrics), which :func:`write_report`
    writes to clip_scores.jsonl rather than results.json."""
    results: dict[str, Any] = {"count": len(rows), **_classification(rows, emotions, intents)}
    metrics = explanation_metrics([r["ref_explanation"] for r in rows], [r["explanation"] or "" for r in rows],
                                  eval_cfg)
    results["explanation"] = {name: {k: v for k, v in m.items() if k != "per_clip"} for name, m in metrics.items()}
    per_clip = {name: m["per_clip"] for name, m in metrics.items() if "per_clip" in m}
    results["clip_scores"] = [{"video_id": r["video_id"], **{name: v[i] for name, v in per_clip.items()}}
                              for i, r in enumerate(rows)]
    if any("free" in r for r in rows):
        lacking = [r["video_id"] for r in rows if "free" not in r]
        if lacking:
            raise ValueError(f"{len(lacking)} rows have no free answer (first: {lacking[0]!r}) where others have")
        # the free answer in the places of the constrained one (its probabilities too, or none)
        free = [{**{k: v for k, v in r.items() if k not in PROBABILITIES}, **r["free"]} for r in rows]
        results["free_decoding"] = _classification(free, emotions, intents)
    return results


def write_evaluation(rows: list[dict], out: Path, emotions, intents, eval_cfg, title: str,
                     facts: dict[str, Any]) -> dict[str, Any]:
    """`xmei eval`'s outputs of generated ``rows``: predictions.jsonl, then their scores (with
    ``facts`` added: rate, checkpoint, store, generation ...) as results.json, clip_scores.jsonl,
    report.md and the PNGs, renamed into ``out`` together (:func:`staged`). Returns the results."""
    with staged(out) as partial:  # a kill leaves the earlier evaluation's files whole
        write_predictions(rows, partial / "predictions.jsonl")
        results = score(rows, emotions, intents, eval_cfg)
        results.update(facts)
        write_report(results, partial, emotions, intents, title)
    return results


def score_file(predictions: Path, out: Path, emotions, intents, eval_cfg, name: str) -> dict[str, Any]:
    """`xmei score`: the scores of a predictions file (``name``: the model in the report's tables)
    as results.json, clip_scores.jsonl, report.md and the PNGs in ``out``. ``out`` is checked and the file read and
    scored before anything is written. Returns the results."""
    check_out(out)
    rows = read_predictions(predictions, emotions, intents)  # an error names the file and line
    results = score(rows, emotions, intents, eval_cfg)
    results.update({"predictions": str(predictions), "model": name})
    with staged(out) as partial:
        write_report(results, partial, emotions, intents, f"xmei score: {Path(predictions).name}")
    return results


def _classification(rows: list[dict], emotions, intents) -> dict[str, Any]:
    """cut_off (when the rows say), emotion, intent and joint scores of the rows' answers."""
    results: dict[str, Any] = {}
    if any("cut_off" in r for r in rows):
        results["cut_off"] = sum(bool(r.get("cut_off")) for r in rows)
    correct = {}
    for kind, labels in (("emotion", emotions), ("intent", intents)):
        refs = [labels.normalize(r[f"ref_{kind}"]) or r[f"ref_{kind}"] for r in rows]
        unknown = [(r["video_id"], ref) for r, ref in zip(rows, refs) if ref not in labels.labels]
        if unknown:
            raise EvaluationError(f"{len(unknown)} references are not {kind} labels of the config "
                                  f"{list(labels.labels)} (first: clip {unknown[0][0]!r}, {unknown[0][1]!r})")
        preds = [labels.normalize(r[kind]) if r[kind] else None for r in rows]
        results[kind] = classification_report(refs, preds, labels.labels)
        results[kind]["calibration"] = _calibration(rows, refs, kind, labels)
        correct[kind] = [p == t for p, t in zip(preds, refs)]
    results["joint"] = joint_report(results["emotion"], results["intent"], correct["emotion"], correct["intent"])
    return results


def _calibration(rows: list[dict], refs: list[str], kind: str, labels) -> dict[str, Any]:
    """Top-2 accuracy, ECE and bins of the rows' ``{kind}_probs``; unavailable unless every row has them."""
    lacking = sum(r.get(f"{kind}_probs") is None for r in rows)
    if lacking:
        return {"unavailable": NO_PROBABILITIES if lacking == len(rows) else
                f"{lacking} of {len(rows)} predictions carry no label probabilities"}
    return calibration(refs, [r[f"{kind}_probs"] for r in rows], labels.labels)


def write_report(results: dict[str, Any], out: Path, emotions, intents, title: str) -> Path:
    """results.json, confusion-matrix PNGs and report.md (tables laid out like the published ones),
    and clip_scores.jsonl: each clip's explanation scores (``results["clip_scores"]``, of :func:`score`)."""
    out.mkdir(parents=True, exist_ok=True)
    if "clip_scores" in results:
        (out / CLIP_SCORES).write_text("".join(json.dumps(c) + "\n" for c in results["clip_scores"]))
    (out / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "clip_scores"}, indent=1)
                                      + "\n")
    for kind, labels in (("emotion", emotions), ("intent", intents)):
        plot_confusion(results[kind], labels.labels, out / f"confusion_{kind}.png", f"{title}: {kind}")
        if "unavailable" not in results[kind]["calibration"]:
            plot_reliability(results[kind]["calibration"], out / f"reliability_{kind}.png", f"{title}: {kind}")
    lines = [f"# {title}", "", f"{results['count']} clips" +
             (f", {results['clips_per_s']:.2f} clips/s" if "clips_per_s" in results else "") +
             (f", {results['cut_off']} answers cut off at max_new_tokens" if "cut_off" in results else "") +
             (f", {DECODING[results['constrained']]}" if "constrained" in results else ""), "",
             "## Explanation", "", "| Model | " + " | ".join(TITLES[m] for m in PUBLISHED_ORDER) + " |",
             "|---" * (len(PUBLISHED_ORDER) + 1) + "|",
             f"| {results.get('model', 'this run')} | " + " | ".join(_cell(results["explanation"][m])
                                                                  for m in PUBLISHED_ORDER) + " |", ""]
    unavailable = {m: v["unavailable"] for m, v in results["explanation"].items() if "unavailable" in v}
    lines += [f"- {TITLES[m]} unavailable: {reason}" for m, reason in unavailable.items()]
    lines += ["", "## Classification", "", "| | Accuracy | Weighted F1 | Macro F1 | UAR | invalid |",
              "|---|---|---|---|---|---|"]
    free = results.get("free_decoding")
    for name, scores in (("", results), (" (free decoding)", free or {})):
        for kind in ("emotion", "intent") if scores else ():
            r = scores[kind]
            lines.append(f"| {kind}{name} | {r['accuracy']:.4f} | {r['weighted_f1']:.4f} | {r['macro_f1']:.4f} | "
                         f"{r['uar']:.4f} | {r['invalid']} |")
    joint = results["joint"]
    lines += ["", f"Joint: both correct {joint['both_correct']:.4f}, harmonic mean of the weighted F1s "
              f"{joint['hm_weighted_f1']:.4f}.", ""]
    lines += _calibration_lines(results)
    if free:
        lines += [f"Free decoding: the same checkpoint on the same clips without the label constraint (both correct "
                  f"{free['joint']['both_correct']:.4f}" +
                  (f", {free['cut_off']} answers cut off" if "cut_off" in free else "") + ").", ""]
    for kind, labels in (("emotion", emotions), ("intent", intents)):
        lines += [f"### {kind} per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for label, c in results[kind]["per_class"].items():
            lines.append(f"| {label} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
        lines += ["", f"![{kind} confusion matrix](confusion_{kind}.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def _calibration_lines(results: dict[str, Any]) -> list[str]:
    """report.md's section on the label probabilities: top-2 accuracy, ECE and the reliability diagrams."""
    lines = ["## Label probabilities", ""]
    calibrations = {kind: results[kind]["calibration"] for kind in ("emotion", "intent")}
    if all("unavailable" in c for c in calibrations.values()):
        return lines + [f"Top-2 accuracy and ECE unavailable: {calibrations['emotion']['unavailable']}.", ""]
    lines += ["| | Top-2 accuracy | ECE |", "|---|---|---|"]
    for kind, c in calibrations.items():
        lines.append(f"| {kind} | {c['top2_accuracy']:.4f} | {c['ece']:.4f} |" if "unavailable" not in c else
                     f"| {kind} | unavailable: {c['unavailable']} | unavailable |")
    lines += ["", f"ECE: the expected calibration error of the top label's probability over {BINS} equal-width "
              "confidence bins, each weighted by its share of the clips.", ""]
    lines += [f"![{kind} reliability diagram](reliability_{kind}.png)" for kind, c in calibrations.items()
              if "unavailable" not in c]
    return lines + [""]


def _cell(metric: dict) -> str:
    return f"{metric['value']:.4f}" if "value" in metric else "unavailable"
