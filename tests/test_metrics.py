"""group_metrics / privileged_group against hand-built confusion counts, fairlearn and sklearn."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from fairlearn.metrics import MetricFrame, false_positive_rate, true_positive_rate
from sklearn.metrics import precision_recall_fscore_support

from fairdeploy.errors import FairDeployError
from fairdeploy.metrics import group_metrics, privileged_group

# ---------------------------------------------------------------- hand-built example
# Three classes. Unknown-group sample last (true 0, predicted 2): it must change nothing.
#   group 0: true [0, 0, 1, 1, 2], predicted [0, 1, 1, 1, 0]
#   group 1: true [0, 1, 1, 2, 2], predicted [0, 1, 2, 2, 2]
Y_TRUE = np.array([0, 0, 1, 1, 2, 0, 1, 1, 2, 2, 0])
Y_PRED = np.array([0, 1, 1, 1, 0, 0, 1, 2, 2, 2, 2])
GROUPS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1])

# Counted by hand from the lists above, one-vs-rest per class (row = group id).
#   group 0: class 0 TP 1/2 pos, FP 1/3 neg (the true-2 sample predicted 0)
#            class 1 TP 2/2,      FP 1/3 (a true-0 predicted 1);  class 2 TP 0/1, FP 0/4
#   group 1: class 0 TP 1/1, FP 0/4;  class 1 TP 1/2, FP 0/3;
#            class 2 TP 2/2, FP 1/3 (a true-1 predicted 2)
HAND_TPR = np.array([[1 / 2, 1, 0], [1, 1 / 2, 1]])
HAND_FPR = np.array([[1 / 3, 1 / 3, 0], [0, 0, 1 / 3]])
# Privileged = 1: ΔTPR = [1/2, −1/2, 1], ΔFPR = [−1/3, −1/3, 1/3].
HAND_EOPP1 = (1 / 2 + 1 / 2 + 1) / 3  # 2/3
HAND_EOPP0 = (1 / 3 + 1 / 3 + 1 / 3) / 3  # 1/3
HAND_EODD_SUM = abs(1 / 2 - 1 / 3) + abs(-1 / 2 - 1 / 3) + abs(1 + 1 / 3)  # 7/3
HAND_EODD = HAND_EODD_SUM / 3 / 2  # 7/18
# Macro precision over classes present (group 0: class 2 never predicted → precision 0).
HAND_PRECISION = ((1 / 2 + 2 / 3 + 0) / 3, (1 + 1 + 2 / 3) / 3)
HAND_RECALL = ((1 / 2 + 1 + 0) / 3, (1 + 1 / 2 + 1) / 3)
# Per-class F1 = 2TP / (positives + predicted).
HAND_F1 = (
    (2 * 1 / (2 + 2) + 2 * 2 / (2 + 3) + 0) / 3,
    (2 * 1 / (1 + 1) + 2 * 1 / (2 + 1) + 2 * 2 / (2 + 3)) / 3,
)


def test_hand_built_rates_and_fairness():
    m = group_metrics(Y_TRUE, Y_PRED, GROUPS, group_names=("light", "dark"))
    np.testing.assert_allclose(m.tpr, HAND_TPR, atol=1e-12)
    np.testing.assert_allclose(m.fpr, HAND_FPR, atol=1e-12)
    np.testing.assert_allclose(m.tnr, 1 - HAND_FPR, atol=1e-12)
    assert m.eopp1 == pytest.approx(HAND_EOPP1)
    assert m.eopp0 == pytest.approx(HAND_EOPP0)
    assert m.eodd == pytest.approx(HAND_EODD)
    assert m.eopp1_sum == pytest.approx(2.0)
    assert m.eopp0_sum == pytest.approx(1.0)
    assert m.eodd_sum == pytest.approx(HAND_EODD_SUM)
    assert m.tpr_gap == pytest.approx(HAND_EOPP1)
    assert m.fpr_gap == pytest.approx(1 / 3)
    assert m.counts == (5, 5)
    assert m.unknown_count == 1
    assert m.num_classes == 3
    assert m.classes_left_out == {"tpr": 0, "fpr": 0, "eodd": 0}
    assert m.accuracy == pytest.approx((3 / 5, 4 / 5))


def test_hand_built_precision_recall_f1():
    m = group_metrics(Y_TRUE, Y_PRED, GROUPS)
    assert m.precision == pytest.approx(HAND_PRECISION)
    assert m.recall == pytest.approx(HAND_RECALL)
    assert m.f1 == pytest.approx(HAND_F1)
    assert m.precision_avg == pytest.approx(sum(HAND_PRECISION) / 2)
    assert m.precision_diff == pytest.approx(abs(HAND_PRECISION[0] - HAND_PRECISION[1]))
    assert m.recall_avg == pytest.approx(sum(HAND_RECALL) / 2)
    assert m.recall_diff == pytest.approx(abs(HAND_RECALL[0] - HAND_RECALL[1]))
    assert m.f1_avg == pytest.approx(sum(HAND_F1) / 2)
    assert m.f1_diff == pytest.approx(abs(HAND_F1[0] - HAND_F1[1]))


def test_macro_averages_only_classes_present_in_the_group():
    # Group 0 has only classes 0 and 1 (true and predicted); class 2 occurs in group 1
    # only. sklearn's default labels leave class 2 out of group 0's macro average.
    y_true = np.array([0, 1, 1, 0, 2, 2])
    y_pred = np.array([0, 1, 0, 0, 2, 1])
    groups = np.array([0, 0, 0, 1, 1, 1])
    m = group_metrics(y_true, y_pred, groups, num_classes=4)
    # group 0: class 0 precision 1/2 recall 1; class 1 precision 1 recall 1/2.
    assert m.precision[0] == pytest.approx((1 / 2 + 1) / 2)
    assert m.recall[0] == pytest.approx((1 + 1 / 2) / 2)
    # group 1: classes 0, 1 (predicted only), 2 → precision (1 + 0 + 1)/3, recall (1+0+1/2)/3.
    assert m.precision[1] == pytest.approx(2 / 3)
    assert m.recall[1] == pytest.approx(1.5 / 3)


# ---------------------------------------------------------------- fairlearn / sklearn


def _random_case(seed: int, n: int, k: int, unknown: float = 0.1):
    """Labels, group-dependent noisy predictions (group 0 worse), groups with unknowns."""
    rng = np.random.default_rng(seed)
    # Skewed class frequencies so rare classes and absent classes occur.
    probs = rng.dirichlet(np.full(k, 0.7))
    y_true = rng.choice(k, size=n, p=probs)
    groups = rng.integers(0, 2, size=n)
    groups[rng.random(n) < unknown] = -1
    correct = rng.random(n) < np.where(groups == 0, 0.55, 0.8)
    y_pred = np.where(correct, y_true, rng.integers(0, k, size=n))
    return y_true, y_pred, groups


@pytest.mark.parametrize(("seed", "n", "k"), [(0, 400, 2), (1, 600, 5), (2, 300, 12)])
def test_rates_match_fairlearn_metricframe(seed, n, k):
    y_true, y_pred, groups = _random_case(seed, n, k)
    m = group_metrics(y_true, y_pred, groups, num_classes=k)
    known = groups != -1
    yt, yp, g = y_true[known], y_pred[known], groups[known]
    ref_tpr = np.full((2, k), np.nan)
    ref_fpr = np.full((2, k), np.nan)
    for c in range(k):
        frame = MetricFrame(
            metrics={"tpr": true_positive_rate, "fpr": false_positive_rate},
            y_true=(yt == c).astype(int),
            y_pred=(yp == c).astype(int),
            sensitive_features=g,
        )
        for gid in (0, 1):
            # fairlearn reports 0 where a rate is undefined; we report NaN and leave it out.
            if np.any((yt == c) & (g == gid)):
                ref_tpr[gid, c] = frame.by_group.loc[gid, "tpr"]
            if np.any((yt != c) & (g == gid)):
                ref_fpr[gid, c] = frame.by_group.loc[gid, "fpr"]
    np.testing.assert_allclose(m.tpr, ref_tpr, atol=1e-12)
    np.testing.assert_allclose(m.fpr, ref_fpr, atol=1e-12)

    # Fairness from fairlearn's rates, privileged = 1, NaN classes left out.
    d_tpr = ref_tpr[1] - ref_tpr[0]
    d_fpr = ref_fpr[1] - ref_fpr[0]
    assert m.eopp1 == pytest.approx(np.nanmean(np.abs(d_tpr)))
    assert m.eopp0 == pytest.approx(np.nanmean(np.abs(d_fpr)))
    assert m.eodd == pytest.approx(np.nanmean(np.abs(d_tpr + d_fpr)) / 2)
    assert m.classes_left_out["tpr"] == int(np.isnan(d_tpr).sum())
    assert m.classes_left_out["fpr"] == int(np.isnan(d_fpr).sum())
    assert m.classes_left_out["eodd"] == int(np.isnan(d_tpr + d_fpr).sum())


@pytest.mark.parametrize(("seed", "n", "k"), [(3, 400, 2), (4, 600, 6), (5, 250, 15)])
def test_precision_recall_f1_match_sklearn_macro(seed, n, k):
    y_true, y_pred, groups = _random_case(seed, n, k)
    m = group_metrics(y_true, y_pred, groups, num_classes=k)
    for gid in (0, 1):
        sel = groups == gid
        p, r, f, _ = precision_recall_fscore_support(
            y_true[sel], y_pred[sel], average="macro", zero_division=0
        )
        assert m.precision[gid] == pytest.approx(p, abs=1e-12)
        assert m.recall[gid] == pytest.approx(r, abs=1e-12)
        assert m.f1[gid] == pytest.approx(f, abs=1e-12)
        assert m.accuracy[gid] == pytest.approx(np.mean(y_true[sel] == y_pred[sel]))


# ---------------------------------------------------------------- conventions, edge cases


@pytest.mark.parametrize("seed", [6, 7, 8])
def test_sum_convention_is_mean_times_defined_classes(seed):
    k = 9
    y_true, y_pred, groups = _random_case(seed, 150, k)
    m = group_metrics(y_true, y_pred, groups, num_classes=k + 2)  # two absent classes
    left = m.classes_left_out
    assert left["tpr"] >= 2  # the absent classes have no positives anywhere
    assert m.eopp1_sum == pytest.approx(m.eopp1 * (m.num_classes - left["tpr"]))
    assert m.eopp0_sum == pytest.approx(m.eopp0 * (m.num_classes - left["fpr"]))
    assert m.eodd_sum == pytest.approx(2 * m.eodd * (m.num_classes - left["eodd"]))


def test_class_without_positives_in_a_group_is_left_out_and_counted():
    # Class 2 has no positives in group 0 (it is predicted there once, wrongly).
    y_true = np.array([0, 1, 1, 0, 0, 1, 2, 2])
    y_pred = np.array([0, 1, 2, 0, 1, 1, 2, 0])
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    m = group_metrics(y_true, y_pred, groups)
    assert math.isnan(m.tpr[0, 2])
    assert not math.isnan(m.tpr[1, 2])
    assert m.classes_left_out == {"tpr": 1, "fpr": 0, "eodd": 1}
    # By hand: TPR g0 = [1, 1/2, -], g1 = [1/2, 1, 1/2]; mean over classes 0 and 1 only.
    assert m.eopp1 == pytest.approx((1 / 2 + 1 / 2) / 2)
    # FPR g0 = [0/2, 0/1, 1/3 (a true-1 predicted 2)];
    #     g1 = [1/3 (a true-2 predicted 0), 1/4 (a true-0 predicted 1), 0/3].
    np.testing.assert_allclose(m.fpr, [[0, 0, 1 / 3], [1 / 3, 1 / 4, 0]], atol=1e-12)
    assert m.eopp0 == pytest.approx((1 / 3 + 1 / 4 + 1 / 3) / 3)
    # EOdd over classes 0, 1: |(-1/2) + 1/3| and |1/2 + 1/4|.
    assert m.eodd == pytest.approx((1 / 6 + 3 / 4) / 2 / 2)
    assert json.loads(json.dumps(m.to_dict(), allow_nan=False))["groups"][0]["tpr"][2] is None


def test_absent_classes_from_num_classes():
    m = group_metrics(Y_TRUE, Y_PRED, GROUPS, num_classes=5)
    assert m.classes_left_out == {"tpr": 2, "fpr": 0, "eodd": 2}
    assert m.eopp1 == pytest.approx(HAND_EOPP1)  # unchanged: classes 3, 4 left out
    assert m.eodd == pytest.approx(HAND_EODD)
    assert m.eopp0 == pytest.approx(1.0 / 5)  # classes 3, 4 have FPR 0 in both groups


def test_no_defined_class_gives_nan_and_json_none():
    # Each group holds one class only: all of TPR is undefined in the other group.
    m = group_metrics([0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1])
    assert m.classes_left_out["tpr"] == 2
    assert math.isnan(m.eopp1) and math.isnan(m.eodd)
    out = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert out["fairness"]["eopp1"] is None


def test_unknown_group_is_excluded_and_counted():
    y_true, y_pred, groups = _random_case(9, 300, 4, unknown=0.0)
    base = group_metrics(y_true, y_pred, groups, num_classes=4)
    rng = np.random.default_rng(1)
    extra = 57
    yt = np.concatenate([y_true, rng.integers(0, 4, extra)])
    yp = np.concatenate([y_pred, rng.integers(0, 4, extra)])
    g = np.concatenate([groups, np.full(extra, -1)])
    perm = rng.permutation(yt.size)
    with_unknown = group_metrics(yt[perm], yp[perm], g[perm], num_classes=4)
    assert base.unknown_count == 0 and with_unknown.unknown_count == extra
    assert with_unknown.counts == base.counts
    a, b = base.to_dict(), with_unknown.to_dict()
    a.pop("unknown_count")
    b.pop("unknown_count")
    assert a == b


def test_privileged_swap_symmetry():
    y_true, y_pred, groups = _random_case(10, 500, 5)
    m1 = group_metrics(y_true, y_pred, groups, privileged=1)
    m0 = group_metrics(y_true, y_pred, groups, privileged=0)
    for name in ("eopp0", "eopp1", "eodd", "eopp0_sum", "eopp1_sum", "eodd_sum", "fpr_gap"):
        assert getattr(m0, name) == pytest.approx(getattr(m1, name))
    assert m0.precision == m1.precision and m0.unprivileged == 1
    # Relabel the groups (0 ↔ 1) and name the same group privileged: per-group values
    # swap places, fairness is unchanged.
    swapped = np.where(groups == -1, -1, 1 - groups)
    ms = group_metrics(y_true, y_pred, swapped, privileged=0)
    assert ms.precision == m1.precision[::-1]
    assert ms.counts == m1.counts[::-1]
    np.testing.assert_array_equal(ms.tpr, m1.tpr[::-1])
    assert ms.eodd == pytest.approx(m1.eodd) and ms.eopp1 == pytest.approx(m1.eopp1)


def test_binary_identities():
    # Both classes are scored one-vs-rest: TPR_1 = TNR_0, so EOpp0 = EOpp1 and
    # EOdd = |ΔTPR_1 − ΔTPR_0| / 2.
    y_true, y_pred, groups = _random_case(11, 400, 2)
    m = group_metrics(y_true, y_pred, groups)
    assert m.num_classes == 2
    np.testing.assert_allclose(m.tpr[:, 1], m.tnr[:, 0], atol=1e-12)
    assert m.eopp0 == pytest.approx(m.eopp1)
    d = m.tpr[1] - m.tpr[0]
    assert m.eodd == pytest.approx(abs(d[1] - d[0]) / 2)


def test_torch_tensors_and_lists_give_the_same_result():
    ref = group_metrics(Y_TRUE, Y_PRED, GROUPS).to_dict()
    t = group_metrics(torch.tensor(Y_TRUE), torch.tensor(Y_PRED), torch.tensor(GROUPS))
    lists = group_metrics(Y_TRUE.tolist(), Y_PRED.tolist(), GROUPS.tolist())
    assert t.to_dict() == ref and lists.to_dict() == ref


def test_to_dict_is_strict_json_and_names_groups():
    m = group_metrics(Y_TRUE, Y_PRED, GROUPS, privileged=0, group_names=("light", "dark"))
    out = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert [g["name"] for g in out["groups"]] == ["light", "dark"]
    assert [g["privileged"] for g in out["groups"]] == [True, False]
    assert out["fairness"]["eopp1"] == pytest.approx(HAND_EOPP1)
    assert out["fairness_sum"]["eodd"] == pytest.approx(HAND_EODD_SUM)
    assert out["groups"][1]["fpr"] == pytest.approx(HAND_FPR[1].tolist())
    assert out["unknown_count"] == 1


def test_result_is_immutable():
    m = group_metrics(Y_TRUE, Y_PRED, GROUPS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.eopp1 = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        m.tpr[0, 0] = 0.0


# ---------------------------------------------------------------- privileged_group


def test_privileged_group_is_the_higher_macro_recall():
    # Hand-built: recall 1/2 (group 0) < 5/6 (group 1).
    assert privileged_group(Y_TRUE, Y_PRED, GROUPS) == 1
    swapped = np.where(GROUPS == -1, -1, 1 - GROUPS)
    assert privileged_group(Y_TRUE, Y_PRED, swapped) == 0


def test_privileged_group_tie_is_one_and_ignores_unknown():
    # Both groups perfectly predicted; the unknown sample is wrong and must not matter.
    assert privileged_group([0, 1, 0, 1, 1], [0, 1, 0, 1, 0], [0, 0, 1, 1, -1]) == 1


# ---------------------------------------------------------------- errors


def test_empty_group_names_the_group():
    with pytest.raises(FairDeployError, match=r"group 'dark' \(id 1\) has no samples"):
        group_metrics([0, 1, 1], [0, 1, 0], [0, 0, -1], group_names=("light", "dark"))
    with pytest.raises(FairDeployError, match=r"group 'group 0' \(id 0\) has no samples"):
        privileged_group([0, 1], [0, 1], [1, 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"y_pred": np.array([0.2, 0.8, 0.5])}, r"y_pred must hold integer ids, got dtype float"),
        ({"y_pred": np.zeros((3, 2), dtype=int)}, r"argmax"),
        ({"y_true": np.array([0, 1])}, r"differ in length"),
        ({"groups": np.array([0, 2, 1])}, r"groups holds the id\(s\) \[2\]"),
        ({"y_true": np.array([0, -1, 1])}, r"y_true holds the label -1"),
        ({"num_classes": 2, "y_pred": np.array([0, 1, 2])}, r"label 2 but num_classes=2"),
        ({"num_classes": 1}, r"num_classes=1 is too small"),
        ({"privileged": 2}, r"privileged=2 is not a group id"),
        ({"group_names": ("a", "a")}, r"group_names=.* two distinct strings"),
        ({"y_true": np.array([], dtype=int)}, r"y_true is empty"),
    ],
)
def test_bad_input_raises_fairdeploy_error(kwargs, message):
    args = {"y_true": np.array([0, 1, 1]), "y_pred": np.array([0, 1, 0])}
    args["groups"] = np.array([0, 1, 1])
    args.update(kwargs)
    y_true, y_pred, groups = args.pop("y_true"), args.pop("y_pred"), args.pop("groups")
    with pytest.raises(FairDeployError, match=message):
        group_metrics(y_true, y_pred, groups, **args)
