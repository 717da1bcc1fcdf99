"""What the cache folder holds, for people: list its entries, clear it, prune old ones.

The persisted cache (:mod:`fairdeploy.cache`, ``exports/.cache`` by default) keeps trunk
features, SVD factors, Hessian diagonals (per-unit and per-weight) and vanilla ONNX
exports, each keyed by the checkpoint's SHA-256 among other things. Only the files the
cache wrote are listed, pruned or cleared, recognised by their full name
(:func:`fairdeploy.cache.entry_kind`), whatever their kind; a user's
``features-of-my-data.csv`` beside them is never touched. :func:`cache_entries` reads what
each file is and which checkpoint it belongs to (its path, from the run folders' reports
that name the same SHA-256), without reading the tensors. A cache hit refreshes a file's
modification time, so :func:`prune_cache` removes what was not used for N days.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdeploy.cache import cache_files, companions
from fairdeploy.errors import FairDeployError

__all__ = ["CacheEntry", "Removed", "cache_entries", "clear_cache", "prune_cache"]


@dataclass(frozen=True)
class CacheEntry:
    """One cached file.

    Attributes
    ----------
    path : Path
    kind : str
        ``features``, ``svd``, ``hessian``, ``weight_hessian``, ``vanilla`` (an ONNX
        export), a plug-in's own kind, or ``partial`` (a temporary an interrupted write
        left behind).
    size : int
        Bytes, an ONNX export's ``.onnx.data`` file included.
    last_used : float
        Modification time (a cache hit refreshes it), seconds since the epoch.
    checkpoint_sha256 : str or None
        The checkpoint the entry was computed from (None when unknown).
    checkpoints : tuple of str
        Paths of that checkpoint named by run folders beside the cache.
    what : str
        What the entry holds, in words (``test split at classifier.3``).
    """

    path: Path
    kind: str
    size: int
    last_used: float
    checkpoint_sha256: str | None
    checkpoints: tuple[str, ...]
    what: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "size": self.size,
            "last_used": self.last_used,
            "checkpoint_sha256": self.checkpoint_sha256,
            "checkpoints": list(self.checkpoints),
            "what": self.what,
        }


@dataclass(frozen=True)
class Removed:
    """What :func:`clear_cache` / :func:`prune_cache` deleted: files and bytes."""

    files: int
    bytes: int
    kept: int = 0


def _check_folder(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise FairDeployError(f"cache folder {str(directory)!r} is a file: give a folder")


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size + sum(c.stat().st_size for c in companions(p) if c.is_file())


def _run_checkpoints(exports: Path) -> dict[str, set[str]]:
    """checkpoint SHA-256 → checkpoint paths named in the run folders under ``exports``."""
    found: dict[str, set[str]] = {}
    for report in sorted(exports.glob("*/report.json")):
        try:
            ckpt = json.loads(report.read_text(encoding="utf-8"))["checkpoint"]
            found.setdefault(str(ckpt["sha256"]), set()).add(str(ckpt["path"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _describe_key(parts: dict[str, Any]) -> str:
    bits = []
    split = parts.get("split")
    if split == "scoring":
        bits.append(f"scoring set ({len(parts.get('subset') or []):,} training samples)")
    elif split:
        bits.append(f"{split} split")
    if parts.get("layer") is not None:
        rank = f", rank {parts['rank']}" if "rank" in parts else ""
        bits.append(f"layer {parts['layer']}{rank}")
    if parts.get("cut"):
        bits.append(f"at {parts['cut']}")
    arch = (parts.get("arch") or {}).get("arch") if isinstance(parts.get("arch"), dict) else None
    if arch:
        bits.append(f"({arch})")
    return " ".join(bits)


def _read_entry(p: Path) -> tuple[str | None, str]:
    """The checkpoint SHA-256 and a description of one cache file (reading no tensors)."""
    if p.suffix == ".onnx":
        from fairdeploy.export import read_metadata

        try:
            meta = read_metadata(p)
        except FairDeployError:
            return None, "vanilla ONNX export (unreadable)"
        return meta.get("checkpoint_sha256"), "vanilla ONNX export"
    import torch

    try:
        payload = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        parts = json.loads(payload["key_parts"])
    except Exception:  # unreadable cache files are misses for the cache itself too
        return None, "unreadable (recomputed on next use)"
    return parts.get("checkpoint"), _describe_key(parts)


def cache_entries(directory: str | os.PathLike[str]) -> list[CacheEntry]:
    """Every file in a cache folder, most recently used first.

    Parameters
    ----------
    directory : path-like
        The cache folder (``exports/.cache``); run folders are looked for in its parent.
    """
    directory = Path(directory)
    _check_folder(directory)
    owners = _run_checkpoints(directory.parent)
    entries = []
    for p, kind in cache_files(directory):
        st = p.stat()
        if kind == "partial":
            sha, what = None, "left by an interrupted write (safe to delete)"
        else:
            sha, what = _read_entry(p)
        entries.append(
            CacheEntry(
                path=p,
                kind=kind,
                size=_size(p),
                last_used=st.st_mtime,
                checkpoint_sha256=sha,
                checkpoints=tuple(sorted(owners.get(sha or "", ()))),
                what=what,
            )
        )
    return sorted(entries, key=lambda e: -e.last_used)


def _remove(paths: list[Path]) -> tuple[int, int]:
    files = size = 0
    for p in paths:
        try:
            size += _size(p)
            if p.is_dir():
                shutil.rmtree(p)
            else:
                for c in companions(p):
                    c.unlink(missing_ok=True)
                p.unlink()
            files += 1
        except FileNotFoundError:
            continue
    return files, size


def clear_cache(directory: str | os.PathLike[str]) -> Removed:
    """Delete every cache file in ``directory`` (they are recomputed when needed).

    Only the files the cache wrote are touched (every kind's entries, recognised by their
    full name, with their companions, and partial writes); anything else in the folder
    stays, ``features-of-my-data.csv`` included.
    """
    directory = Path(directory)
    _check_folder(directory)
    files, size = _remove([p for p, _ in cache_files(directory)])
    return Removed(files, size)


def prune_cache(
    directory: str | os.PathLike[str], *, keep_days: float, now: float | None = None
) -> Removed:
    """Delete the cache files not used for more than ``keep_days`` days.

    A file's last use is its modification time: written on a miss, refreshed on a hit.
    Partial writes older than a day go too.
    """
    if not keep_days >= 0:
        raise FairDeployError(f"--keep-days {keep_days!r} is not allowed: use a number ≥ 0")
    directory = Path(directory)
    _check_folder(directory)
    now = time.time() if now is None else now
    old, kept = [], 0
    for p, kind in cache_files(directory):
        limit = max(keep_days, 1.0) if kind == "partial" else keep_days
        if now - p.stat().st_mtime > limit * 86400:
            old.append(p)
        else:
            kept += 1
    files, size = _remove(old)
    return Removed(files, size, kept)
