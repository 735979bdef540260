"""The study's metrics against hand-computed examples (pure numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import compute_metrics, confusion_matrix, per_class, summary

CLASSES = ["A", "B", "C"]
# 5 test images: true A, A, B, B, C
Y = np.array([0, 0, 1, 1, 2])
P = np.array([
    [0.90, 0.05, 0.05],  # A -> A, conf 0.90
    [0.20, 0.70, 0.10],  # A -> B, conf 0.70 (wrong)
    [0.00, 1.00, 0.00],  # B -> B, conf 1.00
    [0.10, 0.80, 0.10],  # B -> B, conf 0.80
    [0.995, 0.004, 0.001],  # C -> A, conf 0.995 (wrong, confident: a header suspect)
])
UIDS = ["1.1", "1.2", "1.3", "1.4", "1.5"]


def test_per_class_accuracy_and_confidence_by_hand():
    rows = {r["class"]: r for r in per_class(Y, P, CLASSES)}
    # eq. 1: correct / classified x 100
    assert rows["A"]["n"] == 2 and rows["A"]["correct"] == 1 and rows["A"]["accuracy"] == pytest.approx(50.0)
    assert rows["B"]["accuracy"] == pytest.approx(100.0)
    assert rows["C"]["accuracy"] == pytest.approx(0.0)
    # eq. 2: confidence = probability of the predicted class; mean and sample SD (ddof=1)
    assert rows["A"]["confidence_mean"] == pytest.approx(0.80)
    assert rows["A"]["confidence_sd"] == pytest.approx(math.sqrt(((0.9 - 0.8) ** 2 + (0.7 - 0.8) ** 2) / 1))
    assert rows["B"]["confidence_mean"] == pytest.approx(0.90)
    assert rows["B"]["confidence_sd"] == pytest.approx(math.sqrt(0.02))
    # a single image: mean defined, sample SD undefined
    assert rows["C"]["confidence_mean"] == pytest.approx(0.995) and rows["C"]["confidence_sd"] is None


def test_overall_confusion_misclassified_and_suspects():
    m = compute_metrics(Y, P, CLASSES, UIDS, suspect_threshold=0.99)
    assert m["overall_accuracy"] == pytest.approx(60.0)  # 3 of 5
    assert m["confusion_matrix"] == {"labels": CLASSES, "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 0]]}
    # most confident mistake first
    assert [x["sop_instance_uid"] for x in m["misclassified"]] == ["1.5", "1.2"]
    assert m["misclassified"][1] == {"sop_instance_uid": "1.2", "true": "A", "predicted": "B", "confidence": 0.70}
    assert m["header_suspects"] == [
        {"sop_instance_uid": "1.5", "header_class": "C", "predicted": "A", "confidence": 0.995}
    ]
    assert compute_metrics(Y, P, CLASSES, UIDS, suspect_threshold=0.999)["header_suspects"] == []


def test_empty_class_and_summary_shape():
    rows = per_class(np.array([0, 0]), np.array([[0.6, 0.4, 0.0], [0.3, 0.7, 0.0]]), CLASSES)
    assert rows[2] == {"class": "C", "n": 0, "correct": 0, "accuracy": None, "confidence_mean": None,
                       "confidence_sd": None}
    s = summary(Y, P, CLASSES)
    assert set(s) == {"per_class", "overall_accuracy"} and s["overall_accuracy"] == pytest.approx(60.0)
    assert confusion_matrix([0, 1, 1], [1, 1, 0], 2) == [[0, 1], [1, 1]]


@pytest.mark.parametrize("probs", [np.array([[0.5, 0.2, 0.2]] * 5), np.ones((5, 2)) / 2])
def test_rejects_non_softmax_or_wrong_shape(probs):
    with pytest.raises(ValueError):
        compute_metrics(Y, probs, CLASSES, UIDS)
