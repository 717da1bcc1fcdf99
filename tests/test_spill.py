"""The first trunk pass through a file: ``compute_features(spill=...)`` and the feature cache's
``spill`` mode hold no features in memory while they are computed, give the same numbers as
the pass in memory, leave no file behind, and fall back to memory (with a warning) where no
file can be made."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import TripleDataset
from torch import nn

from fairdeploy.cache import CacheWarning, FeatureCache
from fairdeploy.features import SPILL_SUPPORTED, compute_features

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not SPILL_SUPPORTED, reason="no os.posix_fallocate here")


def _task(n: int = 37, tokens: int = 3) -> tuple[nn.Module, TripleDataset]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 4 * tokens), nn.Unflatten(1, (tokens, 4)), nn.GELU())
    rng = np.random.default_rng(0)
    data = TripleDataset(torch.randn(n, 5), rng.integers(0, 3, n), rng.integers(0, 2, n))
    return trunk.eval(), data


def _mapped(path: Path) -> bool:
    """Whether this process maps ``path`` (a tensor reads from it)."""
    text = Path("/proc/self/maps").read_text()
    return any(line.endswith(str(path)) or line.endswith(f"{path} (deleted)")
               for line in text.splitlines())


@pytest.mark.parametrize("batch_size", [1, 8, 64])  # one batch, several, a ragged last one
def test_features_backed_by_a_file_equal_those_in_memory(tmp_path: Path, batch_size) -> None:
    trunk, data = _task()
    want = compute_features(trunk, data, batch_size=batch_size, progress=False)
    spill = tmp_path / "spill.bin"
    got = compute_features(trunk, data, batch_size=batch_size, progress=False, spill=spill)
    assert torch.equal(got.features, want.features) and got.features.shape == (37, 3, 4)
    assert torch.equal(got.targets, want.targets) and torch.equal(got.groups, want.groups)
    # The tensor is the file: its size is the features', and it is mapped, not copied.
    assert spill.stat().st_size == 37 * 3 * 4 * 4
    assert _mapped(spill) and spill.stat().st_mode & 0o777 == 0o600
    on_disk = np.fromfile(spill, dtype=np.float32).reshape(37, 3, 4)
    np.testing.assert_array_equal(on_disk, want.features.numpy())


def test_a_spill_file_that_exists_is_resized_to_the_features(tmp_path: Path) -> None:
    trunk, data = _task(n=5)
    spill = tmp_path / "old.bin"
    spill.write_bytes(b"\xff" * 100_000)
    got = compute_features(trunk, data, progress=False, spill=spill)
    assert spill.stat().st_size == 5 * 3 * 4 * 4
    assert torch.equal(got.features, compute_features(trunk, data, progress=False).features)


def test_the_cache_computes_through_a_file_and_returns_the_entry_mapped(tmp_path: Path) -> None:
    trunk, data = _task()
    want = compute_features(trunk, data, progress=False)
    cache = FeatureCache(tmp_path / "cache")
    seen: list[Path | None] = []

    def compute(spill: Path | None = None):
        seen.append(spill)
        assert spill is not None and spill.parent == cache.directory and spill.exists()
        return compute_features(trunk, data, progress=False, spill=spill)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, hit = cache.get_or_compute({"k": 1}, compute, spill=True)
    assert not hit and torch.equal(got.features, want.features)
    entry = cache.path({"k": 1})
    # Nothing but the entry is left, and the features read from it (memory-mapped).
    assert sorted(p.name for p in cache.directory.iterdir()) == [entry.name]
    assert _mapped(entry) and not seen[0].exists()
    again, hit = cache.get_or_compute({"k": 1}, compute, spill=True)
    assert hit and torch.equal(again.features, want.features) and len(seen) == 1


def test_a_failed_pass_leaves_no_spill_file(tmp_path: Path) -> None:
    trunk, data = _task()
    cache = FeatureCache(tmp_path)

    def compute(spill: Path | None = None):
        compute_features(trunk, data, progress=False, spill=spill, batch_size=8)
        raise ValueError("the trunk failed")

    with pytest.raises(ValueError, match="the trunk failed"):
        cache.get_or_compute({"k": 2}, compute, spill=True)
    assert list(tmp_path.iterdir()) == []


_NO_ROOM = textwrap.dedent(
    """
    import resource, signal, sys, warnings
    import numpy as np, torch
    sys.path.insert(0, sys.argv[2])
    from _fixtures import TripleDataset
    from fairdeploy.cache import CacheWarning, FeatureCache
    from fairdeploy.features import compute_features
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    torch.manual_seed(0)
    trunk = torch.nn.Linear(5, 64).eval()
    n = 50  # 50 × 64 floats: 12.8 kB, more than the 4 kB the limit allows
    data = TripleDataset(torch.randn(n, 5), np.zeros(n, int), np.arange(n) % 2)
    want = compute_features(trunk, data, progress=False)
    cache = FeatureCache(sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, hit = cache.get_or_compute(
            {"k": 1}, lambda spill=None: compute_features(trunk, data, progress=False,
                                                          spill=spill), spill=True)
    assert not hit and torch.equal(got.features, want.features)
    print([str(w.message) for w in caught])
    """
)


def test_no_room_for_the_file_falls_back_to_memory_with_a_warning(tmp_path: Path) -> None:
    """A file size limit (as a full disk) refuses the spill file's blocks up front (no
    SIGBUS later): the pass runs in memory, and says so."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _NO_ROOM, str(tmp_path), str(ROOT / "tests")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # One warning: the entry could not be written either, and that warning tells it.
    [warning] = ast.literal_eval(proc.stdout.strip())  # the messages the script printed
    assert warning.startswith("could not write feature cache file")
    assert list(tmp_path.iterdir()) == []  # neither the spill file nor a partial entry


def test_a_spill_that_cannot_be_allocated_runs_in_memory_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the blocks cannot be allocated but the entry can be written (here: as on a
    platform without posix_fallocate), the pass runs in memory, the entry is written, and
    one warning says why the file was not used."""
    import fairdeploy.features as features

    trunk, data = _task()
    monkeypatch.setattr(features, "SPILL_SUPPORTED", False)
    cache = FeatureCache(tmp_path)
    with pytest.warns(CacheWarning, match="could not hold the features in a file") as caught:
        got, hit = cache.get_or_compute(
            {"k": 3}, lambda spill=None: compute_features(trunk, data, progress=False,
                                                          spill=spill), spill=True)
    assert len(caught) == 1 and not hit
    assert torch.equal(got.features, compute_features(trunk, data, progress=False).features)
    assert [p.name for p in tmp_path.iterdir()] == [cache.path({"k": 3}).name]


_SIGTERM = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import numpy as np, torch
    sys.path.insert(0, sys.argv[2])
    from _fixtures import TripleDataset
    from fairdeploy.cache import CacheWarning, FeatureCache
    from fairdeploy.features import compute_features

    class Slow(torch.nn.Module):
        def forward(self, x):
            if int(os.environ.get("SLOW_STARTED", "0")) == 0:
                os.environ["SLOW_STARTED"] = "1"
                print("ready", flush=True)
            time.sleep(0.05)
            return x.repeat(1, 1000)

    n = 2000
    data = TripleDataset(torch.randn(n, 5), np.zeros(n, int), np.arange(n) % 2)
    FeatureCache(sys.argv[1]).get_or_compute(
        {"k": 1}, lambda spill=None: compute_features(Slow(), data, batch_size=10,
                                                      progress=False, spill=spill), spill=True)
    """
)


def test_sigterm_during_the_pass_removes_the_spill_file(tmp_path: Path) -> None:
    import signal

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM, str(tmp_path), str(ROOT / "tests")],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert any(p.name.endswith(".spill") for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        proc.kill()
    assert list(tmp_path.iterdir()) == []


_DISK_FULL_AT_WRITE = textwrap.dedent(
    """
    import resource, signal, sys, warnings
    import numpy as np, torch
    sys.path.insert(0, sys.argv[2])
    from _fixtures import TripleDataset
    from fairdeploy.cache import CacheWarning, FeatureCache
    from fairdeploy.features import compute_features
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Room for the spill file (12,800 bytes) but not for the entry (larger: a zip archive).
    resource.setrlimit(resource.RLIMIT_FSIZE, (13_000, 13_000))
    torch.manual_seed(0)
    trunk = torch.nn.Linear(5, 64).eval()
    n = 50
    data = TripleDataset(torch.randn(n, 5), np.zeros(n, int), np.arange(n) % 2)
    want = compute_features(trunk, data, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, hit = FeatureCache(sys.argv[1]).get_or_compute(
            {"k": 1}, lambda spill=None: compute_features(trunk, data, progress=False,
                                                          spill=spill), spill=True)
    assert not hit and torch.equal(got.features, want.features)
    maps = open("/proc/self/maps").read()
    assert ".spill" not in maps, "the features still read from the deleted spill file"
    print([str(w.message) for w in caught])
    """
)


def test_an_entry_that_cannot_be_written_leaves_the_features_in_memory(tmp_path: Path) -> None:
    """The spill file fits, the entry does not: the features are copied into memory before
    the spill file is removed, so no deleted file keeps holding disk space."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_AT_WRITE, str(tmp_path), str(ROOT / "tests")],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [warning] = ast.literal_eval(proc.stdout.strip())
    assert warning.startswith("could not write feature cache file")
    assert list(tmp_path.iterdir()) == []


def test_the_experiment_computes_its_trunk_passes_through_the_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every trunk pass of an experiment with a cache folder gets a spill file there, and
    the features equal a run without a cache."""
    from _tiny_nets import three_class_arrays, three_class_recipe, trained_mlp

    import fairdeploy.context as context
    from fairdeploy.experiment import Experiment
    from fairdeploy.recipe import parse_recipe

    arrays = three_class_arrays(n=240)
    np.savez(tmp_path / "data.npz", **arrays)
    model = trained_mlp(arrays)
    recipe = parse_recipe(three_class_recipe(tmp_path / "data.npz", method={
        "name": "fairlrf", "layers": [{"layer": "layers.2", "rank": 8, "sr": 0.25}],
        "scoring": {"samples_per_group": 20}}))
    spills: list[Path | None] = []
    real = context.compute_features

    def spy(*args, **kwargs):
        spills.append(kwargs.get("spill"))
        return real(*args, **kwargs)

    monkeypatch.setattr(context, "compute_features", spy)
    cached = Experiment(recipe, model, cache_dir=tmp_path / "cache", progress=False)
    fair = cached.apply(recipe.method)
    assert spills and all(s is not None and s.parent == tmp_path / "cache" for s in spills)
    assert not list((tmp_path / "cache").glob(".*spill*"))
    plain = Experiment(recipe, model, progress=False)
    for split in ("val", "test"):
        torch.testing.assert_close(cached.context.features[split].features,
                                   plain.context.features[split].features, rtol=0, atol=0)
    assert cached.evaluate(fair).to_dict() == plain.evaluate(plain.apply(recipe.method)).to_dict()


@pytest.mark.parametrize("batch_size", [1, 4, 64])
@pytest.mark.parametrize("spilled", [False, True])
def test_non_finite_trunk_outputs_name_their_count_and_first_sample(
    tmp_path: Path, batch_size: int, spilled: bool
) -> None:
    """Checked batch by batch (no whole-set mask): the count and the first sample are the
    ones a direct check of the whole output finds."""
    from fairdeploy.errors import FairDeployError

    trunk, data = _task(n=20)
    data.x[[5, 6, 17]] = torch.tensor([np.inf, np.nan, 1e39]).unsqueeze(1)
    with torch.no_grad():
        direct = trunk(data.x)
    rows = torch.nonzero(~torch.isfinite(direct.reshape(20, -1)).all(1)).flatten().tolist()
    assert rows == [5, 6, 17]
    spill = tmp_path / "s.bin" if spilled else None
    with pytest.raises(FairDeployError, match=r"not finite .* for 3 of 20 samples \(first: "
                                              r"sample 5\)"):
        compute_features(trunk, data, batch_size=batch_size, progress=False, spill=spill)
