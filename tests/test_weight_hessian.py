"""Hessian diagonals of dense Linear/Conv2d weights, against autograd and brute force."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fairdeploy.errors import FairDeployError
from fairdeploy.features import split_model
from fairdeploy.scoring import HessianApproximationWarning
from fairdeploy.weight_hessian import (
    dense_layers,
    group_weight_hessians,
    resolve_layers,
    weight_hessian_diag,
)

D64 = torch.float64
N = 23  # with batch_size 7: chunks of 7, 7, 7 and an uneven last chunk of 2


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def _conv_net() -> nn.Module:
    """Conv trunk (zero padding, reflect padding, stride, dilation, groups) + MLP head,
    in-place ReLUs, max pooling: piecewise linear everywhere."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=2),
        nn.ReLU(),
        nn.Conv2d(4, 3, 2, stride=2, dilation=1, bias=False),
        nn.LeakyReLU(0.1),
        nn.Conv2d(3, 2, 2, padding=1, dilation=2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 5),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(5, 3),
    ).double()


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(5, 4), nn.ReLU(),
        nn.Linear(4, 3),
    ).double()


def _token_net() -> nn.Module:
    """A Linear applied to every token of a sample: the weight is shared across rows."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), _Mean(), nn.Linear(5, 3)).double()


def _data(shape: tuple[int, ...], n: int = N, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=D64)
    return x, torch.randint(0, classes, (n,), generator=g)


def _autograd_diag(model: nn.Module, names: list[str], x, y) -> dict[str, torch.Tensor]:
    """Diagonal of the full autograd Hessian of the mean CE, parameter by parameter."""
    net = copy.deepcopy(model).eval()
    params = dict(net.named_parameters())
    out = {}
    for name in names:
        p = params[name].detach()

        def loss(flat, name=name, p=p):
            return F.cross_entropy(functional_call(net, {name: flat.view_as(p)}, (x,)), y)

        out[name] = torch.autograd.functional.hessian(loss, p.flatten()).diagonal().view_as(p)
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert a.shape == b.shape and a.dtype == torch.float64
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item() + 1e-14, (err, b.abs().max().item())


ALL_CONV = [f"{i}.{k}" for i in (0, 3, 7) for k in ("weight", "bias")] + ["5.weight"]
ALL_FC = [f"{i}.{k}" for i in (9, 12) for k in ("weight", "bias")]


@pytest.mark.parametrize(
    ("builder", "shape", "names"),
    [
        (_mlp, (6,), ["0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias"]),
        (_conv_net, (2, 8, 8), ALL_CONV + ALL_FC),
        (_token_net, (3, 4), ["0.weight", "0.bias", "3.weight"]),
    ],
    ids=["mlp", "conv", "tokens"],
)
@pytest.mark.filterwarnings("ignore::fairdeploy.scoring.HessianApproximationWarning")  # _Mean
def test_exact_matches_autograd_hessian(builder, shape, names):
    model = builder()
    x, y = _data(shape)
    got = weight_hessian_diag(model, names, x, y, batch_size=7)
    ref = _autograd_diag(model, names, x, y)
    assert list(got) == names
    for name in names:
        _close(got[name], ref[name])
        assert got[name].abs().max() > 0


def test_accumulation_is_the_mean_over_all_samples():
    # The known pitfall: keeping only the last sample or chunk. Chunk sizes 1, 7 and N
    # must agree, and equal the mean of the per-sample Hessians computed one by one.
    model = _mlp()
    x, y = _data((6,))
    names = ["0.weight", "3.bias"]
    whole = weight_hessian_diag(model, names, x, y, batch_size=N)
    for bs in (1, 7):
        part = weight_hessian_diag(model, names, x, y, batch_size=bs)
        for n in names:
            _close(part[n], whole[n], 1e-12)
    one_by_one = [weight_hessian_diag(model, names, x[i : i + 1], y[i : i + 1]) for i in range(N)]
    for n in names:
        _close(whole[n], torch.stack([h[n] for h in one_by_one]).mean(0), 1e-12)


def test_head_on_features_equals_full_model_on_images():
    # The same classifier weights scored in the whole model (fed images) and in the head
    # (fed the trunk's output, as the feature cache would provide it).
    model = _conv_net()
    x, y = _data((2, 8, 8))
    trunk, head = split_model(model.eval(), "9")  # the pipeline's cut (torch.fx)
    with torch.no_grad():
        feats = trunk(x)
    full = weight_hessian_diag(model, ["9.weight", "12.bias"], x, y)
    part = weight_hessian_diag(head, ["9.weight", "12.bias"], feats, y)  # names are kept
    _close(part["9.weight"], full["9.weight"], 1e-12)
    _close(part["12.bias"], full["12.bias"], 1e-12)


def _per_sample_sq_grads(model, names, x, labels):
    """Brute force: per-sample gradients of CE by torch.func, squared."""
    net = copy.deepcopy(model).eval()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(net, {**params, **p}, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))({n: params[n] for n in names}, x, labels)
    return {n: g[n] ** 2 for n in names}


def test_fisher_is_the_mean_squared_per_sample_gradient():
    model = _conv_net()
    x, y = _data((2, 8, 8))
    names = ["0.weight", "3.bias", "9.weight", "12.weight"]
    got = weight_hessian_diag(model, names, x, y, estimator="fisher", batch_size=7)
    ref = _per_sample_sq_grads(model, names, x, y)
    for n in names:
        _close(got[n], ref[n].mean(0), 1e-10)


def test_ggn_mc_is_unbiased_and_its_error_is_measured():
    # Conv layers: the cheaper estimators against exact. ggn_mc with many draws is
    # close to exact (unbiased, variance ∝ 1/draws); fisher is a different quantity.
    model = _conv_net()
    x, y = _data((2, 8, 8), n=40)
    names = ["0.weight", "3.weight", "9.weight"]
    exact = weight_hessian_diag(model, names, x, y)

    def rel(est):
        return max(((est[n] - exact[n]).norm() / exact[n].norm()).item() for n in names)

    err_4 = rel(weight_hessian_diag(model, names, x, y, estimator="ggn_mc", mc_samples=4))
    err_400 = rel(weight_hessian_diag(model, names, x, y, estimator="ggn_mc", mc_samples=400))
    assert err_400 < 0.05  # measured 0.012 (1 draw: 0.24, 4 draws: 0.10; fisher: 0.16)
    assert err_400 < err_4 / 3  # 1/√100 of the 4-draw error in expectation
    again = weight_hessian_diag(model, names, x, y, estimator="ggn_mc", mc_samples=4)
    assert rel(again) == err_4  # seeded: same draws


def test_non_piecewise_linear_after_layer_warns():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = _data((4,))
    with pytest.warns(HessianApproximationWarning, match=r"'0'.*Tanh"):
        weight_hessian_diag(model, ["0.weight"], x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weight_hessian_diag(model, ["2.weight"], x, y)  # only Linear after it: no warning


def test_group_hessians_are_per_group_means():
    model = _mlp()
    x, y = _data((6,))
    groups = torch.tensor([0, 1, -1] * 7 + [1, 0])
    got = group_weight_hessians(model, ["3.weight"], x, y, groups)
    for gid in (0, 1):
        idx = groups == gid
        ref = _autograd_diag(model, ["3.weight"], x[idx], y[idx])
        _close(got[gid]["3.weight"], ref["3.weight"])
    with pytest.raises(FairDeployError, match="group 2 has no samples"):
        group_weight_hessians(model, ["3.weight"], x, y, groups, group_ids=(0, 2))


def test_caller_model_is_untouched_and_float32_works():
    model = _conv_net().float().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data((2, 8, 8))
    out = weight_hessian_diag(model, ["3.weight", "9.weight"], x.float(), y)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert out["3.weight"].dtype == D64 and out["3.weight"].shape == model[3].weight.shape
    ref = weight_hessian_diag(_conv_net(), ["3.weight", "9.weight"], x, y)
    for n in out:
        _close(out[n], ref[n], 1e-4)


def test_layers_and_errors():
    model = _conv_net()
    assert dense_layers(model) == ["0", "3", "5", "7", "9", "12"]
    assert resolve_layers(model, "all") == ("0", "3", "5", "7", "9", "12")
    assert resolve_layers(model, ["12", "0"]) == ("12", "0")
    for bad, msg in [
        ("first", "layers='first' is not allowed; use 'all'"),
        (["1"], "layer '1' is a ReLU in the model; allowed: the qualified name of an nn.Linear"),
        (["0", "0"], "layers lists '0' twice"),
        (["nope"], "layer 'nope' is not found"),
        ([], "layers is an empty list"),
    ]:
        with pytest.raises(FairDeployError, match=msg.replace("(", r"\(")):
            resolve_layers(model, bad)
    x, y = _data((2, 8, 8))
    with pytest.raises(FairDeployError, match=r"parameter '1\.weight' is not the weight or bias"):
        weight_hessian_diag(model, ["1.weight"], x, y)
    with pytest.raises(FairDeployError, match=r"parameter '5\.bias'"):  # Conv2d(bias=False)
        weight_hessian_diag(model, ["5.bias"], x, y)
    with pytest.raises(FairDeployError, match=r"targets contains 3; allowed: .* \[0, 3\)"):
        weight_hessian_diag(model, ["0.weight"], x, y + 1)
    with pytest.raises(FairDeployError, match="estimator='hutchinson' is unknown"):
        weight_hessian_diag(model, ["0.weight"], x, y, estimator="hutchinson")


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


def test_shared_layer_is_refused():
    x, y = _data((3,))
    with pytest.raises(FairDeployError, match="layer 'fc' is called 2 times"):
        weight_hessian_diag(_Twice().double(), ["fc.weight"], x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = _conv_net()
    x, y = _data((2, 8, 8))
    names = ["0.weight", "3.weight", "9.weight", "12.bias"]
    for est in ("exact", "ggn_mc"):
        cpu = weight_hessian_diag(model, names, x, y, estimator=est, mc_samples=3)
        gpu = weight_hessian_diag(model.cuda(), names, x, y, estimator=est, mc_samples=3)
        model.cpu()
        for n in names:
            assert gpu[n].device.type == "cuda"
            _close(gpu[n].cpu(), cpu[n], 1e-9)  # same draws: they are made on the CPU


class _FrozenInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.out = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.body(x)
        return self.out(torch.relu(h))


def test_layer_without_autograd_is_refused():
    x, y = _data((3,))
    with pytest.raises(FairDeployError, match="layer 'body' runs without autograd"):
        weight_hessian_diag(_FrozenInside().double(), ["body.weight"], x, y)
