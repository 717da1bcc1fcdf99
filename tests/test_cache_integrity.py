"""Every cache entry carries a content checksum, checked on read, recomputed on mismatch.

The reference for "the right value" is always the compute function's own fresh result;
the damage is real (bytes flipped inside a tensor record of the zip archive, a file cut
short, a file size limit hit while writing in a subprocess).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from _reliability import ROOT, check_contract, check_run_folder, invoke, make_tiny, temporaries

from fairdeploy.cache import FeatureCache
from fairdeploy.features import FeatureSet


def flip_tensor_byte(path: Path, *, record: int = 0, offset: int = 8) -> None:
    """Flip one bit inside the ``record``-th tensor record of a torch.save zip archive."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = [i for i in zf.infolist() if "/data/" in i.filename][record]
    h = info.header_offset
    name_len, extra_len = struct.unpack("<HH", raw[h + 26 : h + 30])
    start = h + 30 + name_len + extra_len
    raw[start + min(offset, info.file_size - 1)] ^= 0x10
    path.write_bytes(bytes(raw))


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"U": torch.randn(12, 3, generator=g), "V": torch.randn(3, 5, generator=g)}


def test_a_flipped_byte_in_a_tensor_entry_is_caught_and_recomputed(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return _tensors()

    cache.get_or_compute_tensors("svd", {"k": 1}, compute)
    (entry,) = tmp_path.glob("svd-*.pt")
    flip_tensor_byte(entry)
    # torch.load alone does not notice: the damaged values load.
    damaged = torch.load(entry, weights_only=True)["tensors"]
    assert not torch.equal(damaged["U"], _tensors()["U"])
    with pytest.warns(RuntimeWarning, match="does not match its checksum"):
        got, hit = cache.get_or_compute_tensors("svd", {"k": 1}, compute)
    assert not hit and len(calls) == 2
    assert all(torch.equal(got[k], _tensors()[k]) for k in got)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: a clean hit now
        got, hit = cache.get_or_compute_tensors("svd", {"k": 1}, compute)
    assert hit and all(torch.equal(got[k], _tensors()[k]) for k in got)


def test_a_rewritten_entry_with_other_values_is_caught(tmp_path: Path) -> None:
    """A well-formed file whose tensors were replaced (same key, stale checksum)."""
    cache = FeatureCache(tmp_path)
    fs = FeatureSet(torch.randn(6, 4), torch.arange(6) % 2, torch.arange(6) % 2)
    cache.get_or_compute({"split": "test"}, lambda: fs)
    path = cache.path({"split": "test"})
    payload = torch.load(path, weights_only=True)
    payload["tensors"]["features"] = payload["tensors"]["features"] + 1.0
    torch.save(payload, path)
    with pytest.warns(RuntimeWarning, match="checksum"):
        got, hit = cache.get_or_compute({"split": "test"}, lambda: fs)
    assert not hit and torch.equal(got.features, fs.features)


def test_a_truncated_entry_is_recomputed(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.get_or_compute_tensors("hessian", {"k": 2}, _tensors)
    (entry,) = tmp_path.glob("hessian-*.pt")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match="unreadable cache file"):
        got, hit = cache.get_or_compute_tensors("hessian", {"k": 2}, lambda: _tensors(1))
    assert not hit and torch.equal(got["U"], _tensors(1)["U"])


def _write_file(path: Path, body: bytes = b"onnx bytes " * 100, data: bytes | None = None):
    path.write_bytes(body)
    if data is not None:
        path.with_name(path.name + ".data").write_bytes(data)


@pytest.mark.parametrize(
    "damage",
    ["truncate", "flip", "no_check", "check_of_other_key", "data_file_changed"],
)
def test_a_damaged_file_entry_is_created_again(tmp_path: Path, damage: str) -> None:
    cache = FeatureCache(tmp_path / "c")
    made = []

    def create(path: Path) -> None:
        made.append(path)
        _write_file(path, data=b"weights" * 50)

    path, hit = cache.get_or_create_file("vanilla", {"k": 1}, create, suffix=".onnx")
    assert not hit and path.read_bytes() == b"onnx bytes " * 100
    assert path.with_name(path.name + ".data").read_bytes() == b"weights" * 50
    assert cache.get_or_create_file("vanilla", {"k": 1}, create, suffix=".onnx")[1]
    assert len(made) == 1
    check = path.with_name(path.name + ".check")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:10])
    elif damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[5] ^= 1
        path.write_bytes(bytes(raw))
    elif damage == "no_check":
        check.unlink()
    elif damage == "check_of_other_key":
        doc = json.loads(check.read_text())
        doc["key"] = "0" * 64
        check.write_text(json.dumps(doc))
    else:
        path.with_name(path.name + ".data").write_bytes(b"other" * 70)
    with pytest.warns(RuntimeWarning, match="creating it again"):
        again, hit = cache.get_or_create_file("vanilla", {"k": 1}, create, suffix=".onnx")
    assert not hit and again == path and len(made) == 2
    assert path.read_bytes() == b"onnx bytes " * 100
    assert cache.get_or_create_file("vanilla", {"k": 1}, create, suffix=".onnx")[1]
    assert not temporaries(tmp_path)


def test_a_failing_creator_leaves_nothing(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)

    def create(path: Path) -> None:
        path.write_bytes(b"half")
        raise ValueError("exporter failed")

    with pytest.raises(ValueError, match="exporter failed"):
        cache.get_or_create_file("vanilla", {"k": 1}, create, suffix=".onnx")
    assert list(tmp_path.iterdir()) == []


_FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys, warnings
    import torch
    from fairdeploy.cache import FeatureCache
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    cache = FeatureCache(sys.argv[1])
    big = {"U": torch.arange(10000, dtype=torch.float32)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, hit = cache.get_or_compute_tensors("svd", {"k": 1}, lambda: big)
    assert not hit and torch.equal(got["U"], big["U"])
    print([str(w.message) for w in caught])
    """
)


def test_a_full_disk_under_the_cache_costs_only_the_reuse(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "could not write cache file" in proc.stdout and "disk" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_altered_cache_entries_do_not_change_the_report(tmp_path: Path) -> None:
    """End to end: flip a byte in every cached tensor entry; the rerun recomputes them
    (with a warning) and its report equals the first run's."""
    tiny = make_tiny(tmp_path / "p")
    exp = tmp_path / "exp"
    args = ("optimize", tiny.ckpt, "--recipe", tiny.recipe, "--exports", exp, "--no-latency")
    assert check_contract(invoke(*args, "--out", tmp_path / "r1")) == "ok"
    entries = sorted((exp / ".cache").glob("*.pt"))
    assert {p.name.split("-")[0] for p in entries} >= {"features", "svd", "hessian"}
    for p in entries:
        flip_tensor_byte(p)
    vanilla = next((exp / ".cache").glob("vanilla-*.onnx"))
    # A truncated vanilla export (a new file: run folders hard-link the entry's old one,
    # and their manifests would catch damage to it there).
    head = vanilla.read_bytes()[:100]
    vanilla.unlink()
    vanilla.write_bytes(head)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = invoke(*args, "--out", tmp_path / "r2")
    assert check_contract(out) == "ok"
    a, b = check_run_folder(tmp_path / "r1"), check_run_folder(tmp_path / "r2")
    # Each recomputed entry is said once: in the report's warnings (fairdeploy's own
    # warnings become report notes, printed by the CLI) or, outside a run, on stderr.
    messages = [str(w.message) for w in caught] + b["notes"]
    assert sum("checksum" in m for m in messages) == len(entries)
    assert any("creating it again" in m for m in messages)
    assert all(f"warning: {m}" in out.text for m in b["notes"] if "checksum" in m)
    assert not any(b["feature_cache"]["hits"].values())
    assert a["methods"] == b["methods"] and a["bootstrap"] == b["bootstrap"]
    assert a["onnx"] == b["onnx"]
    assert not temporaries(tmp_path)
