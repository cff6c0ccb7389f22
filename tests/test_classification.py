"""Classification metrics against scikit-learn, joint metrics, and the confusion-matrix PNG."""
from __future__ import annotations

import random

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    recall_score,
)

from xmei.classification import (
    INVALID,
    classification_report,
    correct,
    joint_report,
    plot_confusion,
)
from xmei.labels import DEFAULT_EMOTIONS, DEFAULT_INTENTS

SK_INVALID = "<invalid>"


def check_against_sklearn(refs, preds, labels):
    report = classification_report(refs, preds, labels)
    labels = list(labels)
    sk_preds = [SK_INVALID if p is None else p for p in preds]

    def approx(x):
        return pytest.approx(x, abs=1e-12)

    assert report["count"] == len(refs)
    assert report["invalid"] == sum(p is None for p in preds)
    assert report["accuracy"] == approx(accuracy_score(refs, sk_preds))
    assert report["weighted_f1"] == approx(f1_score(refs, sk_preds, labels=labels, average="weighted",
                                                    zero_division=0))
    assert report["macro_f1"] == approx(f1_score(refs, sk_preds, labels=labels, average="macro", zero_division=0))
    assert report["uar"] == approx(recall_score(refs, sk_preds, labels=labels, average="macro", zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(refs, sk_preds, labels=labels,
                                                                     zero_division=0)
    assert list(report["per_class"]) == labels
    for i, label in enumerate(labels):
        row = report["per_class"][label]
        assert row["precision"] == approx(precision[i])
        assert row["recall"] == approx(recall[i])
        assert row["f1"] == approx(f1[i])
        assert row["support"] == support[i]
    sk_confusion = confusion_matrix(refs, sk_preds, labels=labels + [SK_INVALID])
    assert report["confusion"] == sk_confusion[: len(labels)].tolist()  # the <invalid> row is all zero
    assert not sk_confusion[len(labels)].any()
    return report


@pytest.mark.parametrize("seed", range(20))
def test_random_cases_match_sklearn(seed):
    rng = random.Random(seed)
    labels = DEFAULT_EMOTIONS if seed % 2 else DEFAULT_INTENTS
    n = rng.choice([1, 5, 37, 200])
    # skewed references, some classes possibly absent; predictions right, wrong, or invalid
    weights = [rng.random() ** 3 for _ in labels]
    refs = rng.choices(labels, weights=weights, k=n)
    p_invalid, p_right = rng.random() * 0.3, rng.random()
    preds = []
    for r in refs:
        u = rng.random()
        preds.append(None if u < p_invalid else r if u < p_invalid + p_right else rng.choice(labels))
    check_against_sklearn(refs, preds, labels)


def test_hand_made_case_with_invalid_no_support_and_never_predicted():
    labels = ("a", "b", "c", "d")
    # "c" has no reference sample but is predicted once; "d" has support but is never predicted
    refs = ["a", "a", "a", "b", "b", "d", "d", "d"]
    preds = ["a", "a", None, "b", "c", None, "a", "b"]
    report = check_against_sklearn(refs, preds, labels)
    assert report["invalid"] == 2 and report["count"] == 8
    assert report["accuracy"] == pytest.approx(3 / 8)
    assert report["confusion"] == [
        [2, 0, 0, 0, 1],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1],
    ]
    a = report["per_class"]["a"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    # UAR includes the no-support class as 0, as scikit-learn's macro recall does
    assert report["uar"] == pytest.approx((2 / 3 + 1 / 2 + 0 + 0) / 4)


def test_all_invalid_and_all_right():
    labels = ("x", "y")
    report = check_against_sklearn(["x", "y", "y"], [None, None, None], labels)
    assert report["accuracy"] == 0.0 and report["weighted_f1"] == 0.0 and report["invalid"] == 3
    assert report["confusion"] == [[0, 0, 1], [0, 0, 2]]
    report = check_against_sklearn(["x", "y", "y"], ["x", "y", "y"], labels)
    assert report["accuracy"] == 1.0 and report["weighted_f1"] == 1.0 and report["macro_f1"] == 1.0
    assert report["uar"] == 1.0 and report["invalid"] == 0


def test_report_is_plain_python():
    report = classification_report(["x", "y"], ["x", None], ("x", "y"))
    for key in ("accuracy", "weighted_f1", "macro_f1", "uar"):
        assert type(report[key]) is float
    assert type(report["invalid"]) is int and type(report["count"]) is int
    assert all(type(v) is int for row in report["confusion"] for v in row)
    assert type(report["per_class"]["x"]["support"]) is int and type(report["per_class"]["x"]["f1"]) is float


def test_empty_input():
    report = classification_report([], [], ("x", "y"))
    assert report["count"] == 0 and report["accuracy"] == 0.0 and report["confusion"] == [[0, 0, 0], [0, 0, 0]]


def test_errors():
    with pytest.raises(ValueError, match="references"):
        classification_report(["x", "y"], ["x"], ("x", "y"))
    with pytest.raises(ValueError, match="'z'"):
        classification_report(["x", "z"], ["x", "x"], ("x", "y"))
    with pytest.raises(ValueError, match="'Y'"):
        classification_report(["x", "y"], ["x", "Y"], ("x", "y"))
    with pytest.raises(ValueError, match="repeat"):
        classification_report(["x"], ["x"], ("x", "x"))


def test_correct_flags():
    assert correct(["a", "b", "c"], ["a", None, "b"]) == [True, False, False]
    with pytest.raises(ValueError):
        correct(["a"], [])


def test_joint_report_by_hand():
    e_refs, e_preds = ["a", "a", "b", "b"], ["a", None, "b", "a"]
    i_refs, i_preds = ["x", "y", "y", "x"], ["x", "y", "x", "x"]
    emotion = classification_report(e_refs, e_preds, ("a", "b"))
    intent = classification_report(i_refs, i_preds, ("x", "y"))
    joint = joint_report(emotion, intent, correct(e_refs, e_preds), correct(i_refs, i_preds))
    # both right: samples 0 only (1 has an invalid emotion, 2 a wrong intent, 3 a wrong emotion)
    assert joint["both_correct"] == pytest.approx(1 / 4) and joint["count"] == 4
    a, b = emotion["weighted_f1"], intent["weighted_f1"]
    assert a > 0 and b > 0
    assert joint["hm_weighted_f1"] == pytest.approx(2 * a * b / (a + b))
    # by hand: emotion a P=1/2 R=1/2 F=1/2, b P=1 R=1/2 F=2/3 -> 7/12; intent x F=4/5, y F=2/3 -> 11/15
    assert a == pytest.approx(7 / 12) and b == pytest.approx(11 / 15)


def test_joint_report_zero_and_errors():
    zero = {"weighted_f1": 0.0, "count": 2}
    some = {"weighted_f1": 0.5, "count": 2}
    assert joint_report(zero, some, [False, False], [True, True]) == {
        "count": 2, "both_correct": 0.0, "hm_weighted_f1": 0.0}
    assert joint_report(some, some, [True, True], [True, False])["hm_weighted_f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        joint_report(some, some, [True], [True, False])
    with pytest.raises(ValueError):
        joint_report(some, some, [True, True, True], [True, False, True])


@pytest.mark.parametrize("labels", [DEFAULT_EMOTIONS, DEFAULT_INTENTS])
def test_plot_confusion_writes_a_png(tmp_path, labels):
    import matplotlib.image

    rng = random.Random(len(labels))
    refs = rng.choices(labels, k=300)
    preds = [None if rng.random() < 0.1 else r if rng.random() < 0.6 else rng.choice(labels) for r in refs]
    report = classification_report(refs, preds, labels)
    path = tmp_path / "sub" / "confusion.png"
    plot_confusion(report, labels, path, f"test, {len(labels)} classes")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 300 < width < 3000 and 300 < height < 3000
    assert np.ptp(image[..., :3]) > 0  # not blank
    assert INVALID == "invalid"


def test_plot_confusion_checks_the_shape(tmp_path):
    report = classification_report(["x"], ["x"], ("x", "y"))
    with pytest.raises(ValueError, match="confusion"):
        plot_confusion(report, ("x", "y", "z"), tmp_path / "c.png", "bad")
