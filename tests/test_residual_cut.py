"""Cuts that carry several values: a Linear inside a residual block.

The residual MLP ``out(h + fc2(relu(fc1(h))))`` cut at ``fc2``: relu's output and the
residual stream ``h`` both cross the cut. Evaluation on the cached (packed) values, the
exact Hessians through the head, and the export are checked against independent
references: the full model with the same factorized layer, autograd's Hessian, ONNX
Runtime.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_nets import residual_mlp, three_class_arrays
from torch import nn
from torch.func import functional_call

from fairdeploy.errors import FairDeployError
from fairdeploy.features import compute_features, split_model
from fairdeploy.lrf import factorize, replace_module
from fairdeploy.scoring import hessian_diag

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


@pytest.fixture(autouse=True)
def _trusted_recipes(monkeypatch):
    """The recipes here import tests/_tiny_nets.py: trusted (issue 21 item 15)."""
    monkeypatch.setenv("FAIRDEPLOY_TRUST_RECIPE", "1")


def _factorized(model: nn.Module, layer: str, rank: int) -> nn.Module:
    return factorize(model.get_submodule(layer), rank)


def test_cut_inside_a_residual_block_packs_both_values():
    model = residual_mlp().eval()
    x = torch.randn(9, 8)
    trunk, head = split_model(model, "fc2", example_input=x[:2])
    assert [v.name for v in head.cut_values] == ["relu", "inp"]  # the layer's input first
    assert [v.shape for v in head.cut_values] == [(16,), (12,)]
    with torch.no_grad():
        packed = trunk(x)
        assert packed.shape == (9, 16 + 12)
        assert torch.equal(packed[:, :16], torch.relu(model.fc1(model.inp(x))))
        assert torch.equal(packed[:, 16:], model.inp(x))
        torch.testing.assert_close(head(packed), model(x), atol=1e-6, rtol=1e-6)
    # Without an example the shapes are unknown: refused with the reason and the fix.
    with pytest.raises(FairDeployError, match=r"'inp'.*skip connection.*example_input="):
        split_model(model, "fc2")


def test_cached_tuples_with_a_factorized_layer_equal_the_full_model():
    model = residual_mlp().eval()
    x = torch.randn(33, 8)
    data = torch.utils.data.TensorDataset(x, torch.zeros(33, dtype=torch.long),
                                          torch.zeros(33, dtype=torch.long))
    trunk, head = split_model(model, "fc2", example_input=x[:2])
    fs = compute_features(trunk, data, batch_size=8, progress=False)
    fact = _factorized(model, "fc2", 5)
    head.set_submodule("fc2", copy.deepcopy(fact))
    full = replace_module(model, "fc2", copy.deepcopy(fact)).eval()
    with torch.no_grad():
        torch.testing.assert_close(head(fs.features), full(x), atol=1e-6, rtol=1e-5)
        # and the factorized layer really changes the model (the check is not vacuous)
        assert (full(x) - model(x)).abs().max() > 1e-3


def test_hessians_of_a_layer_in_a_residual_block_equal_autograd():
    model = residual_mlp().to(D64).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 8, generator=g, dtype=D64)
    y = torch.randint(0, 3, (24,), generator=g)
    trunk, head = split_model(model, "fc2", example_input=x[:2])
    head.set_submodule("fc2", _factorized(model, "fc2", 6))
    feats = trunk(x).detach()
    assert feats.dtype == D64
    ref = copy.deepcopy(head).eval()
    params = dict(ref.named_parameters())
    for fast in (True, False):
        got = hessian_diag(head, "fc2", feats, y, batch_size=7, fast=fast)
        for key in ("U", "V"):
            p = params[f"fc2.{key}"].detach()

            def loss(flat, key=key, p=p):
                return F.cross_entropy(
                    functional_call(ref, {f"fc2.{key}": flat.view_as(p)}, (feats,)), y
                )

            want = torch.autograd.functional.hessian(loss, p.flatten()).diagonal().view_as(p)
            err = (got[key] - want).abs() / want.abs().clamp_min(1e-12)
            assert err.max().item() <= 1e-5, (key, fast, err.max().item())


def _npz(path, n: int = 360) -> None:
    np.savez(path, **three_class_arrays(n=n))


def _recipe(tmp, method: dict) -> dict:
    return {
        "model": {"arch": "_tiny_nets:residual_mlp", "num_classes": 3},
        "data": {"kind": "npz", "path": str(tmp / "data.npz"), "split": {"mode": "column"}},
        "sensitive": {"attribute": "group", "groups": {"a": [0], "b": [1]}},
        "method": method,
        "export": {"verify_samples": 60},
        "report": {"latency_batches": [1], "latency_warmup": 1, "latency_iterations": 3},
    }


@pytest.mark.parametrize("rr", [0.0, 0.5])
def test_fairlrf_on_fc2_through_the_experiment_and_export(tmp_path, rr):
    from fairdeploy.experiment import Experiment
    from fairdeploy.recipe import parse_recipe

    _npz(tmp_path / "data.npz")
    model = residual_mlp().eval()
    method = {"name": "fairlrf", "layers": [{"layer": "fc2", "rank": 6, "sr": 0.25, "rr": rr}],
              "scoring": {"samples_per_group": 32}}
    exp = Experiment(parse_recipe(_recipe(tmp_path, method)), model)
    ctx = exp.prepare()
    assert ctx.first_layer == "fc2" and len(ctx.head.cut_values) == 2
    fair = exp.apply(exp.recipe.method)
    full = exp.model_of(fair)
    assert full.get_submodule("fc2").U.shape == (16, 6)
    x = torch.as_tensor(np.load(tmp_path / "data.npz")["x"][-90:])
    with torch.no_grad():
        direct = full(x)
    # The head on cached (packed) values equals the full processed model on raw inputs.
    torch.testing.assert_close(exp.logits(fair, "test"), direct, rtol=1e-5, atol=1e-5)
    result = exp.export(fair, tmp_path / "m.onnx")
    assert result.layers
    verdict = exp.verify(tmp_path / "m.onnx")
    assert verdict and verdict.n_samples == 60


class _InputSkip(nn.Module):
    """``fc2(fc1(x)) + x``: the model's input itself crosses a cut at fc2, and a constant
    computed from a parameter alone (``scale``) is recomputed in the head, not cached."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.tensor([0.5, 1.0, 1.5, 2.0]))

    def forward(self, x):
        s = self.scale.exp()  # before the cut, but not per-sample
        return self.fc2(self.fc1(x)) * s + x


def test_the_model_input_and_constants_across_the_cut():
    torch.manual_seed(0)
    model = _InputSkip().eval()
    x = torch.randn(6, 4)
    trunk, head = split_model(model, "fc2", example_input=x[:2])
    assert [v.name for v in head.cut_values] == ["fc1", "x"]
    with torch.no_grad():
        packed = trunk(x)
        assert packed.shape == (6, 8)
        torch.testing.assert_close(head(packed), model(x))
        head.get_parameter("scale").mul_(2)  # the head's own copy is used, not a cached value
        assert not torch.allclose(head(packed), model(x))


class _BatchStat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        m = x.mean()  # one number for the whole batch crosses the cut
        return self.fc2(self.fc1(x)) + m


def test_a_value_without_a_batch_axis_cannot_cross_the_cut():
    with pytest.raises(FairDeployError, match=r"crosses the cut but is of shape \(\).*one row per"):
        split_model(_BatchStat().eval(), "fc2", example_input=torch.randn(2, 4))


# --------------------------------------------------------------- in-place steps and aliasing


class _Statements(nn.Module):
    """In-place statements whose results nothing uses: each changes a value other nodes
    read (``h.masked_fill_``, ``r.add_``, a discarded ``ReLU(inplace=True)`` call)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.fc2, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x[:, :1] > 0
        h = self.fc1(x)
        if self.kind == "masked_fill":
            h.masked_fill_(pad, 0.0)
        elif self.kind == "add":
            h.add_(1.0)
        else:
            self.act(h)
        y = self.fc2(h)
        if self.kind == "masked_fill":
            y.masked_fill_(pad, 0.5)
        elif self.kind == "add":
            y.add_(h)
        else:
            self.act(y)
        return self.out(y)


@pytest.mark.parametrize("kind", ["masked_fill", "add", "relu_inplace"])
@pytest.mark.parametrize("layer", ["fc1", "fc2", "out"])
def test_in_place_statements_run_where_the_model_runs_them(kind: str, layer: str) -> None:
    """They were dropped from both parts (0.25 to 1.2 off): the head on cached values must
    equal the model, and running it twice on the same cache must not change the cache."""
    torch.manual_seed(0)
    model = _Statements(kind).eval()
    x = torch.randn(16, 6)
    trunk, head = split_model(model, layer, example_input=x[:2])
    with torch.no_grad():
        want = model(x.clone())
        cached = trunk(x.clone())
        before = cached.clone()
        torch.testing.assert_close(head(cached), want)
        torch.testing.assert_close(head(cached), want)
    assert torch.equal(cached, before)


class _ViewUpdated(nn.Module):
    """An in-place activation on a view of a value that crosses the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        y = self.fc2(h)
        return self.out(y + self.act(h.view(-1, 2, 2)).view(-1, 4))


def test_an_in_place_update_of_a_view_leaves_the_cached_values_alone() -> None:
    torch.manual_seed(0)
    model = _ViewUpdated().eval()
    x = torch.randn(8, 4)
    trunk, head = split_model(model, "fc2", example_input=x[:2])
    with torch.no_grad():
        want = model(x)
        cached = trunk(x)
        before = cached.clone()
        torch.testing.assert_close(head(cached), want)
        torch.testing.assert_close(head(cached), want)  # again on the same cache
    assert torch.equal(cached, before)


class _Aliases(nn.Module):
    """``v`` is a view of ``h``; both cross the cut, and the head updates ``h`` in place:
    the model sees the update through ``v``, separately cached copies would not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        v = h.view(-1, 4)
        y = self.fc2(h)
        torch.relu_(h)
        return self.out(y + v)


def test_crossing_views_of_one_tensor_with_in_place_updates_are_refused() -> None:
    with pytest.raises(FairDeployError, match=r"cross the cut as views of one tensor"):
        split_model(_Aliases().eval(), "fc2", example_input=torch.randn(2, 4))


class _SequenceFirst(nn.Module):
    """A residual stream kept sequence-first, (T, N, E), crossing the cut."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc1(x.view(-1, self.tokens, 4)).transpose(0, 1)  # (T, N, E)
        r = s * 2.0  # a second value crossing the cut, sequence-first too
        y = self.fc2(s) + r
        return self.out(y.mean(0))


@pytest.mark.parametrize("tokens", [2, 3])
def test_a_sequence_first_value_is_refused_even_when_its_length_equals_the_batch(tokens):
    """With T equal to the example's batch of 2, one shape check took T for the batch."""
    model = _SequenceFirst(tokens).eval()
    with pytest.raises(FairDeployError, match=r"not a tensor with one row per sample"):
        split_model(model, "fc2", example_input=torch.randn(2, tokens * 4))


class _Ids(nn.Module):
    """Integer ids computed before the cut and used after it (an embedding lookup)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.emb = nn.Embedding(vocab, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, 0].abs() * 1000).long().clamp(0, self.vocab - 1)
        return self.out(self.fc2(self.fc1(x)) + self.emb(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_integer_values_cross_the_cut_exactly_in_a_half_precision_model(dtype) -> None:
    """Packed in the model's dtype, ids above 256 (bf16) or 2048 (fp16) were rounded."""
    torch.manual_seed(0)
    model = _Ids(5000).to(dtype).eval()
    x = (torch.randn(64, 4) * 3).to(dtype)
    trunk, head = split_model(model, "fc2", example_input=x[:2])
    with torch.no_grad():
        packed = trunk(x)
        assert packed.dtype == torch.float32
        ids = (x[:, 0].abs() * 1000).long().clamp(0, 4999)
        assert torch.equal(packed[:, -1].long(), ids)  # the ids cross last, exactly
        torch.testing.assert_close(head(packed).float(), model(x).float())


def test_integers_beyond_float32s_exact_range_are_refused_at_the_trunk() -> None:
    model = _Ids(2**25 + 10).eval()
    with torch.no_grad():
        model.emb = nn.Embedding(2**25 + 10, 4, sparse=True)  # lookups only
    trunk, _ = split_model(model, "fc2", example_input=torch.randn(2, 4) * 1e-3)
    with pytest.raises(FairDeployError, match=r"holds integers up to 33,554,4\d\d, beyond"):
        trunk(torch.full((2, 4), 2**25 / 1000))


def test_a_layer_inside_a_torch_nn_block_is_refused_for_what_it_is() -> None:
    """A Linear of ``nn.TransformerEncoderLayer`` is unreachable because the tracer runs
    torch.nn's modules whole, not because its weights are used functionally (as
    ``nn.MultiheadAttention`` uses ``out_proj``'s)."""
    from fairdeploy.features import uncalled_layers

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.enc(x)
            return self.out((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))

    why = uncalled_layers(Encoder(), ["enc.linear1", "attn.out_proj"])
    assert "'enc' (TransformerEncoderLayer), a module the tracer runs as one piece" in why[
        "enc.linear1"]
    assert "'attn' (MultiheadAttention), which uses its weights functionally" in why[
        "attn.out_proj"]
