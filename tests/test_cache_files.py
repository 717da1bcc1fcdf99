"""The cache commands see every kind of entry the cache writes and nothing else
(issue 21 item 6, issue 20 item 1); the folder is private, and an unwritable one only
costs the reuse (issue 21 items 11 and 16)."""

from __future__ import annotations

import json
import os
import re
import stat
import time
import warnings
from pathlib import Path

import pytest
import torch
from _reliability import ROOT

from fairdeploy.cache import CacheWarning, FeatureCache, entry_kind
from fairdeploy.cache_files import cache_entries, clear_cache, prune_cache
from fairdeploy.features import FeatureSet

#: Files a user may keep in (or next to) the cache folder: never listed, never deleted.
USER_FILES = [
    "features-of-my-dataset.csv", "svd-notes.txt", "hessian-backup.pt", "vanilla-model.onnx",
    "weight_hessian-old.pt", "features-" + "a" * 64 + ".pt.bak", "svd-" + "a" * 63 + ".pt",
    "vanilla-" + "b" * 24 + ".onnx.orig", "notes.txt", "features-" + "A" * 64 + ".pt",
]


def kinds_the_code_writes() -> set[str]:
    """Every cache kind named in fairdeploy's source (features are written by name)."""
    found = {"features"}
    for path in (ROOT / "fairdeploy").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        # Calls with the kind first (``ctx._cached("svd", ...)``, ``get_or_create_file(
        # "vanilla", ...)``) and kinds passed by keyword or as defaults (``kind="hessian"``;
        # this also finds other ``kind`` values, e.g. data kinds: harmless extra entries).
        found |= set(re.findall(
            r"(?:_cached|cached_tensors|get_or_compute_tensors|get_or_create_file)\(\s*"
            r"\"([a-z][a-z_0-9]*)\"", text))
        found |= set(re.findall(r"\bkind(?:: str)?\s*=\s*\"([a-z][a-z_0-9]*)\"", text))
    return found


def fill(cache_dir: Path) -> dict[str, Path]:
    """One entry of every kind the code writes; returns kind -> entry path."""
    cache = FeatureCache(cache_dir)
    for kind in sorted(kinds_the_code_writes()):
        if kind == "features":
            fs = FeatureSet(torch.ones(4, 3), torch.zeros(4, dtype=torch.long),
                            torch.zeros(4, dtype=torch.long))
            cache.get_or_compute({"checkpoint": "c" * 64, "split": "val"}, lambda fs=fs: fs)
        elif kind == "vanilla":
            cache.get_or_create_file(
                kind, {"checkpoint": "c" * 64}, lambda p: p.write_bytes(b"onnx"), suffix=".onnx"
            )
        else:
            cache.get_or_compute_tensors(kind, {"checkpoint": "c" * 64},
                                         lambda: {"h": torch.arange(5.0)})
    found = {}
    for p in cache_dir.iterdir():
        kind = entry_kind(p.name)
        if kind is not None:
            found[kind] = p
    return found


def test_the_code_writes_at_least_the_known_kinds() -> None:
    assert {"features", "svd", "hessian", "weight_hessian", "vanilla"} <= kinds_the_code_writes()


def test_every_kind_is_listed_pruned_and_cleared(tmp_path: Path) -> None:
    cache_dir = tmp_path / ".cache"
    entries = fill(cache_dir)
    assert set(entries) == kinds_the_code_writes()
    listed = cache_entries(cache_dir)
    assert {e.kind for e in listed} == kinds_the_code_writes()
    assert {e.path for e in listed} == set(entries.values())
    weight = next(e for e in listed if e.kind == "weight_hessian")
    assert weight.checkpoint_sha256 == "c" * 64 and weight.size == entries[
        "weight_hessian"].stat().st_size
    # prune: the weight-Hessian entry unused for 10 days goes, the rest stay.
    ten_days = time.time() - 10 * 86400
    os.utime(entries["weight_hessian"], (ten_days, ten_days))
    removed = prune_cache(cache_dir, keep_days=5)
    assert (removed.files, removed.kept) == (1, len(entries) - 1)
    assert not entries["weight_hessian"].exists()
    removed = clear_cache(cache_dir)
    assert removed.files == len(entries) - 1
    assert list(cache_dir.iterdir()) == []


def test_user_files_with_cache_like_names_are_never_touched(tmp_path: Path) -> None:
    cache_dir = tmp_path / ".cache"
    entries = fill(cache_dir)
    for name in USER_FILES:
        (cache_dir / name).write_text("mine")
    (cache_dir / "features-dir").mkdir()
    listed = {e.path.name for e in cache_entries(cache_dir)}
    assert listed == {p.name for p in entries.values()}
    old = time.time() - 100 * 86400
    for name in USER_FILES:
        os.utime(cache_dir / name, (old, old))
    prune_cache(cache_dir, keep_days=0, now=time.time() + 10)
    assert all((cache_dir / n).read_text() == "mine" for n in USER_FILES)
    assert not any(p.exists() for p in entries.values())
    fill(cache_dir)
    clear_cache(cache_dir)
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([*USER_FILES, "features-dir"])
    FeatureCache(cache_dir).clear()
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([*USER_FILES, "features-dir"])


def test_partial_writes_of_entries_are_listed_and_pruned(tmp_path: Path) -> None:
    from fairdeploy._stale import owned_name

    cache_dir = tmp_path / ".cache"
    entries = fill(cache_dir)
    partial = cache_dir / owned_name(entries["svd"].name, ".tmp")
    partial.write_bytes(b"half")
    work = cache_dir / owned_name(entries["vanilla"].name)
    work.mkdir()
    (work / entries["vanilla"].name).write_bytes(b"half")
    mine = cache_dir / owned_name("my-notes.txt", ".tmp")
    mine.write_text("mine")
    kinds = {e.path.name: e.kind for e in cache_entries(cache_dir)}
    assert kinds[partial.name] == "partial" and kinds[work.name] == "partial"
    assert mine.name not in kinds
    clear_cache(cache_dir)
    assert [p.name for p in cache_dir.iterdir()] == [mine.name]


def test_a_kind_or_suffix_that_would_break_the_names_is_refused(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    with pytest.raises(ValueError, match="lower-case identifier"):
        cache.get_or_compute_tensors("my-kind", {}, lambda: {"x": torch.ones(1)})
    with pytest.raises(ValueError, match="extension"):
        cache.get_or_create_file("vanilla", {}, lambda p: None, suffix=".onnx.gz")


def test_the_cache_folder_is_created_private(tmp_path: Path) -> None:
    cache_dir = tmp_path / "exports" / ".cache"
    FeatureCache(cache_dir).get_or_compute_tensors("svd", {}, lambda: {"x": torch.ones(2)})
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    cache_dir = tmp_path / "vanilla-cache"
    FeatureCache(cache_dir).get_or_create_file("vanilla", {}, lambda p: p.write_bytes(b"x"),
                                               suffix=".onnx")
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700


def test_an_unwritable_cache_folder_only_costs_the_reuse(tmp_path: Path) -> None:
    # A file where the folder should be: no user can write there (root included).
    (tmp_path / "blocked").write_text("a file")
    cache = FeatureCache(tmp_path / "blocked" / ".cache")
    with pytest.warns(CacheWarning, match="not cached"):
        t, hit = cache.get_or_compute_tensors("svd", {}, lambda: {"x": torch.ones(2)})
    assert not hit and torch.equal(t["x"], torch.ones(2))
    target = tmp_path / "run" / "vanilla.onnx"
    target.parent.mkdir()
    with pytest.warns(CacheWarning, match="not cached"):
        path, hit = cache.get_or_create_file(
            "vanilla", {}, lambda p: p.write_bytes(b"onnx"), suffix=".onnx", fallback=target
        )
    assert (path, hit) == (target, False) and target.read_bytes() == b"onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError):
            cache.get_or_create_file("vanilla", {}, lambda p: p.write_bytes(b"x"), suffix=".onnx")


def test_optimize_with_an_unwritable_cache_folder_succeeds(tmp_path: Path) -> None:
    """Issue 21 item 11: a read-only cache failed optimize on the vanilla export's write."""
    from _reliability import check_contract, check_run_folder, invoke, make_tiny

    tiny = make_tiny(tmp_path / "proj")
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / ".cache").write_text("not a folder")  # unwritable for every user, root too
    run = tmp_path / "run"
    out = invoke("optimize", tiny.ckpt, "--recipe", tiny.recipe, "--out", run, "--exports",
                 exports, "--no-latency")
    assert check_contract(out) == "ok", out.text
    check_run_folder(run)
    report = json.loads((run / "report.json").read_text())
    notes = report["notes"]
    assert any("not cached" in n or "could not write" in n for n in notes), notes
    assert (exports / ".cache").read_text() == "not a folder"
