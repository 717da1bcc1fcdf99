"""The persisted cache: features, SVD factors, Hessian diagonals, keyed by what they depend on.

Every cached value is keyed by the canonical JSON of its key parts (checkpoint content
hash, data config, a fingerprint of the data's content, the cut, versions, ...). Files
are written atomically and read with ``torch.load(weights_only=True)``; an unreadable
or inconsistent file is a miss (with a warning), never a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairdeploy._io import atomic_torch_save
from fairdeploy.errors import FairDeployError
from fairdeploy.features import FeatureSet

__all__ = ["FeatureCache", "dataset_fingerprint", "file_sha256"]

# Bump when the cached file layout or the meaning of a key changes: old files then miss.
_CACHE_FORMAT = "fairdeploy-feature-cache/1"


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file's content, read in 1 MiB chunks.

    Digests are remembered per process by (resolved path, size, mtime), so hashing
    the same checkpoint for several cache keys reads it once.
    """
    p = Path(path)
    try:
        st = p.stat()
        resolved = str(p.resolve())
    except OSError as exc:
        raise FairDeployError(f"cannot hash {str(path)!r}: {exc.strerror or exc}") from None
    if not p.is_file():
        raise FairDeployError(f"cannot hash {str(path)!r}: it is not a file")
    key = (resolved, st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    if hasattr(value, "model_dump"):  # pydantic models (recipe sections)
        return value.model_dump(mode="json")
    raise TypeError(f"cache key part of type {type(value).__name__} is not JSON-serializable")


def _canonical_json(parts: Mapping[str, Any]) -> str:
    return json.dumps(
        parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable
    )


class FeatureCache:
    """Features on disk, one file per key, under ``directory``.

    The key is the SHA-256 of the canonical JSON of ``key_parts`` (plus a format
    version). The caller puts in it everything the features depend on: the checkpoint's
    content hash (:func:`file_sha256`), the data config, the preprocessing, the split
    name and the layer. Files are written atomically and read with
    ``torch.load(weights_only=True)``; an unreadable or inconsistent file is reported
    with a warning and recomputed.

    Parameters
    ----------
    directory : str or os.PathLike
        Where the ``<key>.pt`` files live (created on first write), e.g.
        ``exports/.cache``.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def key(self, key_parts: Mapping[str, Any]) -> str:
        """The hex SHA-256 cache key of ``key_parts`` (order of mapping keys is irrelevant)."""
        return hashlib.sha256(
            _canonical_json({"format": _CACHE_FORMAT, "parts": dict(key_parts)}).encode()
        ).hexdigest()

    def path(self, key_parts: Mapping[str, Any]) -> Path:
        """The file that holds (or would hold) the features for ``key_parts``."""
        return self.directory / f"features-{self.key(key_parts)}.pt"

    def get_or_compute(
        self,
        key_parts: Mapping[str, Any],
        compute: Callable[[], FeatureSet],
    ) -> tuple[FeatureSet, bool]:
        """Load the features for ``key_parts``, or compute, save and return them.

        Returns
        -------
        features : FeatureSet
        hit : bool
            True if they were read from the cache.
        """
        key = self.key(key_parts)
        path = self.directory / f"features-{key}.pt"
        if path.exists():
            try:
                fs = _load_features(path, key)
                _touch(path)
                return fs, True
            except Exception as exc:  # any unreadable file is a miss, never a crash
                warnings.warn(
                    f"ignoring unreadable feature cache file {str(path)!r} "
                    f"({type(exc).__name__}: {exc}); recomputing it",
                    RuntimeWarning,
                    stacklevel=2,
                )
        fs = compute()
        if not isinstance(fs, FeatureSet):
            raise TypeError(f"compute() returned {type(fs).__name__}, not a FeatureSet")
        try:
            _save_features(path, key, _canonical_json(dict(key_parts)), fs)
        except OSError as exc:
            warnings.warn(
                f"could not write feature cache file {str(path)!r} ({exc}); the features "
                "were computed but not cached (choose a writable cache directory)",
                RuntimeWarning,
                stacklevel=2,
            )
        return fs, False

    def get_or_compute_tensors(
        self,
        kind: str,
        key_parts: Mapping[str, Any],
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Like :meth:`get_or_compute` for a flat dict of tensors (e.g. SVD factors or
        Hessian diagonals), stored as ``<kind>-<key>.pt``."""
        key = self.key({"kind": kind, **key_parts})
        path = self.directory / f"{kind}-{key}.pt"
        if path.exists():
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
                if payload.get("format") != _CACHE_FORMAT or payload.get("key") != key:
                    raise ValueError("not a fairdeploy cache file for this key")
                _touch(path)
                return dict(payload["tensors"]), True
            except Exception as exc:  # any unreadable file is a miss, never a crash
                warnings.warn(
                    f"ignoring unreadable cache file {str(path)!r} ({type(exc).__name__}); "
                    "recomputing it",
                    RuntimeWarning,
                    stacklevel=2,
                )
        tensors = compute()
        payload = {
            "format": _CACHE_FORMAT,
            "key": key,
            "key_parts": _canonical_json(dict(key_parts)),
            "tensors": {k: _compact(v) for k, v in tensors.items()},
        }
        try:
            atomic_torch_save(payload, path)
        except OSError as exc:
            warnings.warn(
                f"could not write cache file {str(path)!r} ({exc}); computed but not cached",
                RuntimeWarning,
                stacklevel=2,
            )
        return tensors, False

    def get_or_create_file(
        self,
        kind: str,
        key_parts: Mapping[str, Any],
        create: Callable[[Path], None],
        *,
        suffix: str,
    ) -> tuple[Path, bool]:
        """The cached file for ``key_parts`` (e.g. the vanilla ONNX export), created on a miss.

        ``create(path)`` writes the file at ``path`` (atomically: the caller's writer
        renames when complete). Returns the path and whether it was a hit.
        """
        key = self.key({"kind": kind, **key_parts})
        path = self.directory / f"{kind}-{key[:24]}{suffix}"
        if path.is_file():
            _touch(path)
            return path, True
        self.directory.mkdir(parents=True, exist_ok=True)
        create(path)
        return path, False

    def clear(self) -> int:
        """Delete every cached file (features, SVD factors, Hessians, vanilla exports)."""
        removed = 0
        for p in [*self.directory.glob("*-*.pt"), *self.directory.glob("vanilla-*.onnx")]:
            p.unlink(missing_ok=True)
            removed += 1
        return removed


def _touch(path: Path) -> None:
    """Mark a cache file as used now: ``fairdeploy cache prune`` removes unused ones."""
    with contextlib.suppress(OSError):  # a read-only cache still serves hits
        os.utime(path)


def _compact(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: copy views of larger tensors.
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _save_features(path: Path, key: str, parts_json: str, fs: FeatureSet) -> None:
    payload = {
        "format": _CACHE_FORMAT,
        "key": key,
        "key_parts": parts_json,  # for humans inspecting the cache
        "features": _compact(fs.features),
        "targets": _compact(fs.targets),
        "groups": _compact(fs.groups),
    }
    atomic_torch_save(payload, path)


def _load_features(path: Path, key: str) -> FeatureSet:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _CACHE_FORMAT:
        raise ValueError("not a fairdeploy feature cache file")
    if payload.get("key") != key:
        raise ValueError("the file's key does not match its name")
    return FeatureSet(payload["features"], payload["targets"], payload["groups"])


def dataset_fingerprint(ds: Any) -> str:
    """A hash of what a dataset holds: labels, groups and, per kind, the input tensor's bytes
    or each image file's (path, size, mtime). Cheap next to a trunk pass."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(ds.targets, dtype=np.int64)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(ds.groups, dtype=np.int64)).tobytes())
    features = getattr(ds, "features", None)
    if torch.is_tensor(features):
        h.update(features.detach().cpu().contiguous().numpy().tobytes())
    for p in getattr(ds, "paths", ()):
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
