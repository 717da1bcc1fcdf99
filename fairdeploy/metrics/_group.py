"""Group accuracy and fairness metrics from predictions (DESIGN §3).

Two demographic groups carry ids 0 and 1; id −1 marks a sample whose group is unknown:
it is left out of every group metric and counted. One group is *privileged* (written
"group 1" in the formulas below, whatever its id) and the other *unprivileged*
("group 0"). Each class k is scored one-vs-rest: within a group, a sample is a positive
for k when its true label is k and a predicted positive when its predicted label is k.

Fairness (DESIGN §3), with K classes, Δ = privileged − unprivileged:

* ``EOpp0 = mean_k |ΔTNR_k|``,  ``EOpp1 = mean_k |ΔTPR_k|``,
* ``EOdd = mean_k |ΔTPR_k + ΔFPR_k| / 2``.

These *mean* values are the headline numbers: the paper's tables were computed this way
(its equations write sums with no /2; those *sum* values are reported as well). The paper
calls EOpp1 simply "EOpp". A class whose TPR is undefined in a group (no positives of
that class in the group) is left out of the TPR-based means and counted; likewise a
class with no negatives in a group for TNR/FPR. For two classes both are scored
one-vs-rest, so ``TPR_1 = TNR_0``: EOpp0 equals EOpp1 and
``EOdd = |ΔTPR_1 − ΔTPR_0| / 2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fairdeploy._json import json_float, json_floats
from fairdeploy.errors import FairDeployError

__all__ = ["UNKNOWN_GROUP", "GroupMetrics", "group_metrics", "privileged_group"]

#: Group id of a sample whose sensitive attribute is unknown.
UNKNOWN_GROUP = -1


# --------------------------------------------------------------------------- inputs


def _as_id_array(values: Any, name: str) -> np.ndarray:
    """A 1-D int64 copy of ``values`` (numpy array, torch tensor or sequence)."""
    if hasattr(values, "detach"):  # a torch tensor; duck-typed so torch is not imported here
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        hint = " (pass logits.argmax(1), not the logits)" if arr.ndim == 2 else ""
        raise FairDeployError(
            f"{name} must be a 1-D array of integer ids, got shape {arr.shape}{hint}"
        )
    if arr.size == 0:
        raise FairDeployError(f"{name} is empty: metrics need at least one sample")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise FairDeployError(
            f"{name} must hold integer ids, got dtype {arr.dtype}: "
            "pass class/group ids (e.g. probabilities.argmax(1)), not scores"
        )
    return arr.astype(np.int64)


def _check_labels(labels: np.ndarray, name: str, num_classes: int | None) -> None:
    low = int(labels.min())
    if low < 0:
        raise FairDeployError(f"{name} holds the label {low}: class ids must be ≥ 0")
    if num_classes is not None and int(labels.max()) >= num_classes:
        raise FairDeployError(
            f"{name} holds the label {int(labels.max())} but num_classes={num_classes}: "
            f"class ids must lie in 0..{num_classes - 1}; raise num_classes or fix the labels"
        )


def _check_groups(groups: np.ndarray) -> None:
    bad = np.setdiff1d(np.unique(groups), (UNKNOWN_GROUP, 0, 1))
    if bad.size:
        raise FairDeployError(
            f"groups holds the id(s) {bad[:5].tolist()}: allowed ids are 0 and 1, "
            "and −1 for an unknown group; map the sensitive attribute to these first"
        )


def _check_privileged(privileged: Any) -> int:
    if isinstance(privileged, bool) or privileged not in (0, 1):
        raise FairDeployError(f"privileged={privileged!r} is not a group id: use 0 or 1")
    return int(privileged)


def _check_num_classes(num_classes: Any) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise FairDeployError(f"num_classes={num_classes!r} is not an integer: use an int ≥ 2")
    if num_classes < 2:
        raise FairDeployError(f"num_classes={num_classes} is too small: use an int ≥ 2")
    return int(num_classes)


def _check_group_names(group_names: Sequence[str] | None) -> tuple[str, str]:
    if group_names is None:
        return ("group 0", "group 1")
    names = tuple(group_names)
    if len(names) != 2 or not all(isinstance(n, str) for n in names) or names[0] == names[1]:
        raise FairDeployError(
            f"group_names={group_names!r} is not allowed: give two distinct strings, "
            "the names of group id 0 and group id 1"
        )
    return names  # type: ignore[return-value]


def _check_lengths(arrays: Mapping[str, np.ndarray]) -> None:
    lengths = {name: arr.shape[0] for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        found = ", ".join(f"{name}: {n}" for name, n in lengths.items())
        raise FairDeployError(f"inputs differ in length ({found}): give one entry per sample")


def _infer_num_classes(num_classes: int | None, *label_arrays: np.ndarray) -> int:
    if num_classes is not None:
        return num_classes
    # A problem with one observed label is still at least binary.
    return max(2, *(int(a.max()) + 1 for a in label_arrays))


def _check_groups_present(groups: np.ndarray, names: tuple[str, str]) -> None:
    for gid in (0, 1):
        if not np.any(groups == gid):
            unknown = int(np.sum(groups == UNKNOWN_GROUP))
            raise FairDeployError(
                f"group {names[gid]!r} (id {gid}) has no samples ({groups.size} samples, "
                f"{unknown} of unknown group): evaluate on a split that holds both groups, "
                "or check how the sensitive attribute is mapped to ids 0/1"
            )


# --------------------------------------------------------------------------- core


def _safe_divide(num: np.ndarray, den: np.ndarray, fill: float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, fill, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _masked_mean(values: np.ndarray, defined: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sum of ``values`` over the last axis where ``defined``; NaN mean if none."""
    total = np.where(defined, values, 0.0).sum(axis=-1)
    count = defined.sum(axis=-1)
    return _safe_divide(total, count, np.nan), total


def _metrics_from_counts(
    positives: np.ndarray,
    predicted: np.ndarray,
    true_positives: np.ndarray,
    privileged: int,
) -> dict[str, np.ndarray]:
    """All group metrics from one-vs-rest counts.

    The three count arrays have shape ``(..., 2, K)``: axis −2 is the group id, axis −1
    the class; ``positives`` counts true labels, ``predicted`` predicted labels and
    ``true_positives`` correct predictions, per group and class. Leading axes are a batch
    (bootstrap resamples) and every result keeps them.
    """
    size = positives.sum(axis=-1)  # (..., 2) samples per group
    negatives = size[..., None] - positives
    false_positives = predicted - true_positives

    # Per class; NaN where undefined (no positives / no negatives of the class in the group).
    tpr = _safe_divide(true_positives, positives, np.nan)
    fpr = _safe_divide(false_positives, negatives, np.nan)
    tnr = 1.0 - fpr

    # Macro P/R/F1 like sklearn's default labels: the classes present in the group's
    # y_true or y_pred, with zero_division=0.
    present = (positives > 0) | (predicted > 0)
    precision_k = _safe_divide(true_positives, predicted, 0.0)
    recall_k = _safe_divide(true_positives, positives, 0.0)
    f1_k = _safe_divide(2.0 * true_positives, positives + predicted, 0.0)
    precision, _ = _masked_mean(precision_k, present)
    recall, _ = _masked_mean(recall_k, present)
    f1, _ = _masked_mean(f1_k, present)
    accuracy = _safe_divide(true_positives.sum(axis=-1), size, np.nan)

    priv, unpriv = privileged, 1 - privileged
    d_tpr = tpr[..., priv, :] - tpr[..., unpriv, :]
    d_fpr = fpr[..., priv, :] - fpr[..., unpriv, :]
    d_tnr = tnr[..., priv, :] - tnr[..., unpriv, :]
    tpr_defined = ~np.isnan(d_tpr)
    fpr_defined = ~np.isnan(d_fpr)
    odds_defined = tpr_defined & fpr_defined

    eopp1, eopp1_sum = _masked_mean(np.abs(d_tpr), tpr_defined)
    eopp0, eopp0_sum = _masked_mean(np.abs(d_tnr), fpr_defined)
    odds = np.abs(np.where(odds_defined, d_tpr + d_fpr, 0.0))
    eodd_twice, eodd_sum = _masked_mean(odds, odds_defined)
    fpr_gap, _ = _masked_mean(np.abs(d_fpr), fpr_defined)

    return {
        "size": size,
        "tpr": tpr,
        "fpr": fpr,
        "tnr": tnr,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": accuracy,
        "eopp0": eopp0,
        "eopp1": eopp1,
        "eodd": eodd_twice / 2.0,
        "eopp0_sum": eopp0_sum,
        "eopp1_sum": eopp1_sum,
        "eodd_sum": eodd_sum,
        "tpr_gap": eopp1,
        "fpr_gap": fpr_gap,
        "left_out_tpr": (~tpr_defined).sum(axis=-1),
        "left_out_fpr": (~fpr_defined).sum(axis=-1),
        "left_out_eodd": (~odds_defined).sum(axis=-1),
    }


def _counts(
    y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-vs-rest counts ``(positives, predicted, true_positives)``, each (2, K)."""
    known = groups != UNKNOWN_GROUP
    g, t, p = groups[known], y_true[known], y_pred[known]
    bins = 2 * num_classes
    positives = np.bincount(g * num_classes + t, minlength=bins)
    predicted = np.bincount(g * num_classes + p, minlength=bins)
    correct = t == p
    true_positives = np.bincount(g[correct] * num_classes + t[correct], minlength=bins)
    shape = (2, num_classes)
    return positives.reshape(shape), predicted.reshape(shape), true_positives.reshape(shape)


# --------------------------------------------------------------------------- group metrics


@dataclass(frozen=True, eq=False)
class GroupMetrics:
    """Accuracy and fairness of one set of predictions, per group and between groups.

    Per-group values are tuples indexed by group id (``precision[0]`` is group id 0);
    per-class arrays have shape ``(2, num_classes)``, row = group id. "Group 1" in the
    formulas is the privileged group ``privileged``, whichever id that is.

    Attributes
    ----------
    num_classes : int
        K, the number of classes scored one-vs-rest.
    privileged : int
        Id of the privileged group; ``1 - privileged`` is the unprivileged group.
    group_names : tuple of str
        Names of group id 0 and group id 1 (used in messages and :meth:`to_dict`).
    counts : tuple of int
        Samples in group id 0 and group id 1.
    unknown_count : int
        Samples with group id −1, left out of every metric here.
    accuracy : tuple of float
        Fraction of correct predictions per group.
    precision, recall, f1 : tuple of float
        Macro precision, recall and F1 per group: the unweighted mean over the classes
        that occur in that group's true OR predicted labels (sklearn's default
        ``labels``), a class never predicted having precision 0 (``zero_division=0``).
        F1 is the mean of per-class F1, not the F1 of macro precision and recall.
    precision_avg, recall_avg, f1_avg : float
        Mean of the two groups' values (the paper's "Avg.").
    precision_diff, recall_diff, f1_diff : float
        Absolute difference of the two groups' values (the paper's "Diff.").
    eopp0, eopp1, eodd : float
        Headline fairness, mean convention: ``mean_k |ΔTNR_k|``, ``mean_k |ΔTPR_k|``,
        ``mean_k |ΔTPR_k + ΔFPR_k| / 2`` with Δ = privileged − unprivileged, over the
        classes where the rates are defined in both groups. Lower is fairer; 0 is parity.
        NaN when no class qualifies.
    eopp0_sum, eopp1_sum, eodd_sum : float
        The paper's equations: the same sums over classes, without the mean and the /2.
    tpr_gap, fpr_gap : float
        ``mean_k |ΔTPR_k|`` and ``mean_k |ΔFPR_k|``, reported apart because EOdd's signed
        sum can cancel. As ``TNR = 1 − FPR``, ``fpr_gap == eopp0`` and ``tpr_gap == eopp1``.
    tpr, fpr, tnr : numpy.ndarray
        Per-group (row = group id), per-class rates; NaN where undefined (TPR: no
        positives of the class in the group; FPR/TNR: no negatives).
    classes_left_out : dict of str to int
        Classes left out of the means: ``"tpr"`` (TPR undefined in a group: EOpp1,
        tpr_gap), ``"fpr"`` (FPR/TNR undefined: EOpp0, fpr_gap), ``"eodd"`` (either).
    """

    num_classes: int
    privileged: int
    group_names: tuple[str, str]
    counts: tuple[int, int]
    unknown_count: int
    accuracy: tuple[float, float]
    precision: tuple[float, float]
    recall: tuple[float, float]
    f1: tuple[float, float]
    precision_avg: float
    precision_diff: float
    recall_avg: float
    recall_diff: float
    f1_avg: float
    f1_diff: float
    eopp0: float
    eopp1: float
    eodd: float
    eopp0_sum: float
    eopp1_sum: float
    eodd_sum: float
    tpr_gap: float
    fpr_gap: float
    tpr: np.ndarray = field(repr=False)
    fpr: np.ndarray = field(repr=False)
    tnr: np.ndarray = field(repr=False)
    classes_left_out: dict[str, int] = field(default_factory=dict)

    @property
    def unprivileged(self) -> int:
        """Id of the unprivileged group."""
        return 1 - self.privileged

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every value; NaN (undefined) becomes ``None``."""
        groups = []
        for gid in (0, 1):
            groups.append(
                {
                    "id": gid,
                    "name": self.group_names[gid],
                    "privileged": gid == self.privileged,
                    "count": self.counts[gid],
                    "accuracy": json_float(self.accuracy[gid]),
                    "precision": json_float(self.precision[gid]),
                    "recall": json_float(self.recall[gid]),
                    "f1": json_float(self.f1[gid]),
                    "tpr": json_floats(self.tpr[gid]),
                    "fpr": json_floats(self.fpr[gid]),
                    "tnr": json_floats(self.tnr[gid]),
                }
            )
        return {
            "num_classes": self.num_classes,
            "privileged": self.privileged,
            "unknown_count": self.unknown_count,
            "groups": groups,
            "precision": {
                "avg": json_float(self.precision_avg),
                "diff": json_float(self.precision_diff),
            },
            "recall": {
                "avg": json_float(self.recall_avg),
                "diff": json_float(self.recall_diff),
            },
            "f1": {"avg": json_float(self.f1_avg), "diff": json_float(self.f1_diff)},
            "fairness": {
                "convention": "mean over classes; EOdd halved",
                "eopp0": json_float(self.eopp0),
                "eopp1": json_float(self.eopp1),
                "eodd": json_float(self.eodd),
            },
            "fairness_sum": {
                "convention": "sum over classes (the paper's equations)",
                "eopp0": json_float(self.eopp0_sum),
                "eopp1": json_float(self.eopp1_sum),
                "eodd": json_float(self.eodd_sum),
            },
            "tpr_gap": json_float(self.tpr_gap),
            "fpr_gap": json_float(self.fpr_gap),
            "classes_left_out": dict(self.classes_left_out),
        }


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.array(arr, dtype=np.float64)
    arr.flags.writeable = False
    return arr


#: The per-group values :func:`group_metrics` reads from the counts, as (group 0, group 1).
_PER_GROUP = ("accuracy", "precision", "recall", "f1")
#: The between-group gaps :func:`group_metrics` reads from the counts, as floats.
_GAPS = ("eopp0", "eopp1", "eodd", "eopp0_sum", "eopp1_sum", "eodd_sum", "tpr_gap", "fpr_gap")


def group_metrics(
    y_true: Any,
    y_pred: Any,
    groups: Any,
    *,
    privileged: int = 1,
    num_classes: int | None = None,
    group_names: Sequence[str] | None = None,
) -> GroupMetrics:
    """Per-group precision/recall/F1 and the EOpp0/EOpp1/EOdd fairness gaps.

    Parameters
    ----------
    y_true, y_pred : array-like of int, shape (n,)
        True and predicted class ids (numpy arrays, torch tensors or sequences).
    groups : array-like of int, shape (n,)
        Group id per sample: 0 or 1, or −1 when unknown (left out and counted).
    privileged : {0, 1}, default 1
        Id of the privileged group, "group 1" in the fairness formulas.
    num_classes : int, optional
        K. Default: the largest label in ``y_true`` or ``y_pred`` plus one (at least 2).
        Give it when a class may be absent from the split. A class absent from every
        sample has no positives (left out of EOpp1/EOdd) but an FPR of 0 in both groups,
        so it counts in EOpp0's mean as a class with no gap.
    group_names : pair of str, optional
        Names of group id 0 and id 1, for messages and :meth:`GroupMetrics.to_dict`.

    Returns
    -------
    GroupMetrics
        See its attributes for what each number means.

    Raises
    ------
    FairDeployError
        Inputs of different lengths, non-integer or out-of-range ids, or a group with
        no samples.
    """
    privileged = _check_privileged(privileged)
    num_classes = _check_num_classes(num_classes)
    names = _check_group_names(group_names)
    yt = _as_id_array(y_true, "y_true")
    yp = _as_id_array(y_pred, "y_pred")
    g = _as_id_array(groups, "groups")
    _check_lengths({"y_true": yt, "y_pred": yp, "groups": g})
    _check_labels(yt, "y_true", num_classes)
    _check_labels(yp, "y_pred", num_classes)
    _check_groups(g)
    _check_groups_present(g, names)
    k = _infer_num_classes(num_classes, yt, yp)

    m = _metrics_from_counts(*_counts(yt, yp, g, k), privileged)

    pairs = {key: (float(m[key][0]), float(m[key][1])) for key in _PER_GROUP}
    between = {}  # average and gap of the two groups' values
    for key in ("precision", "recall", "f1"):
        a, b = pairs[key]
        between[f"{key}_avg"], between[f"{key}_diff"] = (a + b) / 2.0, abs(a - b)
    return GroupMetrics(
        num_classes=k,
        privileged=privileged,
        group_names=names,
        counts=(int(m["size"][0]), int(m["size"][1])),
        unknown_count=int(np.sum(g == UNKNOWN_GROUP)),
        **pairs,
        **between,
        **{key: float(m[key]) for key in _GAPS},
        tpr=_readonly(m["tpr"]),
        fpr=_readonly(m["fpr"]),
        tnr=_readonly(m["tnr"]),
        classes_left_out={
            "tpr": int(m["left_out_tpr"]),
            "fpr": int(m["left_out_fpr"]),
            "eodd": int(m["left_out_eodd"]),
        },
    )


def privileged_group(
    y_true: Any, y_pred: Any, groups: Any, *, num_classes: int | None = None
) -> int:
    """The id of the group on which the predictions have the higher macro recall.

    This is DESIGN's ``privileged: auto``: the vanilla model's better-served group on the
    validation split. Macro recall is as in :class:`GroupMetrics` (mean over the classes
    present in the group). On an exact tie the answer is 1, the default ``privileged``
    id, so equal performance leaves the usual convention in place.

    Parameters
    ----------
    y_true, y_pred, groups : array-like of int, shape (n,)
        As in :func:`group_metrics`; samples of unknown group (−1) are ignored.
    num_classes : int, optional
        As in :func:`group_metrics`.

    Returns
    -------
    int
        0 or 1.
    """
    metrics = group_metrics(y_true, y_pred, groups, num_classes=num_classes)
    return 0 if metrics.recall[0] > metrics.recall[1] else 1
