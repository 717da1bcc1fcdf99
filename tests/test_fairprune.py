"""FairPrune: exact counts, the lowest saliencies (brute force), ties, purity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _tiny_nets import small_conv_net
from torch import nn

from fairdeploy.errors import FairDeployError
from fairdeploy.fairprune import fairprune, fairprune_saliency
from fairdeploy.weight_hessian import group_weight_hessians
from fairdeploy.weight_selection import fraction_count, lowest_entries


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


LAYERS = ["0", "4", "6"]


def _random_hessians(model: nn.Module, seed: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        gid: {
            f"{n}.weight": torch.rand(model.get_submodule(n).weight.shape, generator=g,
                                      dtype=torch.float64)
            for n in LAYERS
        }
        for gid in (0, 1)
    }


def _saliency_np(model, hessians, beta):
    """The saliency, written out independently in numpy."""
    out = {}
    for n in LAYERS:
        w = model.get_submodule(n).weight.detach().double().numpy()
        h0 = hessians[0][f"{n}.weight"].numpy()
        h1 = hessians[1][f"{n}.weight"].numpy()
        out[n] = 0.5 * w**2 * (h0 - beta * h1)
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.35, 0.5, 1.0])
def test_layer_scope_prunes_the_lowest_saliency_per_layer(ratio):
    model = small_conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hess = _random_hessians(model)
    res = fairprune(model, hess, prune_ratio=ratio, beta=3 / 7)
    sal = _saliency_np(model, hess, 3 / 7)
    for n in LAYERS:
        w0 = before[f"{n}.weight"].numpy()
        w1 = res.model.get_submodule(n).weight.detach().numpy()
        mask = res.masks[n].numpy()
        assert mask.shape == w0.shape and mask.dtype == bool
        assert mask.sum() == res.counts[n] == math.floor(ratio * w0.size)
        # Brute force: no kept weight has a lower saliency than a pruned one.
        if 0 < mask.sum() < mask.size:
            assert sal[n][mask].max() <= sal[n][~mask].min()
        assert (w1[mask] == 0).all() and (w1[~mask] == w0[~mask]).all()
        # Biases are never pruned.
        assert torch.equal(res.model.get_submodule(n).bias, before[f"{n}.bias"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # pure
    assert res.theoretical_cr == 1.0 and not res.model.training


def test_global_scope_prunes_the_lowest_saliency_over_all_layers():
    model = small_conv_net()
    hess = _random_hessians(model)
    res = fairprune(model, hess, prune_ratio=0.3, beta=0.5, scope="global")
    sal = _saliency_np(model, hess, 0.5)
    allsal = np.concatenate([sal[n].ravel() for n in LAYERS])
    allmask = np.concatenate([res.masks[n].numpy().ravel() for n in LAYERS])
    assert allmask.sum() == res.total_pruned == math.floor(0.3 * allsal.size)
    assert allsal[allmask].max() <= allsal[~allmask].min()
    # Different layers give different fractions (what makes "global" differ).
    assert len({round(res.counts[n] / res.sizes[n], 3) for n in LAYERS}) > 1


def test_ties_are_broken_by_position():
    scores = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    lay = lowest_entries(scores, 0.5, scope="layer")
    assert lay["a"].flatten().tolist() == [True, True, True, False, False, False]
    assert lay["b"].tolist() == [True, True, False, False]
    glob = lowest_entries(scores, 0.5, scope="global")  # 5 of 10: the first five of "a"
    assert glob["a"].flatten().tolist() == [True] * 5 + [False] and not glob["b"].any()
    glob = lowest_entries({"b": scores["b"], "a": scores["a"]}, 0.5, scope="global")
    assert glob["b"].all() and glob["a"].flatten().tolist() == [True] + [False] * 5


@pytest.mark.parametrize("seed", range(5))
def test_selection_with_many_ties_matches_a_stable_sort(seed):
    # Brute force: numpy's stable argsort, first k. Scores from few values: many ties,
    # -inf markers (FairQuantize's earlier entries) included.
    rng = np.random.default_rng(seed)
    s = rng.integers(-3, 4, size=(7, 11)).astype(np.float64)
    s[rng.random(s.shape) < 0.1] = -np.inf
    for frac in (0.0, 0.13, 0.5, 0.77, 1.0):
        k = math.floor(frac * s.size)
        ref = np.zeros(s.size, dtype=bool)
        ref[np.argsort(s.ravel(), kind="stable")[:k]] = True
        got = lowest_entries({"w": torch.from_numpy(s)}, frac)["w"]
        assert np.array_equal(got.numpy().ravel(), ref)


def test_counts_floor_exactly():
    assert fraction_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert fraction_count(5 / 9, 9) == 5 and fraction_count(0.1, 45_000_007) == 4_500_000
    m = lowest_entries({"w": torch.arange(100.0)}, 0.29)
    assert int(m["w"].sum()) == 29


def test_end_to_end_with_real_hessians_is_deterministic():
    model = small_conv_net()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, 6, 6, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    groups = torch.arange(40) % 2
    hess = group_weight_hessians(model, [f"{n}.weight" for n in LAYERS], x, y, groups)
    a = fairprune(model, hess, prune_ratio=0.4, beta=1 / 3)
    b = fairprune(model, hess, prune_ratio=0.4, beta=1 / 3)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in LAYERS)
    sal = fairprune_saliency(model, hess, beta=1 / 3)
    assert all(sal[n].dtype == torch.float64 for n in LAYERS)
    # A subset of layers leaves the others untouched.
    c = fairprune(model, hess, prune_ratio=0.4, beta=1 / 3, layers=["6"])
    assert list(c.masks) == ["6"]
    assert torch.equal(c.model[0].weight, model[0].weight)


def test_errors():
    model = small_conv_net()
    hess = _random_hessians(model)
    with pytest.raises(FairDeployError, match=r"prune_ratio=1\.5 is not allowed"):
        fairprune(model, hess, prune_ratio=1.5, beta=0.5)
    with pytest.raises(FairDeployError, match="scope='row' is unknown"):
        fairprune(model, hess, prune_ratio=0.5, beta=0.5, scope="row")
    with pytest.raises(FairDeployError, match="beta=nan is invalid"):
        fairprune(model, hess, prune_ratio=0.5, beta=float("nan"))
    del hess[1]["4.weight"]
    with pytest.raises(FairDeployError, match=r"hessians\[1\] has no entry '4\.weight'"):
        fairprune(model, hess, prune_ratio=0.5, beta=0.5)
    hess = _random_hessians(model)
    hess[0]["0.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FairDeployError, match="contains NaN or inf"):
        fairprune(model, hess, prune_ratio=0.5, beta=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = small_conv_net().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    groups = torch.arange(40) % 2
    names = [f"{n}.weight" for n in LAYERS]
    cpu = fairprune(model, group_weight_hessians(model, names, x, y, groups),
                    prune_ratio=0.4, beta=1 / 3)
    gpu_model = model.cuda()
    gpu = fairprune(gpu_model, group_weight_hessians(gpu_model, names, x, y, groups),
                    prune_ratio=0.4, beta=1 / 3)
    for n in LAYERS:
        assert torch.equal(gpu.masks[n].cpu(), cpu.masks[n])
        assert gpu.model.get_submodule(n).weight.device.type == "cuda"


def test_nan_scores_are_refused():
    with pytest.raises(FairDeployError, match="layer 'w' has NaN or \\+inf scores"):
        lowest_entries({"w": torch.tensor([0.0, float("nan")])}, 0.5)
    with pytest.raises(FairDeployError, match="layer 'w' has NaN or \\+inf scores"):
        lowest_entries({"w": torch.tensor([0.0, float("inf")])}, 0.5)
