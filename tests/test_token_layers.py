"""Linear layers on token tensors (batch × tokens × features): the factorized layer,
the exact per-group Hessians (per sample, summed over the tokens' contributions) and the
Fisher estimator, against autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import FactorizationWarning, factorize
from fairdeploy.scoring import hessian_diag

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


class _TokenHead(nn.Module):
    """tokens (n, 5, 6) → fc (6→7) → ReLU → residual-free pooling → classifier: a head
    that is piecewise linear after ``fc`` (so the Gauss–Newton diagonal is exact)."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 7)
        self.act = nn.ReLU()
        self.cls = nn.Linear(7 if pool != "flat" else 35, 3)
        self.pool = pool

    def forward(self, x):
        h = self.act(self.fc(x))
        if self.pool == "mean":
            h = h.mean(1)
        elif self.pool == "first":
            h = h[:, 0]
        else:
            h = h.flatten(1)
        return self.cls(h)


def _head(pool: str, rank: int = 3) -> nn.Module:
    torch.manual_seed(3)
    head = _TokenHead(pool).to(D64).eval()
    head.fc = factorize(head.fc, rank)
    return head


def _data(n: int = 11):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, 6, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


def _loss_of(head, key, x, y):
    p = dict(head.named_parameters())[f"fc.{key}"].detach()

    def loss(flat):
        return F.cross_entropy(functional_call(head, {f"fc.{key}": flat.view_as(p)}, (x,)), y)

    return loss, p


@pytest.mark.parametrize("pool", ["mean", "first", "flat"])
def test_token_hessians_equal_autograd(pool):
    head = _head(pool)
    x, y = _data()
    ref = copy.deepcopy(head)
    got = hessian_diag(head, "fc", x, y, batch_size=4)
    for key in ("U", "V"):
        loss, p = _loss_of(ref, key, x, y)
        want = torch.autograd.functional.hessian(loss, p.flatten()).diagonal().view_as(p)
        err = (got[key] - want).abs() / want.abs().clamp_min(1e-12)
        assert err.max().item() <= 1e-6, (key, err.max().item())
        assert want.abs().max() > 1e-4  # not vacuous


def test_token_fisher_equals_mean_squared_per_sample_gradients():
    head = _head("mean")
    x, y = _data()
    got = hessian_diag(head, "fc", x, y, estimator="fisher", batch_size=3)
    params = {k: v.detach() for k, v in head.named_parameters()}

    def sample_loss(p, xi, yi):
        out = functional_call(head, {**params, **p}, (xi[None],))
        return F.cross_entropy(out, yi[None])

    per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(
        {"fc.U": params["fc.U"], "fc.V": params["fc.V"]}, x, y
    )
    for key in ("U", "V"):
        want = (per[f"fc.{key}"] ** 2).mean(0)
        torch.testing.assert_close(got[key], want, rtol=1e-9, atol=1e-14)


def test_token_ggn_mc_is_unbiased_for_the_exact_diagonal():
    head = _head("first")
    x, y = _data(6)
    exact = hessian_diag(head, "fc", x, y)
    mc = hessian_diag(head, "fc", x, y, estimator="ggn_mc", mc_samples=4000, seed=1)
    for key in ("U", "V"):
        rel = (mc[key] - exact[key]).norm() / exact[key].norm()
        assert rel < 0.1, (key, rel.item())


def test_factorized_layer_on_tokens_equals_the_dense_layer_at_full_rank():
    torch.manual_seed(0)
    dense = nn.Linear(6, 7).to(D64)
    with pytest.warns(FactorizationWarning, match="break-even"):
        fact = factorize(dense, 6)
    x = torch.randn(2, 5, 6, dtype=D64)
    torch.testing.assert_close(fact(x), dense(x))


def test_slr_a_activation_sums_over_samples_and_tokens():
    from fairdeploy.lrf import activation_abs_sums

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.GELU(), nn.Flatten(), nn.Linear(35, 3)).eval()
    x = torch.randn(4, 5, 6)
    got_in, got_out = activation_abs_sums(model, "0", [x[:3], x[3:]])
    with torch.no_grad():
        want_out = F.gelu(model[0](x)).abs().sum((0, 1))
    torch.testing.assert_close(got_in, x.abs().sum((0, 1)).double())
    torch.testing.assert_close(got_out, want_out.double(), rtol=1e-6, atol=1e-6)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise OSError("no RssAnon")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux only")
def test_cached_features_are_memory_mapped_not_held(tmp_path):
    """A feature-cache hit maps the file (pages are read on demand and can be evicted)
    instead of copying 32 MB of cached token tensors into the process's memory."""
    from fairdeploy.cache import FeatureCache
    from fairdeploy.features import FeatureSet

    cache = FeatureCache(tmp_path)
    n = 32
    fs = FeatureSet(torch.randn(n, 256, 1024), torch.zeros(n, dtype=torch.long),
                    torch.zeros(n, dtype=torch.long))
    cache.get_or_compute({"k": 1}, lambda: fs)
    before = _rss_anon()
    hit, was_hit = cache.get_or_compute({"k": 1}, lambda: fs)
    grown = _rss_anon() - before
    assert was_hit and torch.equal(hit.features[-1], fs.features[-1])
    assert grown < 8 * 2**20, f"anonymous memory grew by {grown / 2**20:.0f} MiB"
    hit.features[0, 0, 0] = 1e9  # copy-on-write: the file is not changed
    again, _ = cache.get_or_compute({"k": 1}, lambda: fs)
    assert again.features[0, 0, 0] == fs.features[0, 0, 0]


class _SequenceFirstHead(nn.Module):
    """A head that turns (N, T, E) into sequence-first (T, N, E) before the layer."""

    def __init__(self, rank: int = 3) -> None:
        super().__init__()
        self.fc = factorize(nn.Linear(5, 4), rank)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x.transpose(0, 1)).mean(0))


@pytest.mark.parametrize("tokens", [3, 4])
def test_a_sequence_first_layer_input_is_refused_even_when_its_length_equals_the_probe(tokens):
    """The scoring probe takes 4 samples: with T = 4 tokens the first axis looked like the
    samples and the 'exact' diagonals were 3.5× and 4.7× off."""
    torch.manual_seed(0)
    head = _SequenceFirstHead().double().eval()
    x = torch.randn(20, tokens, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    with pytest.raises(FairDeployError, match=r"with the samples on the first axis"):
        hessian_diag(head, "fc", x, y)
