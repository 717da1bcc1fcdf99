"""Tests for the paper's pre-training loop: learning, seeding, resuming, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fixtures import TripleDataset

from fairdeploy.checkpoint import load_checkpoint
from fairdeploy.errors import FairDeployError
from fairdeploy.models import build_model
from fairdeploy.train import resume_state_path, train_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (see conftest.one_thread)."""


def _blobs(n: int, seed: int, d: int = 10) -> TripleDataset:
    """Two Gaussian blobs 6σ apart along a random direction (Bayes accuracy 99.9 %)."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(123).standard_normal(d)
    direction /= np.linalg.norm(direction)
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, d)) + np.outer(6.0 * y - 3.0, direction)
    return TripleDataset(torch.from_numpy(x.astype(np.float32)), y, rng.integers(0, 2, n))


TRAIN, VAL = _blobs(192, 0), _blobs(96, 1)
FAST = {"batch_size": 32, "progress": False}


def _model(dropout: float = 0.0):
    torch.manual_seed(7)
    return build_model("mlp", 2, in_features=10, widths=(16,), dropout=dropout)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_learns_separable_data():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_model(model, TRAIN, VAL, epochs=4, **FAST)
    last = result.history[-1]
    assert last["val_accuracy"] >= 0.95 and last["train_accuracy"] >= 0.9
    assert result.history[0]["train_loss"] > last["train_loss"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert not result.model.training
    # Independent check of the reported accuracy.
    with torch.no_grad():
        acc = (result.model(VAL.x).argmax(1).numpy() == VAL.targets).mean()
    assert last["val_accuracy"] == pytest.approx(acc)
    # The caller's model is untouched.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_step_lr_schedule_follows_the_paper_recipe():
    result = train_model(_model(), TRAIN, None, epochs=5, step_epochs=2, gamma=0.5, lr=0.02, **FAST)
    assert [h["lr"] for h in result.history] == pytest.approx([0.02, 0.02, 0.01, 0.01, 0.005])
    assert "val_accuracy" not in result.history[0]


def test_same_seed_same_weights_and_the_global_rng_is_restored():
    rng_before = torch.get_rng_state()
    a = train_model(_model(0.3), TRAIN, VAL, epochs=2, seed=3, **FAST)
    assert torch.equal(torch.get_rng_state(), rng_before)
    b = train_model(_model(0.3), TRAIN, VAL, epochs=2, seed=3, **FAST)
    c = train_model(_model(0.3), TRAIN, VAL, epochs=2, seed=4, **FAST)
    assert _same_weights(a.model, b.model)
    assert a.history == b.history
    assert not _same_weights(a.model, c.model)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    # Dropout and a per-epoch LR step make the RNG, optimizer and scheduler state matter.
    kw = {"step_epochs": 1, "gamma": 0.8, **FAST}
    straight = train_model(_model(0.3), TRAIN, VAL, epochs=4,
                           checkpoint_path=tmp_path / "a.pt", **kw)
    ckpt = tmp_path / "b.pt"
    first = train_model(_model(0.3), TRAIN, VAL, epochs=2, checkpoint_path=ckpt, **kw)
    assert first.resumed_from == 0 and resume_state_path(ckpt).exists()
    resumed = train_model(_model(0.3), TRAIN, VAL, epochs=4, checkpoint_path=ckpt, **kw)
    assert resumed.resumed_from == 2
    assert _same_weights(straight.model, resumed.model)
    assert resumed.history == straight.history
    # Already complete: resuming does no further epoch and returns the same weights.
    again = train_model(_model(0.3), TRAIN, VAL, epochs=4, checkpoint_path=ckpt, **kw)
    assert again.resumed_from == 4 and _same_weights(again.model, straight.model)
    # resume=False starts over.
    fresh = train_model(_model(0.3), TRAIN, VAL, epochs=1, checkpoint_path=ckpt,
                        resume=False, **kw)
    assert fresh.resumed_from == 0 and len(fresh.history) == 1


def test_checkpoint_loads_with_weights_only(tmp_path):
    path = tmp_path / "model.pt"
    result = train_model(_model(), TRAIN, VAL, epochs=1, checkpoint_path=path,
                         metadata={"arch": "mlp", "num_classes": 2}, **FAST)
    ckpt = torch.load(path, weights_only=True)
    meta = ckpt["metadata"]
    assert meta["arch"] == "mlp" and meta["num_classes"] == 2
    assert meta["history"] == result.history
    assert meta["train_config"]["lr"] == 0.01 and meta["train_config"]["epochs"] == 1
    fresh = build_model("mlp", 2, in_features=10, widths=(16,))
    fresh.load_state_dict(ckpt["state_dict"])
    assert _same_weights(fresh, result.model)
    loaded = load_checkpoint(path, arch="mlp", num_classes=2,
                             model_kwargs={"in_features": 10, "widths": [16]})
    assert _same_weights(loaded, result.model)
    state = torch.load(resume_state_path(path), weights_only=True)
    assert state["epoch"] == 1 and "momentum_buffer" in state["optimizer"]["state"][0]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_refuses_a_state_from_other_hyperparameters(tmp_path):
    path = tmp_path / "m.pt"
    train_model(_model(), TRAIN, VAL, epochs=1, checkpoint_path=path, **FAST)
    with pytest.raises(FairDeployError, match=r"lr=0\.01.*lr=0\.05.*resume=False"):
        train_model(_model(), TRAIN, VAL, epochs=2, lr=0.05, checkpoint_path=path, **FAST)
    resume_state_path(path).write_bytes(b"garbage")
    with pytest.raises(FairDeployError, match="cannot read the training resume state"):
        train_model(_model(), TRAIN, VAL, epochs=2, checkpoint_path=path, **FAST)


def test_bad_arguments_and_labels_are_user_errors():
    with pytest.raises(FairDeployError, match=r"metadata\['arch'\]: object is not allowed"):
        train_model(_model(), TRAIN, None, epochs=1, checkpoint_path=None,
                    metadata={"arch": object()}, **FAST)
    with pytest.raises(FairDeployError, match="epochs=0"):
        train_model(_model(), TRAIN, VAL, epochs=0, **FAST)
    with pytest.raises(FairDeployError, match=r"lr=-0\.1"):
        train_model(_model(), TRAIN, VAL, lr=-0.1, **FAST)
    bad = TripleDataset(TRAIN.x, TRAIN.targets * 3, TRAIN.groups)  # labels 0 and 3
    with pytest.raises(FairDeployError, match=r"label 3 is outside the model's 2 classes"):
        train_model(_model(), bad, None, epochs=1, **FAST)


@pytest.mark.parametrize("content", [bytes(range(256)) * 2, b"PK\x03\x04garbage", b""])
def test_a_garbage_resume_file_is_one_line(tmp_path, content):
    """Issue 21 item 12: torch's multi-line text followed the Error line."""
    ckpt = tmp_path / "c.pt"
    resume_state_path(ckpt).write_bytes(content)
    with pytest.raises(FairDeployError) as info:
        train_model(_model(), TRAIN, VAL, epochs=1, checkpoint_path=ckpt, **FAST)
    msg = str(info.value)
    assert "\n" not in msg and "damaged" in msg and "--no-resume" in msg
    assert "weights_only" not in msg
