"""The study's metrics, as pure numpy functions (no torch).

- accuracy (eq. 1) = images classified correctly / images classified x 100, per class (over the
  images whose true class it is) and overall;
- confidence (eq. 2) = the softmax probability of the *predicted* class (each image's class
  probabilities sum to 1 = 100 %), reported per true class as mean and SD over its test images.
  SD is the sample SD (ddof = 1; what the "mean +- SD" of a results table usually is, e.g. Excel's
  STDEV); it is None for a class with fewer than 2 images, and mean/accuracy are None with none.
- confusion matrix: rows = true class, columns = predicted class, in `classes` order;
- misclassified: every wrong prediction, most confident first; header suspects: those whose
  header-derived class the model contradicts with confidence >= the threshold (label QC).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> None:
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"probs must be (N, {len(classes)}), got {probs.shape}")
    if y_true.shape != (probs.shape[0],):
        raise ValueError("y_true and probs disagree on N")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= len(classes)):
        raise ValueError("y_true holds a class index out of range")
    if len(probs) and not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("each row of probs must sum to 1 (softmax output)")


def per_class(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """Table 2 rows: class, n, correct, accuracy (%), confidence_mean, confidence_sd."""
    y_true, probs = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    _check(y_true, probs, classes)
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    rows = []
    for k, name in enumerate(classes):
        sel = y_true == k
        n = int(sel.sum())
        correct = int((pred[sel] == k).sum())
        c = conf[sel]
        rows.append({
            "class": name,
            "n": n,
            "correct": correct,
            "accuracy": correct / n * 100.0 if n else None,
            "confidence_mean": float(c.mean()) if n else None,
            "confidence_sd": float(c.std(ddof=1)) if n >= 2 else None,
        })
    return rows


def overall_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return None
    return float((np.asarray(probs).argmax(axis=1) == y_true).sum() / len(y_true) * 100.0)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> list[list[int]]:
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m.tolist()


def summary(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Per-class table and overall accuracy (the shape of one experiment's result)."""
    return {"per_class": per_class(y_true, probs, classes), "overall_accuracy": overall_accuracy(y_true, probs)}


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    uids: Sequence[str],
    suspect_threshold: float = 0.99,
) -> dict:
    """All test-set metrics in the shape of GET /api/v1/training-jobs/{id}/metrics (minus experiments/skipped)."""
    y_true, probs = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    _check(y_true, probs, classes)
    if len(uids) != len(y_true):
        raise ValueError("uids and y_true disagree on N")
    pred, conf = probs.argmax(axis=1), probs.max(axis=1)
    wrong = np.flatnonzero(pred != y_true)
    wrong = wrong[np.argsort(-conf[wrong], kind="stable")]
    mis = [
        {"sop_instance_uid": uids[i], "true": classes[y_true[i]], "predicted": classes[pred[i]],
         "confidence": float(conf[i])}
        for i in wrong
    ]
    suspects = [
        {"sop_instance_uid": m["sop_instance_uid"], "header_class": m["true"], "predicted": m["predicted"],
         "confidence": m["confidence"]}
        for m in mis
        if m["confidence"] >= suspect_threshold
    ]
    return {
        "overall_accuracy": overall_accuracy(y_true, probs),
        "per_class": per_class(y_true, probs, classes),
        "confusion_matrix": {"labels": list(classes), "matrix": confusion_matrix(y_true, pred, len(classes))},
        "misclassified": mis,
        "header_suspects": suspects,
    }
