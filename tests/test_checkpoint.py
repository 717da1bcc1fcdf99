"""Checkpoint loading: safe by default, wrappers unwrapped, mismatches explained."""

from __future__ import annotations

import pytest
import torch

from fairdeploy.checkpoint import checkpoint_metadata, load_checkpoint, save_checkpoint
from fairdeploy.errors import FairDeployError
from fairdeploy.models import build_model

KW = {"in_features": 5, "widths": (7, 6)}


def _mlp(seed: int = 0, num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", num_classes, **KW)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _load(path, **kw):
    return load_checkpoint(path, arch="mlp", num_classes=kw.pop("num_classes", 3),
                           model_kwargs=KW, **kw)


def test_save_then_load_round_trips_weights_and_outputs(tmp_path):
    model = _mlp(1)
    path = save_checkpoint(model, tmp_path / "ck.pt", extra={"arch": "mlp", "epoch": 3,
                                                             "widths": [7, 6]})
    loaded = _load(path)
    assert _same_weights(model, loaded) and not loaded.training
    x = torch.randn(4, 5)
    assert torch.equal(model.eval()(x), loaded(x))
    raw = torch.load(path, weights_only=True)  # a plain dict, safe to read
    assert set(raw) == {"state_dict", "metadata"}
    meta = checkpoint_metadata(path)
    assert meta["arch"] == "mlp" and meta["epoch"] == 3
    assert meta["format"] == "fairdeploy-checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # written atomically, no temp left


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 7},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"model_state_dict": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}},
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}},  # Lightning
    ],
    ids=["bare", "state_dict", "model", "model_state_dict", "module.", "compiled-ddp", "lightning"],
)
def test_state_dict_layouts_are_unwrapped(tmp_path, wrap):
    model = _mlp(2)
    torch.save(wrap(model.state_dict()), tmp_path / "ck.pt")
    assert _same_weights(model, _load(tmp_path / "ck.pt"))


def test_pickled_module_needs_trust(tmp_path):
    model = _mlp(3)
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(FairDeployError) as info:
        _load(tmp_path / "full.pt")
    msg = str(info.value)
    assert "arbitrary code" in msg and "--trust-checkpoint" in msg and "\n" not in msg
    loaded = _load(tmp_path / "full.pt", trust_checkpoint=True)
    assert _same_weights(model, loaded) and not loaded.training


def test_mismatched_head_lists_keys_shapes_and_suggests_num_classes(tmp_path):
    torch.save(_mlp(0, num_classes=4).state_dict(), tmp_path / "ck.pt")
    with pytest.raises(FairDeployError) as info:
        _load(tmp_path / "ck.pt", num_classes=3)
    assert str(info.value) == (
        f"checkpoint {tmp_path / 'ck.pt'} does not fit model.arch 'mlp' with num_classes=3: "
        "2 shape mismatches (layers.4.weight: model (3, 6), checkpoint (4, 6); layers.4.bias: "
        "model (3,), checkpoint (4,)) — the checkpoint's head has 4 outputs: is "
        "model.num_classes 4?"
    )


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = _mlp().state_dict()
    sd.pop("layers.0.bias")
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "ck.pt")
    with pytest.raises(FairDeployError) as info:
        _load(tmp_path / "ck.pt")
    msg = str(info.value)
    assert "1 missing key (layers.0.bias)" in msg
    assert "1 unexpected key (extra.weight)" in msg
    assert "check model.arch, model.num_classes and model.kwargs" in msg


def test_wrong_architecture_is_explained(tmp_path):
    torch.save(_mlp().state_dict(), tmp_path / "ck.pt")
    with pytest.raises(FairDeployError, match=r"layers\.0\.weight: model \(256, 5\), checkpoint "
                                              r"\(7, 5\)"):
        load_checkpoint(tmp_path / "ck.pt", arch="mlp", num_classes=3,
                        model_kwargs={"in_features": 5})


def test_missing_corrupt_and_non_state_dict_files(tmp_path):
    with pytest.raises(FairDeployError, match=r"nope\.pt: no such file$"):
        _load(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"definitely not a torch archive")
    with pytest.raises(FairDeployError, match="is not a PyTorch checkpoint or is damaged"):
        _load(tmp_path / "bad.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(_mlp(), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:200])
    with pytest.raises(FairDeployError, match="is not a PyTorch checkpoint or is damaged"):
        _load(tmp_path / "cut.pt")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "meta.pt")
    with pytest.raises(FairDeployError, match="is a dict without a state dict"):
        _load(tmp_path / "meta.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(FairDeployError, match="holds a list, not a state dict"):
        _load(tmp_path / "list.pt")


def test_save_refuses_metadata_that_would_need_pickling(tmp_path):
    with pytest.raises(FairDeployError, match=r"extra\['when'\]: object is not allowed"):
        save_checkpoint(_mlp(), tmp_path / "ck.pt", extra={"when": object()})
    assert not list(tmp_path.iterdir())


def test_loading_returns_a_fresh_model_each_time(tmp_path):
    path = save_checkpoint(_mlp(), tmp_path / "ck.pt")
    a, b = _load(path), _load(path)
    with torch.no_grad():
        a.layers[0].weight.zero_()
    assert not torch.equal(a.layers[0].weight, b.layers[0].weight)


def test_non_persistent_buffers_keep_their_init(tmp_path):
    """Models are built without random init (meta device) unless a buffer that no state
    dict carries needs its constructor's value."""
    import torch
    from torch import nn

    from fairdeploy.checkpoint import load_checkpoint
    from fairdeploy.models import register_model

    class WithScale(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.fc = nn.Linear(3, num_classes)
            self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

        def forward(self, x):
            return self.fc(x * self.scale)

    register_model("_test_with_scale")(lambda num_classes: WithScale(num_classes))
    src = WithScale(2)
    torch.save(src.state_dict(), tmp_path / "c.pt")
    model = load_checkpoint(tmp_path / "c.pt", arch="_test_with_scale", num_classes=2)
    assert torch.equal(model.scale, torch.full((3,), 2.0))
    x = torch.randn(4, 3)
    assert torch.equal(model(x), src(x))


def test_numpy_scalars_are_refused_in_checkpoint_metadata():
    """np.float64 subclasses float but weights_only=True cannot load it."""
    import numpy as np

    from fairdeploy.checkpoint import check_plain_value
    from fairdeploy.errors import FairDeployError

    check_plain_value({"a": [1, 2.0, "x", None, True]}, "extra")
    with pytest.raises(FairDeployError, match=r"extra\['a'\]: float64 is not allowed"):
        check_plain_value({"a": np.float64(1.0)}, "extra")


def test_a_trusted_pickled_module_of_another_width_is_refused(tmp_path):
    """Issue 21 item 2: the recipe said widths (7, 6), the pickled module had (64, 6); the
    run folder's recipe.yaml and model.pt then disagreed."""
    torch.manual_seed(0)
    wider = build_model("mlp", 3, in_features=5, widths=(64, 6))
    torch.save(wider, tmp_path / "full.pt")
    with pytest.raises(FairDeployError) as info:
        _load(tmp_path / "full.pt", trust_checkpoint=True)
    msg = str(info.value)
    assert "does not fit model.arch 'mlp'" in msg and "shape mismatch" in msg
    assert "model (7, 5), checkpoint (64, 5)" in msg and "\n" not in msg
    other_head = _mlp(4, num_classes=2)
    torch.save(other_head, tmp_path / "head.pt")
    with pytest.raises(FairDeployError, match=r"is model\.num_classes 2"):
        _load(tmp_path / "head.pt", trust_checkpoint=True)
