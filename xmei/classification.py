"""Classification metrics for the parsed emotion / intent, on scikit-learn.

Invalid predictions (None: the answer named no known label) count as wrong. Every score is
scikit-learn's with ``labels=labels, zero_division=0``, an invalid prediction being an extra
class name outside ``labels``: it lowers accuracy and the recall of its reference class, but is
not a class of its own in the averages. The macro averages (``macro_f1``, ``uar``) include every
label given, so a label with no reference sample contributes 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

__all__ = ["INVALID", "classification_report", "correct", "joint_report", "plot_confusion"]

INVALID = "invalid"  # name of the confusion matrix's last column


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
