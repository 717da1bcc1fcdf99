"""bootstrap_metrics: per-resample values against group_metrics, determinism, pairing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fairdeploy.errors import FairDeployError
from fairdeploy.metrics import BOOTSTRAP_METRICS, bootstrap_metrics, group_metrics
from fairdeploy.metrics._bootstrap import _bootstrap_values, _resample_blocks


def _case(seed: int = 0, n: int = 1500, k: int = 4):
    """Labels, groups (some unknown), a biased 'vanilla' and a fair, better 'fixed'.

    vanilla is right 60 % of the time on group 0 and 92 % on group 1; fixed is right
    90 % on both. Wrong predictions are uniform over the other classes.
    """
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, size=n)
    groups = rng.integers(0, 2, size=n)
    groups[rng.random(n) < 0.05] = -1

    def predict(acc0: float, acc1: float) -> np.ndarray:
        right = rng.random(n) < np.where(groups == 0, acc0, acc1)
        wrong = (y_true + rng.integers(1, k, size=n)) % k
        return np.where(right, y_true, wrong)

    return y_true, {"vanilla": predict(0.6, 0.92), "fixed": predict(0.9, 0.9)}, groups


def test_resample_values_match_group_metrics_on_the_resampled_data():
    y_true, preds, groups = _case(n=300)
    k, n_resamples, seed = 4, 7, 3
    values = _bootstrap_values(
        y_true, preds, groups, privileged=1, num_classes=k, n_resamples=n_resamples, seed=seed
    )
    known = groups != -1
    idx = np.concatenate(list(_resample_blocks(int(known.sum()), n_resamples, seed)))
    assert idx.shape == (n_resamples, known.sum())
    for name, pred in preds.items():
        for b in range(n_resamples):
            rows = idx[b]
            m = group_metrics(
                y_true[known][rows], pred[known][rows], groups[known][rows], num_classes=k
            )
            expected = [
                m.eopp0, m.eopp1, m.eodd, m.precision_avg, m.recall_avg, np.mean(m.accuracy)
            ]
            np.testing.assert_allclose(values[name][:, b], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("block", [1, 400])  # one resample per block; two per block
def test_blocks_do_not_change_the_values(monkeypatch, block):
    # How the resamples are split over index blocks (a memory bound) must not change
    # the values; n is odd here so 32-bit draws do not pair up evenly.
    y_true, preds, groups = _case(n=200)
    y_true, groups = y_true[1:], groups[1:]
    preds = {name: p[1:] for name, p in preds.items()}
    assert (groups != -1).sum() % 2 == 1
    kwargs = {"privileged": 1, "num_classes": 4, "n_resamples": 9, "seed": 5}
    whole = _bootstrap_values(y_true, preds, groups, **kwargs)
    import fairdeploy.metrics._bootstrap as metrics

    monkeypatch.setattr(metrics, "_BOOTSTRAP_BLOCK", block)
    blocked = _bootstrap_values(y_true, preds, groups, **kwargs)
    for name in preds:
        np.testing.assert_array_equal(whole[name], blocked[name])


def test_deterministic_for_a_seed():
    y_true, preds, groups = _case()
    a = bootstrap_metrics(y_true, preds, groups, baseline="vanilla", n_resamples=200, seed=1)
    b = bootstrap_metrics(y_true, preds, groups, baseline="vanilla", n_resamples=200, seed=1)
    c = bootstrap_metrics(y_true, preds, groups, baseline="vanilla", n_resamples=200, seed=2)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()


def test_point_values_and_intervals():
    y_true, preds, groups = _case()
    result = bootstrap_metrics(
        y_true, preds, groups, baseline="vanilla", n_resamples=400, seed=0
    )
    for name, pred in preds.items():
        m = group_metrics(y_true, pred, groups)
        # Accuracy by hand: the share of right predictions in each group, then the mean.
        acc = [np.mean(pred[groups == g] == y_true[groups == g]) for g in (0, 1)]
        expected = {"eopp0": m.eopp0, "eopp1": m.eopp1, "eodd": m.eodd,
                    "avg_precision": m.precision_avg, "avg_recall": m.recall_avg,
                    "avg_accuracy": np.mean(acc)}
        for metric in BOOTSTRAP_METRICS:
            ci = result.intervals[name][metric]
            assert ci.value == pytest.approx(expected[metric])
            assert ci.undefined_resamples == 0
            assert ci.low < ci.high
    # A real gap (vanilla) and accuracy: the interval holds the point estimate.
    for metric in BOOTSTRAP_METRICS:
        ci = result.intervals["vanilla"][metric]
        assert ci.low <= ci.value <= ci.high
    ci = result.intervals["fixed"]["avg_precision"]
    assert ci.low <= ci.value <= ci.high


def test_interval_is_the_percentile_of_the_resampled_values():
    y_true, preds, groups = _case(n=400)
    result = bootstrap_metrics(
        y_true, preds, groups, baseline="vanilla", n_resamples=50, confidence=0.8, seed=4
    )
    values = _bootstrap_values(
        y_true, preds, groups, privileged=1, num_classes=4, n_resamples=50, seed=4
    )
    for i, metric in enumerate(BOOTSTRAP_METRICS):
        ci = result.intervals["fixed"][metric]
        assert (ci.low, ci.high) == pytest.approx(np.quantile(values["fixed"][i], [0.1, 0.9]))
        assert ci.mean == pytest.approx(values["fixed"][i].mean())
        diff = result.differences["fixed"][metric]
        paired = values["fixed"][i] - values["vanilla"][i]
        assert (diff.low, diff.high) == pytest.approx(np.quantile(paired, [0.1, 0.9]))


def test_method_against_itself_is_exactly_zero_and_not_significant():
    y_true, preds, groups = _case()
    same = {"vanilla": preds["vanilla"], "copy": preds["vanilla"].copy()}
    result = bootstrap_metrics(y_true, same, groups, baseline="vanilla", n_resamples=200)
    assert set(result.differences) == {"copy"}
    for metric in BOOTSTRAP_METRICS:
        d = result.differences["copy"][metric]
        assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0)
        assert d.significant is False


def test_clearly_fairer_method_is_significant():
    y_true, preds, groups = _case()
    result = bootstrap_metrics(y_true, preds, groups, baseline="vanilla", n_resamples=300)
    for metric in ("eopp1", "eodd"):
        d = result.differences["fixed"][metric]
        assert d.significant is True
        assert d.low <= d.value <= d.high < 0  # fairer: the gap shrinks
    d = result.differences["fixed"]["avg_precision"]
    assert d.significant is True and d.low > 0


def test_small_noise_change_is_not_significant():
    # Flip two predictions of the baseline: a change far inside the resampling noise.
    y_true, preds, groups = _case()
    nudged = preds["vanilla"].copy()
    nudged[:2] = (nudged[:2] + 1) % 4
    result = bootstrap_metrics(
        y_true, {"vanilla": preds["vanilla"], "nudged": nudged}, groups,
        baseline="vanilla", n_resamples=300,
    )
    for metric in BOOTSTRAP_METRICS:
        d = result.differences["nudged"][metric]
        assert d.low <= 0.0 <= d.high and d.significant is False


def test_unknown_group_samples_do_not_change_the_result():
    y_true, preds, groups = _case(n=600)
    known = groups != -1
    kw = {"baseline": "vanilla", "n_resamples": 100, "seed": 7, "num_classes": 4}
    full = bootstrap_metrics(y_true, preds, groups, **kw)
    only_known = bootstrap_metrics(
        y_true[known], {k: v[known] for k, v in preds.items()}, groups[known], **kw
    )
    assert full.to_dict() == only_known.to_dict()


def test_to_dict_is_strict_json():
    y_true, preds, groups = _case(n=300)
    result = bootstrap_metrics(y_true, preds, groups, baseline="vanilla", n_resamples=20)
    out = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert out["baseline"] == "vanilla" and out["n_resamples"] == 20
    assert set(out["intervals"]) == {"vanilla", "fixed"}
    assert set(out["differences"]["fixed"]["eodd"]) >= {"value", "low", "high", "significant"}


def test_group_drawn_empty_is_left_out_and_counted():
    # Group 0 has a single sample: about 1/e of the resamples miss it entirely.
    y_true = np.array([0, 1, 0, 1, 1, 0, 1, 0, 1, 1])
    groups = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    preds = {"a": y_true.copy(), "b": 1 - y_true}
    result = bootstrap_metrics(y_true, preds, groups, baseline="a", n_resamples=200)
    undefined = result.intervals["a"]["avg_precision"].undefined_resamples
    assert 40 < undefined < 110
    assert result.differences["b"]["eopp1"].undefined_resamples >= undefined


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"baseline": "nope"}, r"baseline='nope' is not among the predictions"),
        ({"confidence": 1.0}, r"confidence=1.0 is outside \(0, 1\)"),
        ({"n_resamples": 0}, r"n_resamples=0 is not allowed"),
        ({"predictions": {}}, r"non-empty mapping"),
        ({"predictions": {"vanilla": np.array([0, 1])}}, r"differ in length"),
        ({"groups": np.array([1, 1, 1])}, r"group 'group 0' \(id 0\) has no samples"),
    ],
)
def test_bad_input_raises_fairdeploy_error(kwargs, message):
    args = {
        "y_true": np.array([0, 1, 1]),
        "predictions": {"vanilla": np.array([0, 1, 0])},
        "groups": np.array([0, 1, 1]),
        "baseline": "vanilla",
    }
    args.update(kwargs)
    with pytest.raises(FairDeployError, match=message):
        bootstrap_metrics(
            args.pop("y_true"), args.pop("predictions"), args.pop("groups"), **args
        )
