"""Classification metrics that stay honest on unbalanced data."""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney statistic, ties count half); NaN when one
    class is absent."""
    positives = np.asarray(positives, dtype=bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Accuracy, balanced accuracy, AUROC, confusion matrix; sensitivity and specificity
    (class 1 as positive) for two classes. ``probabilities`` is (n, classes)."""
    labels = np.asarray(labels)
    n_classes = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(axis=1)
    recalls = np.divide(np.diag(confusion), support, out=np.full(n_classes, np.nan), where=support > 0)
    if n_classes == 2:
        roc = auroc(probabilities[:, 1], labels == 1)
    else:
        per_class = [auroc(probabilities[:, c], labels == c) for c in range(n_classes)]
        roc = float(np.nanmean(per_class)) if not all(np.isnan(per_class)) else float("nan")
    metrics = {
        "examples": int(len(labels)),
        "accuracy": float((predicted == labels).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": float(np.nanmean(recalls)) if (support > 0).any() else float("nan"),
        "auroc": roc,
        "confusion_matrix": confusion.tolist(),
    }
    if n_classes == 2:
        metrics["sensitivity"] = float(recalls[1])
        metrics["specificity"] = float(recalls[0])
    return metrics


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error (Guo et al. 2017): the gap between confidence (the
    probability of the predicted class) and accuracy, averaged over ``bins`` equal-width
    confidence bins weighted by their share of the images; with each bin's numbers, for a
    reliability plot."""
    labels = np.asarray(labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i + 1]]; a confidence of 0 joins the first.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table, error = [], 0.0
    for index in range(bins):
        members = which == index
        count = int(members.sum())
        mean_confidence = float(confidence[members].mean()) if count else None
        accuracy = float(correct[members].mean()) if count else None
        table.append(
            {
                "low": float(edges[index]),
                "high": float(edges[index + 1]),
                "count": count,
                "confidence": mean_confidence,
                "accuracy": accuracy,
            }
        )
        if accuracy is not None and mean_confidence is not None:  # the bin is not empty
            error += count / len(labels) * abs(accuracy - mean_confidence)
    return {"expected_calibration_error": float(error) if len(labels) else float("nan"), "bins": table}
