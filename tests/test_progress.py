"""The progress facility: one log line per phase and per training epoch when stderr is not
a terminal (a CI log), nothing when disabled; words and numbers as people read them."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from _fixtures import TripleDataset
from torch import nn

from fairdeploy import progress
from fairdeploy._text import ago, fixed, nbytes, plural, seconds
from fairdeploy.features import compute_features
from fairdeploy.train import train_model


@pytest.fixture
def lines(monkeypatch, capsys):
    """Log-line mode; returns a reader of the fairdeploy lines written to stderr."""
    monkeypatch.setenv("FAIRDEPLOY_PROGRESS", "lines")

    def read() -> list[str]:
        err = capsys.readouterr().err
        return [ln for ln in err.splitlines() if ln.startswith(progress.PREFIX)]

    return read


def test_a_phase_writes_one_line_when_it_ends(lines):
    with progress.phase("trunk pass: test split", total=3, quiet_below=0) as bar:
        bar.advance(2)
        bar.advance(1)
        assert lines() == []  # nothing until the phase ends
    (line,) = lines()
    assert re.fullmatch(r"fairdeploy: trunk pass: test split: 3 samples in \d+\.\d s", line)
    with progress.phase("export: model.onnx", unit="", quiet_below=0):
        pass
    assert re.fullmatch(r"fairdeploy: export: model\.onnx: done in \d+\.\d s", lines()[0])
    with progress.phase("one", total=1, quiet_below=0) as bar:
        bar.advance()
    assert "1 sample in" in lines()[0]


def test_short_failed_and_disabled_phases_write_nothing(lines, monkeypatch):
    with progress.phase("short"):  # under the default half second
        pass
    with pytest.raises(RuntimeError), progress.phase("fails", quiet_below=0):
        raise RuntimeError("boom")
    with progress.phase("disabled", enabled=False, quiet_below=0):
        pass
    progress.log("not shown", enabled=False)
    assert lines() == []
    monkeypatch.setenv("FAIRDEPLOY_PROGRESS", "off")
    with progress.phase("off", quiet_below=0):
        pass
    progress.log("off too")
    assert lines() == []


def test_a_slow_phase_is_logged_with_its_status(lines):
    with progress.phase("latency: whole model", total=1, unit="batch size") as bar:
        time.sleep(0.55)
        bar.advance()
        bar.status("2 batch sizes timed")
    (line,) = lines()
    assert line.startswith("fairdeploy: latency: whole model: 1 batch size in 0.")
    assert line.endswith("(2 batch sizes timed)")


def test_training_logs_one_line_per_epoch(lines, one_thread):
    torch.manual_seed(0)
    x = torch.randn(40, 4)
    y = (x[:, 0] > 0).long().numpy()
    g = np.arange(40) % 2
    data = TripleDataset(x, y, g)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    result = train_model(net, data, data, epochs=3, batch_size=16, lr=0.1, progress=True)
    epochs = [ln for ln in lines() if ": epoch " in ln]
    assert len(epochs) == 3
    for i, (line, h) in enumerate(zip(epochs, result.history, strict=True), start=1):
        assert line.startswith(f"fairdeploy: training: epoch {i}/3: loss {h['train_loss']:.4f}")
        assert f"val accuracy {h['val_accuracy']:.3f}" in line and "elapsed" in line


def test_feature_pass_reports_its_samples(lines, one_thread):
    data = TripleDataset(torch.randn(10, 3), np.zeros(10, int), np.zeros(10, int))
    trunk = nn.Linear(3, 2)
    orig = progress.phase

    def no_threshold(*a, **k):  # the pass takes milliseconds here
        return orig(*a, **{**k, "quiet_below": 0})

    import fairdeploy.features as features

    features.phase = no_threshold
    try:
        compute_features(trunk, data, batch_size=4, description="trunk pass: val split")
    finally:
        features.phase = orig
    assert [ln.split(" in ")[0] for ln in lines()] == [
        "fairdeploy: trunk pass: val split: 10 samples"
    ]


def test_words_for_numbers():
    assert plural(1, "sample") == "1 sample" and plural(2, "sample") == "2 samples"
    assert plural(1024, "entry", "entries") == "1,024 entries"
    assert fixed(0.85) == "0.850" and fixed(1) == "1.000" and fixed(0) == "0.000"
    assert fixed(None) == fixed(float("nan")) == "n/a"
    assert seconds(0.04) == "0.0 s" and seconds(245) == "4 min 05 s"
    assert nbytes(812) == "812 B" and nbytes(8_400) == "8.4 kB"
    assert nbytes(531_200_000) == "531.2 MB" and nbytes(1_200_000_000) == "1.20 GB"
    assert ago(5) == "just now" and ago(720) == "12 min ago" and ago(3 * 86400) == "3.0 days ago"


@pytest.mark.parametrize("given_first", [True, False])
def test_fairquantize_steps_report_the_hessians_they_recompute(lines, monkeypatch, given_first):
    """Every Hessian pass of FairQuantize's steps shows its progress (step s of S, samples of
    the scoring groups); a first step given cached Hessians computes none and shows none."""
    import fairdeploy.fairquantize as fq

    orig = progress.phase
    monkeypatch.setattr(fq, "phase", lambda *a, **k: orig(*a, **{**k, "quiet_below": 0}))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    g = torch.tensor([0, 1] * 9 + [2, 2])  # two samples of a group that is not scored
    first = None
    if given_first:
        h = fq.group_weight_hessians(model, ["0.weight", "2.weight"], x, y, g)
        first = {0: h[0], 1: h[1]}
        lines()
    fq.fairquantize(model, x, y, g, quantize_ratio=0.3, beta=0.5, steps=3, progress=True,
                    hessians=first)
    steps = (2, 3) if given_first else (1, 2, 3)
    assert [ln.split(" in ")[0] for ln in lines()] == [
        f"fairdeploy: FairQuantize step {s}/3: Hessians of 2 weight tensors: 18 samples"
        for s in steps
    ]
