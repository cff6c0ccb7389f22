"""Scoring predictions: classification of emotion and intent, the six explanation metrics, and
the report. `xmei eval` generates then scores; `xmei score` scores an existing predictions file
(a baseline's, say) with the very same function, so both give the same numbers.

predictions.jsonl, one JSON a line: video_id, text (raw), cut_off (true: generation reached
max_new_tokens before the end-of-turn token; absent from older files and baselines), emotion,
intent, explanation (parsed; emotion / intent null when the answer could not be parsed),
ref_emotion, ref_intent, ref_explanation; and, from `xmei eval --compare-free`, free: the same
clip's freely decoded answer {text, cut_off, emotion, intent, explanation} beside a constrained one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xmei.classification import classification_report, joint_report, plot_confusion
from xmei.text_metrics import explanation_metrics

__all__ = ["read_predictions", "score", "write_predictions", "write_report"]

REQUIRED = ("video_id", "emotion", "intent", "explanation", "ref_emotion", "ref_intent", "ref_explanation")
TITLES = {"bleu4": "BLEU-4", "rouge_l": "ROUGE-L", "meteor": "METEOR", "bertscore": "BERTScore", "bleurt": "BLEURT",
          "cider_d": "CIDEr-D"}
DECODING = {True: "emotion and intent constrained to the labels", False: "decoded freely"}  # results["constrained"]
PUBLISHED_ORDER = ("bleu4", "rouge_l", "meteor", "bertscore", "bleurt", "cider_d")  # the paper's table


def write_predictions(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_predictions(path: Path) -> list[dict]:
    """Rows of a predictions file; a missing field is an error naming the line and field."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {lineno} is not valid JSON: {err.msg}") from None
        missing = [f for f in REQUIRED if f not in row]
        if missing:
            raise ValueError(f"{path}: line {lineno} ({row.get('video_id')!r}) lacks {missing}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no predictions")
    return rows


def score(rows: list[dict], emotions, intents, eval_cfg) -> dict[str, Any]:
    """Every classification and explanation metric of ``rows`` (and how many answers were cut off,
    when the rows say); with rows that carry a ``free`` answer, ``free_decoding``: its cut-offs and
    classification scores on the same clips."""
    results: dict[str, Any] = {"count": len(rows), **_classification(rows, emotions, intents)}
    results["explanation"] = explanation_metrics([r["ref_explanation"] for r in rows],
                                                 [r["explanation"] or "" for r in rows], eval_cfg)
    if any("free" in r for r in rows):
        lacking = [r["video_id"] for r in rows if "free" not in r]
        if lacking:
            raise ValueError(f"{len(lacking)} rows have no free answer (first: {lacking[0]!r}) where others have")
        free = [{**r, **r["free"]} for r in rows]  # the free answer in the places of the constrained one
        results["free_decoding"] = _classification(free, emotions, intents)
    return results


def _classification(rows: list[dict], emotions, intents) -> dict[str, Any]:
    """cut_off (when the rows say), emotion, intent and joint scores of the rows' answers."""
    results: dict[str, Any] = {}
    if any("cut_off" in r for r in rows):
        results["cut_off"] = sum(bool(r.get("cut_off")) for r in rows)
    correct = {}
    for kind, labels in (("emotion", emotions), ("intent", intents)):
        refs = [labels.normalize(r[f"ref_{kind}"]) or r[f"ref_{kind}"] for r in rows]
        preds = [labels.normalize(r[kind]) if r[kind] else None for r in rows]
        results[kind] = classification_report(refs, preds, labels.labels)
        correct[kind] = [p == t for p, t in zip(preds, refs)]
    results["joint"] = joint_report(results["emotion"], results["intent"], correct["emotion"], correct["intent"])
    return results


def write_report(results: dict[str, Any], out: Path, emotions, intents, title: str) -> Path:
    """results.json, confusion-matrix PNGs and report.md (tables laid out like the published ones)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for kind, labels in (("emotion", emotions), ("intent", intents)):
        plot_confusion(results[kind], labels.labels, out / f"confusion_{kind}.png", f"{title}: {kind}")
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


def _cell(metric: dict) -> str:
    return f"{metric['value']:.4f}" if "value" in metric else "unavailable"
