"""Bootstrap confidence intervals of group fairness metrics, paired across methods."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fairdeploy._json import JsonRecord
from fairdeploy.errors import FairDeployError
from fairdeploy.metrics._group import (
    UNKNOWN_GROUP,
    _as_id_array,
    _check_groups,
    _check_labels,
    _check_lengths,
    _check_num_classes,
    _check_privileged,
    _infer_num_classes,
    _metrics_from_counts,
    group_metrics,
)

__all__ = [
    "BOOTSTRAP_METRICS",
    "LOWER_IS_BETTER",
    "BootstrapMetrics",
    "ConfidenceInterval",
    "PairedDifference",
    "bootstrap_metrics",
]

#: The metrics :func:`bootstrap_metrics` gives intervals for.
BOOTSTRAP_METRICS = ("eopp0", "eopp1", "eodd", "avg_precision", "avg_recall", "avg_accuracy")
#: Metrics where a lower value is better (fairness gaps); the others are better higher.
LOWER_IS_BETTER = frozenset({"eopp0", "eopp1", "eodd"})
# Bounds the (resamples × samples) block drawn at once: 1M int32 indices and their
# float64 multiplicities, ~12 MB.
_BOOTSTRAP_BLOCK = 1_000_000


@dataclass(frozen=True)
class ConfidenceInterval(JsonRecord):
    """A metric's value on the full test set and its bootstrap percentile interval.

    Attributes
    ----------
    value : float
        The metric on the full (un-resampled) test set.
    low, high : float
        The ``(1 − confidence)/2`` and ``(1 + confidence)/2`` quantiles of the metric
        over the resamples where it is defined.
    mean : float
        Mean of the metric over those resamples. ``mean − value`` estimates the
        bootstrap bias: EOpp0/EOpp1/EOdd average *absolute* gaps, and resampling noise
        only adds to them, so when the true gap is small next to that noise the whole
        interval can lie above ``value``. Compare methods with the paired difference,
        where this bias largely cancels.
    undefined_resamples : int
        Resamples where the metric was undefined (e.g. a group drawn empty), left out.
    """

    value: float
    low: float
    high: float
    mean: float
    undefined_resamples: int = 0


@dataclass(frozen=True)
class PairedDifference(JsonRecord):
    """A method's metric minus the baseline's, with a paired bootstrap interval.

    Both methods are scored on the same resampled indices in every resample, so the
    interval reflects the change itself, not the two methods' separate noise.

    Attributes
    ----------
    value : float
        ``metric(method) − metric(baseline)`` on the full test set.
    low, high : float
        Percentile interval of the per-resample differences.
    significant : bool
        True when the interval excludes 0; a change whose interval contains 0 is
        not significant at this confidence.
    undefined_resamples : int
        Resamples where either metric was undefined, left out.
    """

    value: float
    low: float
    high: float
    significant: bool
    undefined_resamples: int = 0


@dataclass(frozen=True)
class BootstrapMetrics:
    """Bootstrap intervals for several methods' predictions on one test set.

    Attributes
    ----------
    baseline : str
        The method differences are taken against (e.g. ``"vanilla"``).
    n_resamples : int
        Resamples drawn (with replacement, same size as the known-group test samples).
    confidence : float
        Coverage of every interval, e.g. 0.95.
    seed : int
        Seed of the resampling; the same inputs and seed give the same intervals.
    intervals : dict
        ``intervals[method][metric]``: a :class:`ConfidenceInterval`, for the metrics
        ``eopp0``, ``eopp1``, ``eodd`` (mean convention), ``avg_precision`` and
        ``avg_recall`` (mean of the two groups' macro precision / recall) and
        ``avg_accuracy`` (mean of the two groups' accuracy).
    differences : dict
        ``differences[method][metric]``: a :class:`PairedDifference` against the
        baseline, for every method but the baseline.
    """

    baseline: str
    n_resamples: int
    confidence: float
    seed: int
    intervals: dict[str, dict[str, ConfidenceInterval]]
    differences: dict[str, dict[str, PairedDifference]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable; NaN becomes ``None``."""
        return {
            "baseline": self.baseline,
            "n_resamples": self.n_resamples,
            "confidence": self.confidence,
            "seed": self.seed,
            "interval": "percentile",
            "intervals": {
                method: {name: ci.to_dict() for name, ci in per.items()}
                for method, per in self.intervals.items()
            },
            "differences": {
                method: {name: d.to_dict() for name, d in per.items()}
                for method, per in self.differences.items()
            },
        }


def _resample_blocks(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Yield blocks of bootstrap index rows, shape (b, n), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    block = max(1, min(n_resamples, _BOOTSTRAP_BLOCK // n))
    dtype = np.int32 if n < 2**31 else np.int64
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        yield rng.integers(0, n, size=(b, n), dtype=dtype)
        done += b


def _bootstrap_values(
    y_true: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    groups: np.ndarray,
    *,
    privileged: int,
    num_classes: int,
    n_resamples: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Per-resample values, ``{method: array (len(BOOTSTRAP_METRICS), n_resamples)}``.

    Only known-group samples are resampled (unknown ones affect no metric). A resample
    needs only one-vs-rest counts per (group, class). Each sample gets an integer code
    once; per resample, the multiplicity of every sample (one ``bincount`` of the drawn
    indices, shared by all methods) weights one more ``bincount`` of the codes per
    method. That reads the codes sequentially instead of gathering them at random,
    and costs about ``n`` operations per method and resample.
    """
    known = groups != UNKNOWN_GROUP
    g, yt = groups[known], y_true[known]
    n = g.shape[0]
    k = num_classes
    pos_code = g * k + yt
    # (group, predicted class, correct?) → predicted counts and true positives in one pass.
    pred_codes = {
        name: (g * k + yp[known]) * 2 + (yp[known] == yt) for name, yp in predictions.items()
    }
    out = {name: np.empty((len(BOOTSTRAP_METRICS), n_resamples)) for name in predictions}
    start = 0
    for idx in _resample_blocks(n, n_resamples, seed):
        b = idx.shape[0]
        weights = np.empty((b, n))
        positives = np.empty((b, 2 * k))
        for r in range(b):
            weights[r] = np.bincount(idx[r], minlength=n)
            positives[r] = np.bincount(pos_code, weights=weights[r], minlength=2 * k)
        positives = positives.reshape(b, 2, k)
        split = np.empty((b, 4 * k))
        for name, code in pred_codes.items():
            for r in range(b):
                split[r] = np.bincount(code, weights=weights[r], minlength=4 * k)
            counts = split.reshape(b, 2, k, 2)
            m = _metrics_from_counts(positives, counts.sum(axis=-1), counts[..., 1], privileged)
            values = out[name][:, start : start + b]
            values[0] = m["eopp0"]
            values[1] = m["eopp1"]
            values[2] = m["eodd"]
            values[3] = m["precision"].mean(axis=-1)  # NaN if a group was drawn empty
            values[4] = m["recall"].mean(axis=-1)
            values[5] = m["accuracy"].mean(axis=-1)
        start += b
    return out


def _percentile_interval(
    values: np.ndarray, confidence: float
) -> tuple[float, float, float, int]:
    """``(low, high, mean, undefined count)`` of the defined (non-NaN) values."""
    defined = values[~np.isnan(values)]
    undefined = int(values.size - defined.size)
    if defined.size == 0:
        return math.nan, math.nan, math.nan, undefined
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(defined, [tail, 1.0 - tail])
    return float(low), float(high), float(defined.mean()), undefined


def bootstrap_metrics(
    y_true: Any,
    predictions: Mapping[str, Any],
    groups: Any,
    *,
    baseline: str,
    privileged: int = 1,
    num_classes: int | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapMetrics:
    """Bootstrap confidence intervals of EOpp0/EOpp1/EOdd and Avg. precision/recall/accuracy.

    Test samples (those of known group) are resampled with replacement ``n_resamples``
    times; every method is scored on the same resampled indices, so its difference from
    ``baseline`` is a paired bootstrap. Intervals are percentile intervals. A difference
    whose interval contains 0 is marked not significant. The fairness gaps average
    absolute values, so resampling biases them upward; see
    :attr:`ConfidenceInterval.mean`.

    Parameters
    ----------
    y_true : array-like of int, shape (n,)
        True class ids of the test samples.
    predictions : mapping of str to array-like of int, shape (n,)
        Predicted class ids per method, e.g. ``{"vanilla": ..., "fairlrf": ...}``.
    groups : array-like of int, shape (n,)
        Group ids 0/1, −1 for unknown (not resampled, affects no metric).
    baseline : str
        The key of ``predictions`` to take differences against.
    privileged : {0, 1}, default 1
        Id of the privileged group.
    num_classes : int, optional
        K; default the largest label over ``y_true`` and all predictions, plus one.
    n_resamples : int, default 1000
        Number of bootstrap resamples.
    confidence : float, default 0.95
        Interval coverage, strictly between 0 and 1.
    seed : int, default 0
        Seed of the resampling: same inputs and seed, same result.

    Returns
    -------
    BootstrapMetrics
        Point values and intervals per method, paired differences with significance.
    """
    privileged = _check_privileged(privileged)
    num_classes = _check_num_classes(num_classes)
    _check_options(predictions, baseline, n_resamples, confidence, seed)
    yt, g, preds, k = _checked_ids(y_true, predictions, groups, num_classes)
    point_values = {
        name: _point_values(yt, p, g, privileged=privileged, num_classes=k)
        for name, p in preds.items()
    }
    samples = _bootstrap_values(
        yt, preds, g, privileged=privileged, num_classes=k, n_resamples=n_resamples,
        seed=int(seed),
    )
    intervals = {
        name: _intervals(point_values[name], samples[name], confidence) for name in preds
    }
    differences = {
        name: _paired_differences(
            point_values[name], point_values[baseline], samples[name], samples[baseline],
            confidence,
        )
        for name in preds
        if name != baseline
    }
    return BootstrapMetrics(
        baseline=baseline,
        n_resamples=n_resamples,
        confidence=float(confidence),
        seed=int(seed),
        intervals=intervals,
        differences=differences,
    )


def _check_options(
    predictions: Any, baseline: str, n_resamples: Any, confidence: Any, seed: Any
) -> None:
    """Predictions a non-empty mapping holding the baseline; resamples, confidence and
    seed in range."""
    if not isinstance(predictions, Mapping) or not predictions:
        raise FairDeployError(
            "predictions must be a non-empty mapping of method name to predicted labels"
        )
    if baseline not in predictions:
        raise FairDeployError(
            f"baseline={baseline!r} is not among the predictions ({sorted(predictions)}): "
            "name one of them"
        )
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise FairDeployError(f"n_resamples={n_resamples!r} is not allowed: use an int ≥ 1")
    if not isinstance(confidence, int | float) or not 0.0 < confidence < 1.0:
        raise FairDeployError(
            f"confidence={confidence!r} is outside (0, 1): use e.g. 0.95 for 95 % intervals"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise FairDeployError(f"seed={seed!r} is not an integer")


def _checked_ids(
    y_true: Any, predictions: Mapping[str, Any], groups: Any, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], int]:
    """Labels, groups and every method's predictions as checked id arrays of one length,
    and the number of classes K."""
    yt = _as_id_array(y_true, "y_true")
    g = _as_id_array(groups, "groups")
    preds = {
        str(name): _as_id_array(values, f"predictions[{name!r}]")
        for name, values in predictions.items()
    }
    named = {f"predictions[{name!r}]": p for name, p in preds.items()}
    _check_lengths({"y_true": yt, "groups": g, **named})
    _check_labels(yt, "y_true", num_classes)
    for name, p in preds.items():
        _check_labels(p, f"predictions[{name!r}]", num_classes)
    _check_groups(g)
    return yt, g, preds, _infer_num_classes(num_classes, yt, *preds.values())


def _point_values(
    yt: np.ndarray, yp: np.ndarray, g: np.ndarray, *, privileged: int, num_classes: int
) -> tuple[float, ...]:
    """The :data:`BOOTSTRAP_METRICS` of one method on the full test set, in that order."""
    m = group_metrics(yt, yp, g, privileged=privileged, num_classes=num_classes)
    return (
        m.eopp0, m.eopp1, m.eodd, m.precision_avg, m.recall_avg, float(np.mean(m.accuracy))
    )


def _intervals(
    point: tuple[float, ...], samples: np.ndarray, confidence: float
) -> dict[str, ConfidenceInterval]:
    """Per metric, the point value and the percentile interval of its resampled values."""
    out = {}
    for i, metric in enumerate(BOOTSTRAP_METRICS):
        low, high, mean, undefined = _percentile_interval(samples[i], confidence)
        out[metric] = ConfidenceInterval(
            value=point[i],
            low=low,
            high=high,
            mean=mean,
            undefined_resamples=undefined,
        )
    return out


def _paired_differences(
    point: tuple[float, ...], base_point: tuple[float, ...], samples: np.ndarray,
    base_samples: np.ndarray, confidence: float,
) -> dict[str, PairedDifference]:
    """Per metric, method − baseline on the full test set and the percentile interval of
    the per-resample differences (same resampled indices for both)."""
    out = {}
    for i, metric in enumerate(BOOTSTRAP_METRICS):
        paired = samples[i] - base_samples[i]
        low, high, _, undefined = _percentile_interval(paired, confidence)
        out[metric] = PairedDifference(
            value=point[i] - base_point[i],
            low=low,
            high=high,
            # NaN bounds compare False: an undefined interval is never significant.
            significant=bool(low > 0.0 or high < 0.0),
            undefined_resamples=undefined,
        )
    return out
