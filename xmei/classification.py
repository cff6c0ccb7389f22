"""Classification metrics for the parsed emotion / intent, on scikit-learn.

Invalid predictions (None: the answer named no known label) count as wrong. Every score is
scikit-learn's with ``labels=labels, zero_division=0``, an invalid prediction being an extra
class name outside ``labels``: it lowers accuracy and the recall of its reference class, but is
not a class of its own in the averages. The macro averages (``macro_f1``, ``uar``) include every
label given, so a label with no reference sample contributes 0.

Where the predictions carry label probabilities (xmei.probabilities), :func:`calibration` scores
the distributions themselves: top-2 accuracy and the expected calibration error, whose bins
:func:`plot_reliability` draws.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

__all__ = ["BINS", "INVALID", "calibration", "classification_report", "correct", "joint_report", "plot_confusion",
           "plot_reliability"]

INVALID = "invalid"  # name of the confusion matrix's last column
BINS = 10  # equal-width confidence bins of the expected calibration error


def correct(references: Sequence[str], predictions: Sequence[str | None]) -> list[bool]:
    """Per-sample correctness (an invalid prediction is wrong)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    return [p is not None and p == r for r, p in zip(references, predictions)]


def classification_report(references: Sequence[str], predictions: Sequence[str | None],
                          labels: Sequence[str]) -> dict:
    """Accuracy, weighted / macro F1, UAR, per-class scores and the confusion matrix.

    ``confusion[i][j]``: samples of reference ``labels[i]`` predicted ``labels[j]``; the last
    column (j = len(labels)) counts invalid (None) predictions. All numbers are plain Python
    ints / floats (JSON-ready). Raises ValueError on different lengths, a reference outside
    ``labels``, or a prediction that is neither None nor in ``labels``.
    """
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels repeat: {labels}")
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    unknown_refs = sorted(set(references) - set(labels), key=str)
    if unknown_refs:
        raise ValueError(f"reference labels {unknown_refs} are not in {labels}")
    unknown_preds = sorted(set(predictions) - set(labels) - {None}, key=str)
    if unknown_preds:
        raise ValueError(f"predicted labels {unknown_preds} are neither None (invalid) nor in {labels}")

    k, count = len(labels), len(references)
    if count == 0:  # scikit-learn refuses empty input; every score is 0
        confusion = np.zeros((k, k + 1), dtype=np.int64)
        precision = recall = f1 = support = np.zeros(k)
        accuracy = weighted_f1 = macro_f1 = uar = 0.0
    else:
        invalid = "?" * (1 + max(map(len, labels)))  # longer than every label, so not one of them
        predicted = [invalid if p is None else p for p in predictions]
        confusion = confusion_matrix(references, predicted, labels=labels + [invalid])[:k]  # (k, k + 1)
        precision, recall, f1, support = precision_recall_fscore_support(
            references, predicted, labels=labels, zero_division=0)
        accuracy = accuracy_score(references, predicted)
        weighted_f1 = np.average(f1, weights=support)  # what average="weighted" computes
        macro_f1, uar = f1.mean(), recall.mean()  # average="macro" of F1 and of recall

    return {
        "labels": labels,
        "count": count,
        "invalid": int(confusion[:, k].sum()),
        "accuracy": float(accuracy),
        "weighted_f1": float(weighted_f1),
        "macro_f1": float(macro_f1),
        "uar": float(uar),
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "confusion": confusion.tolist(),
    }


def joint_report(emotion: dict, intent: dict, emotion_correct: Sequence[bool],
                 intent_correct: Sequence[bool]) -> dict:
    """Joint scores of one set of samples: ``both_correct`` (fraction with emotion and intent
    right) and ``hm_weighted_f1`` (harmonic mean of the two weighted F1s, 0 when either is 0).
    ``emotion`` / ``intent`` are :func:`classification_report` results on the same samples."""
    if len(emotion_correct) != len(intent_correct):
        raise ValueError(f"{len(emotion_correct)} emotion flags but {len(intent_correct)} intent flags")
    for name, report in (("emotion", emotion), ("intent", intent)):
        if "count" in report and report["count"] != len(emotion_correct):
            raise ValueError(f"the {name} report has {report['count']} samples, the flags {len(emotion_correct)}")
    n = len(emotion_correct)
    both = sum(1 for e, i in zip(emotion_correct, intent_correct) if e and i)
    a, b = float(emotion["weighted_f1"]), float(intent["weighted_f1"])
    return {
        "count": n,
        "both_correct": both / n if n else 0.0,
        "hm_weighted_f1": 2 * a * b / (a + b) if a > 0 and b > 0 else 0.0,
    }


def plot_confusion(report: dict, labels: Sequence[str], path: Path, title: str) -> None:
    """Write the report's confusion matrix (with its invalid column) as a PNG.

    Cells show counts; their colour is the fraction of the reference row, so that rare classes
    stay readable. Row names carry the support. Uses matplotlib's object API (no display, no
    pyplot state), so it is safe in any process.
    """
    from matplotlib.figure import Figure

    labels = list(labels)
    matrix = np.asarray(report["confusion"], dtype=np.int64)
    k = len(labels)
    if matrix.shape != (k, k + 1):
        raise ValueError(f"the confusion matrix is {matrix.shape}, expected {(k, k + 1)} for labels {labels}")
    support = matrix.sum(axis=1, keepdims=True)
    share = matrix / np.maximum(support, 1)  # a row without support is all 0

    fig = Figure(figsize=(2.2 + 0.85 * (k + 1), 1.8 + 0.7 * k), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    fontsize = 9 if k <= 8 else 8
    for i in range(k):
        for j in range(k + 1):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=fontsize,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k + 1), labels + [INVALID], rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), [f"{label} ({n})" for label, n in zip(labels, support[:, 0])])
    ax.axvline(k - 0.5, color="grey", linewidth=1.0)  # sets the invalid column apart
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference (support)")
    accuracy = report.get("accuracy")
    ax.set_title(title if accuracy is None else f"{title}\naccuracy {accuracy:.3f}, "
                 f"weighted F1 {report.get('weighted_f1', 0.0):.3f}, invalid {report.get('invalid', 0)}")
    fig.colorbar(image, ax=ax, label="fraction of the reference row", shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def calibration(references: Sequence[str], probabilities: Sequence[dict[str, float]], labels: Sequence[str]) -> dict:
    """How well the label distributions rank and are calibrated against the references.

    ``top2_accuracy``: the share of samples whose reference is among their two most probable
    labels. ``ece``, the expected calibration error: each sample's confidence is its top
    probability and it counts as right when its top label is the reference (the distribution's
    own prediction, which constrained greedy decoding answers where the labels part at one token);
    the samples fall into ``BINS`` equal-width confidence bins over [0, 1] (the last one closed),
    and ece = sum over bins of (samples in the bin / all samples) * |accuracy - mean confidence|
    of the bin. ``bins``: per bin its range, count, accuracy and mean confidence (0 when empty).
    Raises ValueError on different lengths or a distribution that is not over ``labels``."""
    labels = list(labels)
    if len(references) != len(probabilities):
        raise ValueError(f"{len(references)} references but {len(probabilities)} label distributions")
    for i, p in enumerate(probabilities):
        if sorted(p) != sorted(labels):
            raise ValueError(f"distribution {i} is over {sorted(p)}, expected {labels}")
    matrix = np.array([[p[label] for label in labels] for p in probabilities], dtype=np.float64).reshape(-1, len(labels))
    truth = np.array([labels.index(r) for r in references], dtype=np.int64)  # (N,)
    order = np.argsort(-matrix, axis=1, kind="stable")  # (N, k): most probable first, ties in label order
    top2 = (order[:, :2] == truth[:, None]).any(1)  # (N,)
    confidence, right = matrix.max(1), order[:, 0] == truth  # (N,), (N,)
    which = np.minimum((confidence * BINS).astype(np.int64), BINS - 1)  # bin b: [b / BINS, (b + 1) / BINS)
    bins, ece = [], 0.0
    for b in range(BINS):
        inside = which == b
        count = int(inside.sum())
        accuracy = float(right[inside].mean()) if count else 0.0
        mean = float(confidence[inside].mean()) if count else 0.0
        ece += count / max(len(truth), 1) * abs(accuracy - mean)
        bins.append({"low": b / BINS, "high": (b + 1) / BINS, "count": count, "accuracy": accuracy, "confidence": mean})
    return {"count": len(truth), "top2_accuracy": float(top2.mean()) if len(truth) else 0.0, "ece": float(ece),
            "bins": bins}


def plot_reliability(report: dict, path: Path, title: str) -> None:
    """Write the reliability diagram of a :func:`calibration` report as a PNG: each bin's accuracy
    against confidence (bars, their counts above), its mean confidence (dots) and the diagonal of
    perfect calibration. matplotlib's object API, as :func:`plot_confusion`."""
    from matplotlib.figure import Figure

    bins = report["bins"]
    fig = Figure(figsize=(5.2, 4.6), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    width = 1.0 / len(bins)
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    ax.bar(centers, [b["accuracy"] for b in bins], width=width * 0.92, color="#4a7ebb", edgecolor="black",
           linewidth=0.5, label="accuracy of the top label")
    used = [(c, b) for c, b in zip(centers, bins) if b["count"]]
    ax.plot([c for c, _ in used], [b["confidence"] for _, b in used], "o", color="#d9534f", markersize=4,
            label="mean confidence")
    for c, b in used:
        ax.text(c, min(b["accuracy"], 0.93) + 0.02, str(b["count"]), ha="center", va="bottom", fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1.0, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (top probability); counts above the bars")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {report['ece']:.3f}, top-2 accuracy {report['top2_accuracy']:.3f}, "
                 f"{report['count']} samples")
    ax.legend(loc="upper left", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
