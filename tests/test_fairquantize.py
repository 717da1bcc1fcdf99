"""FairQuantize: the int8 quantizer against numpy, exact fractions with the lowest
Δθ-scores (brute force), steps with fine-tuning that moves only float weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _tiny_nets import small_conv_net

from fairdeploy.errors import FairDeployError
from fairdeploy.fairquantize import (
    channel_scales,
    dequantize_per_channel,
    fairquantize,
    fairquantize_cr,
    planned_quantized_count,
    quantize_per_channel,
)
from fairdeploy.features import FeatureSet
from fairdeploy.models import build_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


LAYERS = ["0", "4", "6"]


def _data(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g), torch.arange(n) % 2


def _np_quant(w: np.ndarray, scale: np.ndarray | None = None):
    """Reference quantizer in numpy float32: scale = max|w_o|/127, clip(round(w/s))."""
    w = w.astype(np.float32)
    flat = w.reshape(w.shape[0], -1)
    if scale is None:
        scale = (np.abs(flat).max(1) / np.float32(127)).astype(np.float32)
        scale[scale == 0] = 1
    s = scale.reshape(-1, *([1] * (w.ndim - 1)))
    q = np.clip(np.round(w / s), -127, 127)  # numpy rounds half to even, as torch
    return q.astype(np.int8), scale, (q.astype(np.float32) * s).astype(np.float32)


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3, 3)])
def test_quantizer_matches_numpy(shape):
    g = torch.Generator().manual_seed(3)
    spread = torch.logspace(-3, 1, shape[0]).view(-1, *[1] * (len(shape) - 1))
    w = torch.randn(shape, generator=g) * spread  # channels of very different ranges
    w[1] = 0.0  # an all-zero channel: scale 1, values 0
    q, s = quantize_per_channel(w)
    q_np, s_np, dq_np = _np_quant(w.numpy())
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (shape[0],)
    assert np.array_equal(q.numpy(), q_np) and np.array_equal(s.numpy(), s_np)
    assert np.array_equal(dequantize_per_channel(q, s).numpy(), dq_np)
    assert s[1] == 1 and (q[1] == 0).all()
    # Every channel's largest magnitude maps to ±127; nothing exceeds the range.
    assert (q.reshape(shape[0], -1).abs().amax(1)[[0, 2, 3]] == 127).all()
    # With given (smaller) scales values clamp at ±127.
    q2, _ = quantize_per_channel(w, s / 4)
    q2_np, _, _ = _np_quant(w.numpy(), s.numpy() / 4)
    assert np.array_equal(q2.numpy(), q2_np) and q2.abs().max() == 127


def test_round_half_to_even():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5]])  # scale 1
    q, s = quantize_per_channel(w)
    assert s.item() == 1.0 and q.tolist() == [[127, 0, 2, 2, 0, -2]]


def _random_hessians(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {gid: {f"{n}.weight": torch.rand(model.get_submodule(n).weight.shape, generator=g,
                                            dtype=torch.float64) for n in LAYERS}
            for gid in (0, 1)}


def _scores_np(model, hessians, beta):
    out = {}
    for n in LAYERS:
        w = model.get_submodule(n).weight.detach().numpy()
        _, _, dq = _np_quant(w)
        d = dq.astype(np.float64) - w.astype(np.float64)
        out[n] = 0.5 * d**2 * (hessians[0][f"{n}.weight"].numpy()
                                - beta * hessians[1][f"{n}.weight"].numpy())
    return out


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_one_step_quantizes_exactly_the_lowest_scores(scope):
    model = small_conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y, g = _data()
    hess = _random_hessians(model)
    res = fairquantize(model, x, y, g, quantize_ratio=0.3, beta=5 / 9, scope=scope, hessians=hess)
    sc = _scores_np(model, hess, 5 / 9)
    masks = {n: res.masks[n].numpy() for n in LAYERS}
    if scope == "layer":
        for n in LAYERS:
            assert masks[n].sum() == res.counts[n] == math.floor(0.3 * masks[n].size)
            assert sc[n][masks[n]].max() <= sc[n][~masks[n]].min()
    else:
        alls = np.concatenate([sc[n].ravel() for n in LAYERS])
        allm = np.concatenate([masks[n].ravel() for n in LAYERS])
        assert allm.sum() == res.total_quantized == math.floor(0.3 * alls.size)
        assert alls[allm].max() <= alls[~allm].min()
    assert res.total_quantized == planned_quantized_count(model, 0.3, scope=scope)
    for n in LAYERS:
        w0 = before[f"{n}.weight"].numpy()
        w1 = res.model.get_submodule(n).weight.detach().numpy()
        q_np, s_np, dq_np = _np_quant(w0)
        m = masks[n]
        assert np.array_equal(w1[m], dq_np[m]) and np.array_equal(w1[~m], w0[~m])
        assert np.array_equal(res.scales[n].numpy(), s_np)
        assert np.array_equal(res.values[n].numpy()[m], q_np[m])
        assert (res.values[n].numpy()[~m] == 0).all()
        assert torch.equal(res.model.get_submodule(n).bias, before[f"{n}.bias"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # pure


def _finetune_run(steps=2, epochs=2):
    model = small_conv_net()
    x, y, g = _data()
    train = FeatureSet(*_data(64, seed=5))
    return model, fairquantize(
        model, x, y, g, quantize_ratio=0.5, beta=5 / 9, steps=steps, finetune_epochs=epochs,
        train_set=train, finetune={"lr": 0.05, "batch_size": 16},
    )


def test_steps_with_finetuning_change_only_float_weights():
    model, res = _finetune_run()
    assert [h["quantized"] for h in res.history] == [
        planned_quantized_count(model, 0.25), planned_quantized_count(model, 0.5)
    ]
    assert res.history[0]["new"] + res.history[1]["new"] == res.total_quantized
    assert all(len(h["finetune"]) == 2 for h in res.history)
    # Every quantized entry sits at values · scale exactly; float weights and biases
    # moved during fine-tuning.
    for n in LAYERS:
        w0 = model.get_submodule(n).weight.detach()
        w = res.model.get_submodule(n).weight.detach()
        m = res.masks[n]
        dq = dequantize_per_channel(res.values[n], res.scales[n])
        assert torch.equal(w[m], dq[m])
        assert torch.equal(res.scales[n], channel_scales(w0))  # scales fixed from the start
        assert not torch.equal(w[~m], w0[~m])
        assert not torch.equal(res.model.get_submodule(n).bias, model.get_submodule(n).bias)


def test_step1_entries_survive_step2():
    model = small_conv_net()
    x, y, g = _data()
    train = FeatureSet(*_data(64, seed=5))
    kw = dict(beta=5 / 9, finetune_epochs=1, train_set=train, finetune={"lr": 0.05})
    one = fairquantize(model, x, y, g, quantize_ratio=0.25, steps=1, **kw)
    two = fairquantize(model, x, y, g, quantize_ratio=0.5, steps=2, **kw)
    for n in LAYERS:
        # The first step of the two-step run is the one-step run at 0.25: same mask,
        # same int8 values, kept through step 2's fine-tuning.
        assert (two.masks[n] | ~one.masks[n]).all()
        m = one.masks[n]
        assert torch.equal(two.values[n][m], one.values[n][m])
        w1, w2 = (r.model.get_submodule(n).weight.detach() for r in (one, two))
        assert torch.equal(w2[m], w1[m])


def test_group_ids_name_the_roles():
    # The privileged group as id 0 in the data: naming it gives the same result as
    # relabelling the data.
    model = small_conv_net()
    x, y, g = _data()
    a = fairquantize(model, x, y, g, quantize_ratio=0.3, beta=5 / 9)
    b = fairquantize(model, x, y, 1 - g, quantize_ratio=0.3, beta=5 / 9, group_ids=(1, 0))
    c = fairquantize(model, x, y, 1 - g, quantize_ratio=0.3, beta=5 / 9)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in LAYERS)
    assert any(not torch.equal(a.masks[n], c.masks[n]) for n in LAYERS)


def test_deterministic():
    _, a = _finetune_run(steps=2, epochs=1)
    _, b = _finetune_run(steps=2, epochs=1)
    for n in LAYERS:
        assert torch.equal(a.masks[n], b.masks[n]) and torch.equal(a.values[n], b.values[n])
        assert torch.equal(a.model.get_submodule(n).weight, b.model.get_submodule(n).weight)


def test_compression_rate_of_the_paper():
    # vgg11_paper, Fitzpatrick (114 classes), every Linear and Conv2d weight: 1.081 at
    # 10 %, 1.176 at 20 % (Table 2 and DESIGN §4); the count comes from the selection.
    with torch.device("meta"):
        vgg = build_model("vgg11_paper", 114)
    for q, cr in [(0.1, 1.081), (0.2, 1.176)]:
        for scope in ("layer", "global"):
            got = fairquantize_cr(vgg, planned_quantized_count(vgg, q, scope=scope))
            assert round(got, 3) == cr
            assert abs(got - 32 / (32 - 24 * q)) < 1e-3


def test_errors():
    model = small_conv_net()
    x, y, g = _data()
    with pytest.raises(FairDeployError, match="finetune_epochs=2 needs a train_set"):
        fairquantize(model, x, y, g, quantize_ratio=0.1, beta=0.5, finetune_epochs=2)
    with pytest.raises(FairDeployError, match="steps=0 is invalid"):
        fairquantize(model, x, y, g, quantize_ratio=0.1, beta=0.5, steps=0)
    with pytest.raises(FairDeployError, match=r"finetune may not set \['epochs'\]"):
        fairquantize(model, x, y, g, quantize_ratio=0.1, beta=0.5, finetune={"epochs": 3})
    with pytest.raises(FairDeployError, match=r"layer '1' is a ReLU"):
        fairquantize(model, x, y, g, quantize_ratio=0.1, beta=0.5, layers=["1"])
    with pytest.raises(FairDeployError, match="weight contains NaN or inf"):
        channel_scales(torch.tensor([[float("inf")]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("start", ["cuda", "cpu"])  # cpu: fine-tuning moves it to the GPU
def test_cuda_steps_with_finetuning(start):
    model = small_conv_net().to(start)
    x, y, g = _data()
    train = FeatureSet(*_data(64, seed=5))
    res = fairquantize(
        model, x, y, g, quantize_ratio=0.5, beta=5 / 9, steps=2, finetune_epochs=1,
        train_set=train, finetune={"lr": 0.05, "device": "cuda"},
    )
    assert res.total_quantized == planned_quantized_count(model, 0.5)
    for n in LAYERS:
        w = res.model.get_submodule(n).weight.detach()
        assert w.device.type == "cuda"
        m = res.masks[n]
        dq = dequantize_per_channel(res.values[n], res.scales[n]).to(w.device)
        assert torch.equal(w[m.to(w.device)], dq[m.to(w.device)])
