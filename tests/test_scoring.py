"""Hessian diagonals for FairLRF scoring, checked against autograd and brute force."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.scoring import (
    HessianApproximationWarning,
    _prepare_head,
    entry_scores,
    group_hessians,
    hessian_diag,
    scoring_indices,
)

D64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors gain nothing from a second thread, and on a busy 2-core machine
    # OpenMP's spinning threads make every small op wait: one thread, restored after.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

N = 23  # with batch_size 7: chunks of 7, 7, 7 and an uneven last chunk of 2


def _fl(din: int, dout: int, k: int, seed: int, dtype: torch.dtype = D64) -> FactorizedLinear:
    g = torch.Generator().manual_seed(seed)
    return FactorizedLinear(
        torch.randn(din, k, generator=g, dtype=dtype),
        torch.rand(k, generator=g, dtype=dtype) + 0.5,
        torch.randn(k, dout, generator=g, dtype=dtype),
        0.5 * torch.randn(dout, generator=g, dtype=dtype),
    )


def _lin(din: int, dout: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(din, dout).double()


class _SkipHead(nn.Module):
    """Not a plain chain: functional ops, max-pool, a skip path from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = _lin(6, 6, 1)
        self.fl = _fl(6, 8, 3, seed=2)
        self.pool = nn.MaxPool1d(2)
        self.out = _lin(4, 3, 3)
        self.skip = _lin(6, 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fl(F.relu(self.pre(x)))
        h = self.pool(F.leaky_relu(h, 0.1).unsqueeze(1)).squeeze(1)
        return self.out(h) + self.skip(x)


class _InplaceScaleHead(nn.Module):
    """A plain-looking chain whose activation is rescaled in place between modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fl = _fl(6, 5, 3, seed=5)
        self.act = nn.LeakyReLU(0.1)  # its backward reads its input, not its output
        self.out = _lin(5, 3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fl(x))
        h.mul_(2.0)  # same tensor object, new values: the fast path must not be taken
        return self.out(h)


# name -> (builder, layer, input width, fast path expected)
HEADS = {
    "relu_dropout_linear": (
        lambda: nn.Sequential(_fl(6, 5, 3, 0), nn.ReLU(), nn.Dropout(0.5), _lin(5, 3, 1)),
        "0",
        6,
        True,
    ),
    "two_layers_after": (
        lambda: nn.Sequential(
            _fl(6, 5, 3, 0), nn.ReLU(inplace=True), _lin(5, 4, 1), nn.ReLU(), _lin(4, 3, 2)
        ),
        "0",
        6,
        False,
    ),
    "layer_is_last": (lambda: nn.Sequential(_fl(6, 3, 2, 0)), "0", 6, True),
    "leaky_relu": (
        lambda: nn.Sequential(_fl(6, 5, 3, 0), nn.LeakyReLU(0.2), _lin(5, 3, 1)),
        "0",
        6,
        True,
    ),
    "nested_with_layer_before": (
        lambda: nn.Sequential(
            OrderedDict(
                body=nn.Sequential(_lin(7, 6, 1), nn.ReLU()),
                classifier=nn.Sequential(
                    nn.Dropout(0.3), _fl(6, 5, 3, 0), nn.ReLU(inplace=True), _lin(5, 3, 2)
                ),
            )
        ),
        "classifier.1",
        7,
        True,
    ),
    "skip_maxpool_functional": (_SkipHead, "fl", 6, False),
    "inplace_rescale": (_InplaceScaleHead, "fl", 6, False),
}


def _data(width: int, n: int = N, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g, dtype=D64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _autograd_diag(head: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor):
    """Diagonal of the full autograd Hessian of the mean CE w.r.t. U, then V."""
    model = copy.deepcopy(head).eval()
    params = dict(model.named_parameters())
    out = {}
    for key in ("U", "V"):
        name = f"{layer}.{key}"
        p = params[name].detach()

        def loss(flat: torch.Tensor, name: str = name, p: torch.Tensor = p) -> torch.Tensor:
            return F.cross_entropy(functional_call(model, {name: flat.view_as(p)}, (x,)), y)

        hess = torch.autograd.functional.hessian(loss, p.flatten())
        out[key] = hess.diagonal().view_as(p)
    return out


def _assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == torch.float64
    # Relative to each entry, with a floor far below any non-zero entry here.
    err = (actual - expected).abs() / expected.abs().clamp_min(1e-12)
    assert err.max().item() <= rtol, f"max relative error {err.max().item():.3g}"


# ----------------------------------------------------------------------------- exact


_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("batch_size", [N, 7])
@pytest.mark.parametrize("fast", [True, False])
def test_exact_matches_autograd_hessian(name: str, batch_size: int, fast: bool) -> None:
    build, layer, width, _ = HEADS[name]
    head = build()
    x, y = _data(width)
    if name not in _REFERENCE:  # the heads are deterministic: one autograd run per head
        _REFERENCE[name] = _autograd_diag(head, layer, x, y)
    ref = _REFERENCE[name]
    assert ref["U"].abs().max() > 0 and ref["V"].abs().max() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", HessianApproximationWarning)  # all heads are PL
        got = hessian_diag(head, layer, x, y, batch_size=batch_size, fast=fast)
    assert set(got) == {"U", "V"}
    _assert_rel(got["U"], ref["U"])
    _assert_rel(got["V"], ref["V"])


@pytest.mark.parametrize("name", sorted(HEADS))
def test_fast_path_detection(name: str) -> None:
    build, layer, width, expect_fast = HEADS[name]
    x, _ = _data(width, n=4)
    h = _prepare_head(build(), layer, x)
    assert (h.chain is not None) == expect_fast


def test_fast_path_agrees_with_generic_on_wider_head() -> None:
    head = nn.Sequential(_fl(10, 12, 4, 7), nn.ReLU(), nn.Dropout(0.2), _lin(12, 7, 8))
    x, y = _data(10, n=40, classes=7)
    assert _prepare_head(head, "0", x[:4]).chain is not None
    fast = hessian_diag(head, "0", x, y, batch_size=9)
    generic = hessian_diag(head, "0", x, y, batch_size=9, fast=False)
    for key in ("U", "V"):
        torch.testing.assert_close(fast[key], generic[key], rtol=1e-10, atol=1e-14)


def test_accumulation_is_true_mean_over_all_chunks() -> None:
    build, layer, width, _ = HEADS["two_layers_after"]
    head = build()
    x, y = _data(width)
    full = hessian_diag(head, layer, x, y, batch_size=7)
    first = hessian_diag(head, layer, x[:12], y[:12], batch_size=7)
    second = hessian_diag(head, layer, x[12:], y[12:], batch_size=7)
    last_chunk = hessian_diag(head, layer, x[21:], y[21:])  # what batch 7 sees last
    last_sample = hessian_diag(head, layer, x[-1:], y[-1:])
    for key in ("U", "V"):
        weighted = (12 * first[key] + 11 * second[key]) / N
        torch.testing.assert_close(full[key], weighted, rtol=1e-12, atol=1e-15)
        # A "keep the last chunk / last sample" accumulator would return these instead.
        assert not torch.allclose(full[key], last_chunk[key], rtol=1e-3)
        assert not torch.allclose(full[key], last_sample[key], rtol=1e-3)
        # Chunking does not change the mean.
        one_chunk = hessian_diag(head, layer, x, y, batch_size=N)
        torch.testing.assert_close(full[key], one_chunk[key], rtol=1e-12, atol=1e-15)


def test_dropout_and_train_mode_do_not_change_result_or_caller() -> None:
    with_dropout = nn.Sequential(_fl(6, 5, 3, 0), nn.ReLU(), nn.Dropout(0.9), _lin(5, 3, 1))
    without = nn.Sequential(_fl(6, 5, 3, 0), nn.ReLU(), _lin(5, 3, 1))
    x, y = _data(6)
    with_dropout.train()
    before = {k: v.clone() for k, v in with_dropout.named_parameters()}
    flags = [p.requires_grad for p in with_dropout.parameters()]
    for fast in (True, False):
        a = hessian_diag(with_dropout, "0", x, y, batch_size=5, fast=fast)
        b = hessian_diag(without, "0", x, y, batch_size=5, fast=fast)
        for key in ("U", "V"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=0)
    # The caller's module keeps its mode, weights and requires_grad flags.
    assert all(m.training for m in with_dropout.modules())
    after = dict(with_dropout.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in with_dropout.parameters()] == flags
    assert isinstance(with_dropout[0], FactorizedLinear)


def test_float32_model_matches_float64_and_returns_float64() -> None:
    head64 = nn.Sequential(_fl(6, 5, 3, 0), nn.ReLU(), _lin(5, 3, 1))
    head32 = copy.deepcopy(head64).float()
    x, y = _data(6)
    for fast in (True, False):
        h32 = hessian_diag(head32, "0", x.float(), y, batch_size=7, fast=fast)
        h64 = hessian_diag(head64, "0", x, y, batch_size=7, fast=fast)
        for key in ("U", "V"):
            assert h32[key].dtype == torch.float64
            torch.testing.assert_close(h32[key], h64[key], rtol=1e-4, atol=1e-6)


def test_non_piecewise_linear_head_warns_and_gives_gauss_newton() -> None:
    head = nn.Sequential(_fl(6, 5, 3, 0), nn.Sigmoid(), _lin(5, 3, 1))
    x, y = _data(6)
    with pytest.warns(HessianApproximationWarning, match="Sigmoid"):
        got = hessian_diag(head, "0", x, y, batch_size=7)
    model = copy.deepcopy(head).eval()
    hess = _autograd_diag(head, "0", x, y)
    for key in ("U", "V"):
        name = f"0.{key}"
        p = dict(model.named_parameters())[name].detach()
        jac = torch.autograd.functional.jacobian(
            lambda flat, name=name, p=p: functional_call(model, {name: flat.view_as(p)}, (x,)),
            p.flatten(),
        )  # (N, C, P)
        prob = torch.softmax(model(x), -1).detach()
        lam = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        ggn = torch.einsum("ncp,ncd,ndp->p", jac, lam, jac) / N
        _assert_rel(got[key], ggn.view_as(p))
        # The GGN is not the Hessian here: the test above could tell them apart.
        assert not torch.allclose(got[key], hess[key], rtol=1e-3)


# ----------------------------------------------------------------------- fisher, MC


@pytest.mark.parametrize("name", ["relu_dropout_linear", "skip_maxpool_functional"])
def test_fisher_matches_per_sample_gradient_loop(name: str) -> None:
    build, layer, width, _ = HEADS[name]
    head = build()
    x, y = _data(width)
    model = copy.deepcopy(head).eval()
    names = [f"{layer}.U", f"{layer}.V"]
    params = {n: p for n, p in model.named_parameters() if n in names}
    sq = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(N):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads, strict=True):
            sq[n] += g**2
    got = hessian_diag(head, layer, x, y, estimator="fisher", batch_size=5)
    for key, n in zip(("U", "V"), names, strict=True):
        _assert_rel(got[key], sq[n] / N, rtol=1e-9)


def test_ggn_mc_is_seeded_and_converges_to_exact() -> None:
    build, layer, width, _ = HEADS["two_layers_after"]
    head = build()
    x, y = _data(width)
    a = hessian_diag(head, layer, x, y, estimator="ggn_mc", mc_samples=3, seed=4, batch_size=7)
    b = hessian_diag(head, layer, x, y, estimator="ggn_mc", mc_samples=3, seed=4, batch_size=7)
    c = hessian_diag(head, layer, x, y, estimator="ggn_mc", mc_samples=3, seed=5, batch_size=7)
    assert all(torch.equal(a[k], b[k]) for k in ("U", "V"))
    assert not torch.equal(a["U"], c["U"])
    exact = hessian_diag(head, layer, x, y)
    many = hessian_diag(head, layer, x, y, estimator="ggn_mc", mc_samples=4000, seed=0)
    for key in ("U", "V"):
        rel = ((many[key] - exact[key]).norm() / exact[key].norm()).item()
        assert rel < 0.05, rel


# ----------------------------------------------------------------------------- errors


def _small():
    head = nn.Sequential(_fl(6, 5, 3, 0), nn.ReLU(), _lin(5, 3, 1))
    x, y = _data(6)
    return head, x, y


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": "9"}, "layer='9' is not found.*'0'"),
        ({"layer": "2"}, "layer='2' is a Linear"),
        ({"layer": ""}, "layer=''"),
        ({"estimator": "hutchinson"}, "estimator='hutchinson' is unknown"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"mc_samples": 0}, "mc_samples=0"),
        ({"targets": torch.zeros(5, dtype=torch.long)}, r"targets has shape \(5,\)"),
        ({"targets": torch.zeros(N)}, "dtype"),
        ({"targets": torch.full((N,), 3)}, r"targets contains 3.*\[0, 3\)"),
        ({"targets": torch.full((N,), -1)}, "targets contains -1"),
        ({"features": torch.zeros(0, 6, dtype=D64), "targets": torch.zeros(0)}, "N ≥ 1"),
        ({"head": lambda x: x}, "head is a function; allowed: a torch.nn.Module"),
    ],
)
def test_hessian_diag_rejects_bad_input(kwargs: dict, match: str) -> None:
    head, x, y = _small()
    call = {"head": head, "layer": "0", "features": x, "targets": y, **kwargs}
    pos = [call.pop(k) for k in ("head", "layer", "features", "targets")]
    with pytest.raises(FairDeployError, match=match):
        hessian_diag(*pos, **call)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fl = _fl(5, 5, 2, 0)
        self.unused = _fl(5, 5, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fl(torch.relu(self.fl(x)))


class _Sequence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fl = _fl(5, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fl(x.view(x.shape[0], 2, 5)).mean(1)


@pytest.mark.parametrize(
    ("head", "layer", "match"),
    [
        (_Twice(), "fl", "called 2 times"),
        (_Twice(), "unused", "never called"),
        (_Sequence(), "fl", r"input of shape \(\d+, 2, 5\)"),
    ],
)
def test_layer_must_be_called_once_on_rows(head: nn.Module, layer: str, match: str) -> None:
    x = torch.randn(N, 10 if isinstance(head, _Sequence) else 5, dtype=D64)
    y = torch.zeros(N, dtype=torch.long)
    with pytest.raises(FairDeployError, match=match):
        hessian_diag(head, layer, x, y)


# ----------------------------------------------------------------- groups, scoring sets


def test_group_hessians_equal_hessian_diag_on_each_group() -> None:
    head, x, y = _small()
    groups = torch.tensor([0, 1, -1] * 7 + [1, 0])
    got = group_hessians(head, "0", x, y, groups, batch_size=4)
    assert set(got) == {0, 1}
    for gid in (0, 1):
        idx = torch.nonzero(groups == gid).flatten()
        ref = _autograd_diag(head, "0", x[idx], y[idx])
        _assert_rel(got[gid]["U"], ref["U"])
        _assert_rel(got[gid]["V"], ref["V"])
    assert not torch.allclose(got[0]["U"], got[1]["U"])


def test_group_hessians_errors() -> None:
    head, x, y = _small()
    with pytest.raises(FairDeployError, match=r"group 1 has no samples.*\[-1, 0\]"):
        group_hessians(head, "0", x, y, np.array([0, -1] * 11 + [0]))
    with pytest.raises(FairDeployError, match="groups has 3 entries"):
        group_hessians(head, "0", x, y, [0, 1, 0])


def test_scoring_indices_balanced_seeded_sorted() -> None:
    rng = np.random.default_rng(3)
    groups = rng.choice([-1, 0, 1], size=500, p=[0.1, 0.3, 0.6])
    n0 = int((groups == 0).sum())
    sets = scoring_indices(groups, per_group=1024, seed=7)
    assert set(sets) == {0, 1}
    for gid, idx in sets.items():
        assert idx.dtype == np.int64 and idx.size == n0  # capped by the smaller group
        assert np.all(np.diff(idx) > 0)  # sorted, no repeats
        assert np.all(groups[idx] == gid)  # unknown (-1) never drawn
    np.testing.assert_array_equal(sets[0], np.flatnonzero(groups == 0))
    capped = scoring_indices(torch.as_tensor(groups), per_group=50, seed=7)
    assert capped[0].size == capped[1].size == 50
    again = scoring_indices(groups, per_group=50, seed=7)
    other = scoring_indices(groups, per_group=50, seed=8)
    assert all(np.array_equal(capped[g], again[g]) for g in (0, 1))
    assert not np.array_equal(capped[1], other[1])


def test_scoring_indices_errors() -> None:
    with pytest.raises(FairDeployError, match=r"group 1 has no samples.*\[-1, 0\]"):
        scoring_indices(np.array([0, 0, -1]))
    with pytest.raises(FairDeployError, match="per_group=0"):
        scoring_indices(np.array([0, 1]), per_group=0)
    with pytest.raises(FairDeployError, match=r"groups has shape \(2, 2\)"):
        scoring_indices(np.zeros((2, 2)))


def test_entry_scores_formula_and_errors() -> None:
    theta = torch.tensor([1.0, -2.0, 0.5])
    h0 = torch.tensor([3.0, 4.0, 1.0], dtype=D64)
    h1 = torch.tensor([1.0, 1.0, 2.0], dtype=D64)
    got = entry_scores(theta, h0, h1, beta=2.0)
    expected = torch.tensor([0.5 * 1 * (3 - 2), 0.5 * 4 * (4 - 2), 0.5 * 0.25 * (1 - 4)], dtype=D64)
    torch.testing.assert_close(got, expected)
    with pytest.raises(FairDeployError, match="one shared shape"):
        entry_scores(theta, h0[:2], h1, beta=1.0)
    with pytest.raises(FairDeployError, match="beta=nan"):
        entry_scores(theta, h0, h1, beta=float("nan"))


def test_memory_blocking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import fairdeploy.curvature as curvature

    head = nn.Sequential(_fl(10, 12, 4, 7), nn.ReLU(), _lin(12, 7, 8))
    x, y = _data(10, n=40, classes=7)
    ests = {"exact": {}, "fisher": {}, "ggn_mc": {"mc_samples": 5}}
    ref = {
        est: hessian_diag(head, "0", x, y, estimator=est, batch_size=9, **kw)
        for est, kw in ests.items()
    }
    ref_generic = hessian_diag(head, "0", x, y, batch_size=9, fast=False)
    # One class (or one draw) per block, and a Khatri-Rao product too big to keep.
    monkeypatch.setattr(curvature, "TEMP_ELEMENTS", 1)
    for est, kw in ests.items():
        got = hessian_diag(head, "0", x, y, estimator=est, batch_size=9, **kw)
        for key in ("U", "V"):
            torch.testing.assert_close(got[key], ref[est][key], rtol=1e-12, atol=1e-15)
    got = hessian_diag(head, "0", x, y, batch_size=9, fast=False)
    for key in ("U", "V"):
        torch.testing.assert_close(got[key], ref_generic[key], rtol=1e-12, atol=1e-15)

