"""Scalar summaries of one set of predictions: what a selection rule can constrain.

Besides the per-group metrics of :class:`~fairdeploy.metrics.GroupMetrics`, choosing a
setting needs the overall accuracy, the balanced accuracy (macro recall over the
classes) and each group's rate of predicting each class: a model that collapses toward
one class can lower the fairness gaps and even raise macro precision, and these catch it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fairdeploy.metrics._group import group_metrics

__all__ = ["SUMMARY_METRICS", "predicted_class_rates", "summary_metrics"]

#: The scalar metrics :func:`summary_metrics` returns, with what each one means.
SUMMARY_METRICS: dict[str, str] = {
    "accuracy": "fraction of correct predictions over all samples of the split",
    "balanced_accuracy": "macro recall: mean over the classes present of each class's recall",
    "avg_precision": "mean of the two groups' macro precision (the paper's Avg. precision)",
    "avg_recall": "mean of the two groups' macro recall",
    "avg_f1": "mean of the two groups' macro F1",
    "eopp0": "mean over classes of |ΔTNR| between the groups",
    "eopp1": "mean over classes of |ΔTPR| between the groups (the paper's EOpp)",
    "eodd": "mean over classes of |ΔTPR + ΔFPR| / 2 between the groups",
}


def predicted_class_rates(y_pred: Any, groups: Any, num_classes: int) -> np.ndarray:
    """Per group id (rows 0 and 1) and class, the fraction of that group's samples
    predicted as that class; NaN for a group without samples."""
    yp = np.asarray(y_pred, dtype=np.int64)
    g = np.asarray(groups, dtype=np.int64)
    out = np.full((2, num_classes), np.nan)
    for gid in (0, 1):
        mask = g == gid
        if mask.any():
            out[gid] = np.bincount(yp[mask], minlength=num_classes)[:num_classes] / mask.sum()
    return out


def summary_metrics(
    y_true: Any,
    y_pred: Any,
    groups: Any,
    *,
    privileged: int = 1,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """The :data:`SUMMARY_METRICS` of one set of predictions, and per-group class rates.

    ``accuracy`` and ``balanced_accuracy`` count every sample of the split (also those
    of unknown group); the group metrics leave unknown-group samples out, as
    :func:`~fairdeploy.metrics.group_metrics` does.

    Returns
    -------
    dict
        The scalar metrics (NaN where undefined) and ``predicted_rates``: a 2 × K list,
        row = group id, of :func:`predicted_class_rates`.
    """
    yt = np.asarray(y_true, dtype=np.int64)
    yp = np.asarray(y_pred, dtype=np.int64)
    g = np.asarray(groups, dtype=np.int64)
    m = group_metrics(yt, yp, g, privileged=privileged, num_classes=num_classes)
    k = m.num_classes
    present = np.unique(yt)
    recalls = [float(np.mean(yp[yt == c] == c)) for c in present]
    return {
        "accuracy": float(np.mean(yp == yt)) if yt.size else float("nan"),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "avg_precision": m.precision_avg,
        "avg_recall": m.recall_avg,
        "avg_f1": m.f1_avg,
        "eopp0": m.eopp0,
        "eopp1": m.eopp1,
        "eodd": m.eodd,
        "predicted_rates": predicted_class_rates(yp, g, k).tolist(),
    }
