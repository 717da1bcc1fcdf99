"""Tests for the model cut, feature computation and the on-disk feature cache."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from _fixtures import TripleDataset
from torch import nn

from fairdeploy.cache import FeatureCache, file_sha256
from fairdeploy.errors import FairDeployError
from fairdeploy.features import (
    FeatureSet,
    compute_features,
    layers_in_call_order,
    split_model,
)
from fairdeploy.lrf import FactorizedLinear
from fairdeploy.models import build_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def _data(n: int = 37, d: int = 6, seed: int = 0) -> TripleDataset:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32))
    return TripleDataset(x, rng.integers(0, 3, n), rng.integers(-1, 2, n))


def _mlp(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", 3, in_features=6, widths=(8, 5), **kw).eval()


# --------------------------------------------------------------------------- split


def test_split_vgg11_paper_composes_to_the_model_exactly():
    torch.manual_seed(0)
    model = build_model("vgg11_paper", 2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trunk, head = split_model(model, "classifier.3")
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        feats = trunk(x)
        # The trunk ends after classifier.2 (dropout): FC-2's input has 4096 features.
        assert feats.shape == (1, 4096)
        assert torch.equal(head(feats), model(x))
        assert torch.equal(feats, model.classifier[:3](torch.flatten(model.features(x), 1)))
    assert isinstance(head.get_submodule("classifier.3"), nn.Linear)
    assert {n for n, _ in head.named_parameters()} == {
        "classifier.3.weight", "classifier.3.bias", "classifier.6.weight", "classifier.6.bias"
    }
    assert "classifier.0.weight" in dict(trunk.named_parameters())
    assert "classifier.3.weight" not in dict(trunk.named_parameters())
    # Deep copies: the caller's model is untouched and shares no storage with the parts.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not ptrs & {p.data_ptr() for p in (*trunk.parameters(), *head.parameters())}


@pytest.mark.parametrize("layer", ["layers.0", "layers.2", "layers.4", "layers"])
def test_split_mlp_composes_to_the_model(layer):
    model = _mlp()
    trunk, head = split_model(model, layer)
    x = torch.randn(9, 6)
    with torch.no_grad():
        assert torch.equal(head(trunk(x)), model(x))
    assert isinstance(head.get_submodule(layer), nn.Module)


def test_split_trunk_outputs_the_layers_input():
    model = _mlp()
    trunk, _ = split_model(model, "layers.2")
    x = torch.randn(4, 6)
    seen = []
    handle = model.layers[2].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(x)
        got = trunk(x)
    handle.remove()
    assert torch.equal(got, seen[0])


def test_split_head_accepts_a_factorized_layer_swapped_in_by_name():
    model = _mlp()
    trunk, head = split_model(model, "layers.2")
    lin = head.get_submodule("layers.2")
    u, s, vh = torch.linalg.svd(lin.weight.detach().double().T, full_matrices=False)
    fact = FactorizedLinear(u.float(), s.float(), vh.float(), lin.bias.detach())
    head.set_submodule("layers.2", fact)
    assert head.get_submodule("layers.2") is fact
    x = torch.randn(7, 6)
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(x)), model(x), atol=1e-5, rtol=1e-5)
    assert isinstance(model.layers[2], nn.Linear)  # the model itself is untouched


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc3(self.fc2(torch.relu(h)) + h)  # h skips past fc2's input


class _InputSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x)) + x


def test_split_refuses_a_skip_connection_across_the_cut():
    with pytest.raises(FairDeployError, match=r"layer 'fc2'.*fc1.*skip connection"):
        split_model(_Skip(), "fc2")
    with pytest.raises(FairDeployError, match=r"layer 'fc2'.*model input 'x'"):
        split_model(_InputSkip(), "fc2")
    # Where the skip does not cross the cut, the cut is fine.
    model = _Skip().eval()
    trunk, head = split_model(model, "fc1")
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(head(trunk(x)), model(x))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            x = -x
        return self.fc(x)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x))


def test_split_errors_name_the_layer_and_the_reason():
    with pytest.raises(FairDeployError, match=r"'fc'.*cannot trace"):
        split_model(_Branchy(), "fc")
    with pytest.raises(FairDeployError, match=r"'fc'.*called 2 times"):
        split_model(_Twice(), "fc")
    with pytest.raises(FairDeployError, match=r"no submodule 'layers.9'.*layers\.0, layers\.2"):
        split_model(_mlp(), "layers.9")


def test_split_protects_features_from_an_inplace_first_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).eval()
    trunk, head = split_model(model, "1")
    x = torch.randn(5, 4)
    with torch.no_grad():
        feats = trunk(x)
        kept = feats.clone()
        out = head(feats)
        assert torch.equal(feats, kept)  # a cached FeatureSet must not be overwritten
        assert torch.equal(out, model(x))


def test_split_keeps_the_train_eval_modes():
    model = _mlp(dropout=0.5).train()
    model.layers[2].eval()
    trunk, head = split_model(model, "layers.3")
    assert trunk.training and head.training
    assert not trunk.get_submodule("layers.2").training
    assert head.get_submodule("layers.5").training


class _Reordered(nn.Module):
    """Registers ``late`` first but calls it last; ``unused`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.late, self.early, self.unused = nn.Linear(4, 2), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.late(torch.relu(self.early(x)))


def test_layers_in_call_order_follows_forward_not_registration():
    assert layers_in_call_order(_Reordered(), ["late", "early"]) == ["early", "late"]
    assert layers_in_call_order(_mlp(), ["layers.4", "layers.0", "layers.2"]) == [
        "layers.0", "layers.2", "layers.4"
    ]
    with pytest.raises(FairDeployError, match="never calls unused"):
        layers_in_call_order(_Reordered(), ["early", "unused"])
    with pytest.raises(FairDeployError, match="no submodule 'nope'"):
        layers_in_call_order(_Reordered(), ["nope"])


# --------------------------------------------------------------------------- features


def test_compute_features_matches_the_trunk_in_order():
    model = _mlp(dropout=0.5).train()  # compute_features must switch dropout off
    trunk, _ = split_model(model, "layers.3")
    ds = _data()
    fs = compute_features(trunk, ds, batch_size=8, progress=True)
    assert trunk.training  # the caller's mode is restored
    with torch.no_grad():
        ref = model.eval().layers[:3](ds.x)  # Linear, ReLU, Dropout (off in eval)
    assert fs.features.dtype == torch.float32 and fs.features.shape == (37, 8)
    torch.testing.assert_close(fs.features, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(fs.targets, torch.from_numpy(ds.targets).long())
    assert torch.equal(fs.groups, torch.from_numpy(ds.groups).long())
    again = compute_features(trunk, ds, batch_size=8, progress=False)
    assert torch.equal(again.features, fs.features)  # deterministic
    assert len(fs) == 37 and len(fs[3]) == 3


def test_compute_features_rejects_bad_input():
    trunk, _ = split_model(_mlp(), "layers.2")
    with pytest.raises(FairDeployError, match="empty"):
        compute_features(trunk, _data(n=0), progress=False)
    with pytest.raises(FairDeployError, match="batch_size=0"):
        compute_features(trunk, _data(), batch_size=0, progress=False)
    pairs = torch.utils.data.TensorDataset(torch.randn(4, 6), torch.zeros(4))
    with pytest.raises(FairDeployError, match=r"\(x, y, group\) triples"):
        compute_features(trunk, pairs, progress=False)


def test_feature_set_subset_and_validation():
    fs = FeatureSet(torch.arange(12.0).reshape(6, 2), torch.arange(6), torch.arange(6) % 2)
    sub = fs.subset([4, 1])
    assert torch.equal(sub.features, torch.tensor([[8.0, 9.0], [2.0, 3.0]]))
    assert sub.targets.tolist() == [4, 1] and sub.groups.tolist() == [0, 1]
    masked = fs.subset(fs.groups == 1)
    assert masked.targets.tolist() == [1, 3, 5]
    assert fs.subset(np.array([5])).targets.tolist() == [5]
    with pytest.raises(ValueError, match="inconsistent"):
        FeatureSet(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(3).long())
    with pytest.raises(ValueError, match="float32"):
        FeatureSet(torch.zeros(3, 2).double(), torch.zeros(3).long(), torch.zeros(3).long())


# --------------------------------------------------------------------------- cache


def _fs(seed: int = 0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    return FeatureSet(
        torch.randn(10, 4, generator=g),
        torch.randint(0, 2, (10,), generator=g),
        torch.randint(0, 2, (10,), generator=g),
    )


def test_cache_miss_then_hit(tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    calls = []

    def compute():
        calls.append(1)
        return _fs()

    parts = {"checkpoint": "ab" * 32, "split": "test", "layer": "classifier.3", "size": 112}
    fs1, hit1 = cache.get_or_compute(parts, compute)
    fs2, hit2 = cache.get_or_compute(dict(reversed(parts.items())), compute)  # order-free
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    for a, b in ((fs1.features, fs2.features), (fs1.targets, fs2.targets),
                 (fs1.groups, fs2.groups)):
        assert torch.equal(a, b)
    # Another split is another entry.
    _, hit3 = cache.get_or_compute({**parts, "split": "val"}, compute)
    assert not hit3 and len(calls) == 2
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 2 and all(f.startswith("features-") and f.endswith(".pt") for f in files)
    payload = torch.load(cache.path(parts), weights_only=True)
    assert torch.equal(payload["tensors"]["features"], fs1.features)


def test_cache_stores_a_subset_without_its_parent(tmp_path):
    cache = FeatureCache(tmp_path)
    big = FeatureSet(torch.randn(1000, 64), torch.zeros(1000).long(), torch.zeros(1000).long())
    view = FeatureSet(big.features[:2], big.targets[:2], big.groups[:2])
    cache.get_or_compute({"k": 1}, lambda: view)
    assert cache.path({"k": 1}).stat().st_size < 64 * 1000 * 4 // 10


def test_cache_recomputes_a_corrupt_file_with_a_warning(tmp_path):
    cache = FeatureCache(tmp_path)
    parts = {"split": "train"}
    cache.get_or_compute(parts, _fs)
    cache.path(parts).write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="unreadable feature cache file"):
        fs, hit = cache.get_or_compute(parts, lambda: _fs(1))
    assert not hit and torch.equal(fs.features, _fs(1).features)
    fs, hit = cache.get_or_compute(parts, lambda: _fs(2))  # repaired on disk
    assert hit and torch.equal(fs.features, _fs(1).features)
    # A valid torch file that is not ours is also a miss.
    torch.save({"features": torch.zeros(1)}, cache.path(parts))
    with pytest.warns(RuntimeWarning, match="not a fairdeploy feature cache"):
        _, hit = cache.get_or_compute(parts, _fs)
    assert not hit
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_file_sha256_matches_hashlib_and_follows_changes(tmp_path):
    p = tmp_path / "ckpt.pt"
    data = os.urandom(3 * (1 << 20) + 17)  # several chunks plus a tail
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()
    p.write_bytes(data[:-1])
    assert file_sha256(str(p)) == hashlib.sha256(data[:-1]).hexdigest()
    with pytest.raises(FairDeployError, match=r"missing\.pt"):
        file_sha256(tmp_path / "missing.pt")
