"""The persisted cache: features, SVD factors, Hessian diagonals, keyed by what they depend on.

Every cached value is keyed by the canonical JSON of its key parts (checkpoint content
hash, data config, a fingerprint of the data's content, the cut, versions, ...). Files
are written atomically and read with ``torch.load(weights_only=True)``.

Every entry carries a content checksum, checked on every read: a tensor entry stores the
SHA-256 of its key and of each tensor's dtype, shape and bytes; a file entry (the vanilla
ONNX export) has a ``<file>.check`` beside it with the size and SHA-256 of each file,
written last. An unreadable, truncated, altered or incomplete entry is a miss: a
``CacheWarning`` (a ``RuntimeWarning``) names it and the value is recomputed and
written again, so a damaged cache never changes a result and never fails a run. A cache
that cannot be written (a full disk, no permission, a read-only folder) only costs the
reuse: the run goes on with a warning.

Every file the cache writes has a name of one shape, and nothing else in the folder is
ever listed, pruned or deleted (:func:`entry_kind`): a tensor entry is
``<kind>-<64 hex digits>.pt``, a file entry ``<kind>-<24 hex digits><.suffix>`` with its
``.data`` and ``.check`` companions, where ``<kind>`` is a lower-case identifier
(``features``, ``svd``, ``hessian``, ``weight_hessian``, ``vanilla``, or a plug-in's own).
The folder is created private to its user (mode 0700): the entries are trusted like the
code (a checksum catches damage, not a forgery), so only its owner may write them.
Temporaries of writes cut short by SIGKILL are removed by the next run
(:mod:`fairdeploy._stale`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fairdeploy._digest import sha256_file
from fairdeploy._io import atomic_torch_save, atomic_write_text
from fairdeploy._signals import cleanup_on_sigterm
from fairdeploy._stale import make_owned_dir, make_owned_file, owned_target, remove_stale
from fairdeploy.errors import FairDeployError, first_line
from fairdeploy.features import FeatureSet


class CacheWarning(RuntimeWarning):
    """A cached value could not be used (damaged, altered, unwritable) and was recomputed:
    the numbers are right, the run was slower. Reported once per run, not per method."""


__all__ = [
    "CacheWarning",
    "FeatureCache",
    "cache_files",
    "companions",
    "dataset_fingerprint",
    "entry_kind",
    "file_sha256",
    "tensors_checksum",
]

# Bump when the cached file layout or the meaning of a key changes: old files then miss.
_CACHE_FORMAT = "fairdeploy-feature-cache/2"  # /2: content checksums


_HASH_CACHE: dict[tuple[str, int, int], str] = {}

_KIND = re.compile(r"[a-z][a-z0-9_]*")
_ENTRY = re.compile(
    r"(?P<kind>[a-z][a-z0-9_]*)-(?:[0-9a-f]{64}\.pt|[0-9a-f]{24}\.[a-z0-9]+)"
)
#: What a file entry carries beside it (external weights, its checksum record).
COMPANION_SUFFIXES = (".data", ".check")


def entry_kind(name: str) -> str | None:
    """The kind of cache entry a file name is (``features``, ``svd``, ``vanilla``, ...),
    or None when the cache never writes a file of that name (a user's file, or an
    entry's ``.data``/``.check`` companion)."""
    m = _ENTRY.fullmatch(name)
    return m["kind"] if m else None


def _check_kind(kind: str) -> None:
    if not _KIND.fullmatch(kind):
        raise ValueError(f"cache kind {kind!r} must be a lower-case identifier ([a-z][a-z0-9_]*)")


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
        _HASH_CACHE[key] = sha256_file(p)
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
    name and the layer. Files are written atomically, read with
    ``torch.load(weights_only=True)`` and checked against their content checksum; an
    unreadable, altered or inconsistent file is reported with a warning and recomputed.

    Parameters
    ----------
    directory : str or os.PathLike
        Where the ``<key>.pt`` files live (created on first write), e.g.
        ``exports/.cache``. Temporaries left there by killed runs are removed.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        remove_stale(self.directory)

    def _make_folder(self) -> None:
        """Create the folder private to its user (0700); an existing one is left as is.
        An unwritable place raises ``OSError`` (the writers turn it into a warning)."""
        if not self.directory.is_dir():
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.directory.mkdir(mode=0o700)

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
        compute: Callable[..., FeatureSet],
        *,
        spill: bool = False,
    ) -> tuple[FeatureSet, bool]:
        """Load the features for ``key_parts``, or compute, save and return them.

        With ``spill``, ``compute`` is called as ``compute(path)`` with a temporary file in
        the cache folder to back the features with while they are computed
        (:func:`~fairdeploy.features.compute_features`'s ``spill``): the first pass holds
        none of them in memory, the entry is written from that file, the file is removed
        and the entry is returned memory-mapped, as a hit is. Where no such file can be
        made (an unwritable folder, a full disk), ``compute()`` runs in memory instead,
        with one :class:`CacheWarning` (the failed write's, when the entry cannot be
        written either).

        Returns
        -------
        features : FeatureSet
        hit : bool
            True if they were read from the cache (and passed their checksum).
        """
        key = self.key(key_parts)
        path = self.directory / f"features-{key}.pt"
        # Memory-mapped: cached token tensors of a transformer block (about 1.2 MB per
        # sample for ViT-B/16) are paged in chunk by chunk instead of held in memory.
        tensors = _read_entry(path, key, "feature cache file", mmap=True)
        if tensors is not None and set(tensors) == {"features", "targets", "groups"}:
            _touch(path)
            return _feature_set(tensors), True
        with contextlib.suppress(OSError):  # _write_entry warns about an unwritable folder
            self._make_folder()
        if spill:
            return self._computed_through_a_file(path, key, key_parts, compute), False
        fs = _checked(compute())
        _write_entry(path, key, dict(key_parts), _feature_tensors(fs), what="feature cache file")
        return fs, False

    def _computed_through_a_file(
        self, path: Path, key: str, key_parts: Mapping[str, Any], compute: Callable[..., FeatureSet]
    ) -> FeatureSet:
        """``compute(spill file)``, the entry written from it, read back memory-mapped.

        The spill file is removed however this ends (SIGTERM included). When the entry
        cannot be written (a full disk), the features are copied into memory first, so no
        deleted file keeps holding its disk space; that is the memory the pass in memory
        takes anyway. Where no spill file can be made or allocated, ``compute()`` runs in
        memory; a warning says so only when the entry is then written (otherwise the
        failed write's own warning tells it)."""
        why: OSError | None = None
        with cleanup_on_sigterm():
            try:
                spill = made = make_owned_file(self.directory, path.stem, ".spill")
            except OSError as exc:
                spill = made = None
                why = exc
            try:
                try:
                    fs = _checked(compute(spill) if spill is not None else compute())
                except OSError as exc:  # the spill file could not be allocated
                    if spill is None or not _is_spill_error(exc, spill):
                        raise
                    spill, why = None, exc
                    fs = _checked(compute())
                written = _write_entry(path, key, dict(key_parts), _feature_tensors(fs),
                                       what="feature cache file")
                if spill is not None and not written:
                    fs = FeatureSet(fs.features.clone(), fs.targets, fs.groups)
            finally:
                if made is not None:
                    made.unlink(missing_ok=True)  # a mapping of it stays valid until freed
        if spill is None and written and why is not None:
            warnings.warn(
                f"could not hold the features in a file in {str(self.directory)!r} "
                f"({why.strerror or why}); they were computed in memory", CacheWarning,
                stacklevel=4,
            )
        # Just written (and checksummed) from the same bytes: mapped, not hashed again.
        tensors = (_read_entry(path, key, "feature cache file", mmap=True, verify=False)
                   if spill else None)
        return _feature_set(tensors) if tensors is not None else fs

    def get_or_compute_tensors(
        self,
        kind: str,
        key_parts: Mapping[str, Any],
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Like :meth:`get_or_compute` for a flat dict of tensors (e.g. SVD factors or
        Hessian diagonals), stored as ``<kind>-<key>.pt``; ``kind`` is a lower-case
        identifier."""
        _check_kind(kind)
        key = self.key({"kind": kind, **key_parts})
        path = self.directory / f"{kind}-{key}.pt"
        tensors = _read_entry(path, key, "cache file")
        if tensors is not None:
            _touch(path)
            return tensors, True
        tensors = compute()
        with contextlib.suppress(OSError):  # _write_entry warns about an unwritable folder
            self._make_folder()
        _write_entry(path, key, dict(key_parts), tensors, what="cache file")
        return tensors, False

    def get_or_create_file(
        self,
        kind: str,
        key_parts: Mapping[str, Any],
        create: Callable[[Path], None],
        *,
        suffix: str,
        fallback: str | os.PathLike[str] | None = None,
    ) -> tuple[Path, bool]:
        """The cached file for ``key_parts`` (e.g. the vanilla ONNX export), created on a miss.

        ``create(path)`` writes the file at ``path``; it runs in a private temporary
        folder, and what it wrote there (``path`` and a ``path.data`` of external
        weights, if any) is moved into the cache, followed by ``<name>.check`` with each
        file's size and SHA-256. A hit is a file whose check passes; a missing, damaged
        or truncated file (or one without its check) is created again. Returns the path
        and whether it was a hit. ``kind`` is a lower-case identifier, ``suffix`` one
        lower-case extension (``.onnx``).

        A cache folder that cannot be written (read-only, a file in its way) only costs
        the reuse when ``fallback`` is given: the file is created there, with a
        :class:`CacheWarning`, and that path is returned.

        Raises
        ------
        OSError
            When the cache folder cannot hold the file and no ``fallback`` is given.
        """
        _check_kind(kind)
        if not re.fullmatch(r"\.[a-z0-9]+", suffix):
            raise ValueError(f"cache file suffix {suffix!r} must be one lower-case extension")
        key = self.key({"kind": kind, **key_parts})
        name = f"{kind}-{key[:24]}{suffix}"
        path = self.directory / name
        if path.is_file() and _file_entry_ok(path, key):
            return path, True
        try:
            self._make_folder()
            work = make_owned_dir(self.directory, name)
        except OSError as exc:
            if fallback is None:
                raise
            warnings.warn(
                f"could not write cache file {str(path)!r} ({exc.strerror or exc}); "
                f"{Path(fallback).name} was created where it is used and not cached",
                CacheWarning,
                stacklevel=2,
            )
            create(Path(fallback))
            return Path(fallback), False
        with cleanup_on_sigterm():
            try:
                files = _move_created(work, name, create, self.directory)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            check = {"format": _CACHE_FORMAT, "key": key, "files": files}
            try:
                atomic_write_text(_check_path(path), json.dumps(check, sort_keys=True) + "\n")
            except OSError as exc:  # the entry is whole; without its check it is not reused
                warnings.warn(
                    f"could not write {str(_check_path(path))!r} ({exc.strerror or exc}); "
                    "the file will be created again next time",
                    CacheWarning,
                    stacklevel=2,
                )
        return path, False

    def clear(self) -> int:
        """Delete every cached file (every kind's entries, their companions) and every
        temporary left by a killed run; nothing else in the folder. Returns the count."""
        removed = 0
        for p, _ in cache_files(self.directory):
            for c in [*companions(p), p]:
                if c.is_dir() and not c.is_symlink():
                    shutil.rmtree(c, ignore_errors=True)
                elif c.exists() or c.is_symlink():
                    c.unlink(missing_ok=True)
                else:
                    continue
                removed += 1
        return removed


def _move_created(
    work: Path, name: str, create: Callable[[Path], None], directory: Path
) -> dict[str, dict[str, Any]]:
    """Run ``create`` in ``work`` and move what it wrote into ``directory``; return each
    file's size and SHA-256."""
    create(work / name)
    made = sorted(p.name for p in work.iterdir() if p.is_file() and p.name.startswith(name))
    if name not in made:
        raise RuntimeError(f"create() did not write {name}")
    files = {}
    # External weights first, the model that references them last, the check after
    # both: a reader never pairs a new model with old weights.
    for fname in sorted(made, key=lambda n: n == name):
        files[fname] = {"bytes": (work / fname).stat().st_size, "sha256": sha256_file(work / fname)}
        os.replace(work / fname, directory / fname)
    return files


def companions(path: Path) -> list[Path]:
    """The files that belong to a cache entry: its external weights, its check record."""
    return [path.with_name(path.name + s) for s in COMPANION_SUFFIXES]


def cache_files(directory: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """Every entry the cache wrote in ``directory``, with its kind, and every temporary
    an interrupted write of an entry left (kind ``partial``), by name; nothing else.

    A name counts only in full (:func:`entry_kind`): ``features-of-my-data.csv`` is a
    user's file. An entry must be a regular file, not a link.
    """
    out: list[tuple[Path, str]] = []
    try:
        items = sorted(os.scandir(directory), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return out
    for item in items:
        kind = entry_kind(item.name)
        if kind is not None:
            if item.is_file(follow_symlinks=False):
                out.append((Path(item.path), kind))
            continue
        target = owned_target(item.name)
        if target is None:
            continue
        for suffix in ("", *COMPANION_SUFFIXES):
            if suffix and not target.endswith(suffix):
                continue
            if entry_kind(target[: len(target) - len(suffix)]) is not None:
                out.append((Path(item.path), "partial"))
                break
    return out


def _touch(path: Path) -> None:
    """Mark a cache file as used now: ``fairdeploy cache prune`` removes unused ones."""
    with contextlib.suppress(OSError):  # a read-only cache still serves hits
        os.utime(path)


def _check_path(path: Path) -> Path:
    return path.with_name(path.name + ".check")


def _file_entry_ok(path: Path, key: str) -> bool:
    """Whether a cached file and its companions match their ``.check``; warns if not."""
    check = _check_path(path)
    problem = None
    try:
        doc = json.loads(check.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != _CACHE_FORMAT:
            problem = "its check file is not in this version's format"
        elif doc.get("key") != key or path.name not in doc.get("files", {}):
            problem = "its check file belongs to another entry"
        else:
            for fname, rec in doc["files"].items():
                f = path.with_name(fname)
                if not f.is_file() or f.stat().st_size != rec["bytes"]:
                    problem = f"{fname} is missing or has another size than recorded"
                elif sha256_file(f) != rec["sha256"]:
                    problem = f"{fname} failed its SHA-256 check"
                if problem:
                    break
    except FileNotFoundError:
        problem = "it has no check file (an older fairdeploy, or a write cut short)"
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        problem = f"its check file is unreadable ({type(exc).__name__})"
    if problem is None:
        return True
    warnings.warn(
        f"ignoring cache file {str(path)!r}: {problem}; creating it again",
        CacheWarning,
        stacklevel=3,
    )
    return False


def _checked(fs: Any) -> FeatureSet:
    if not isinstance(fs, FeatureSet):
        raise TypeError(f"compute() returned {type(fs).__name__}, not a FeatureSet")
    return fs


def _feature_tensors(fs: FeatureSet) -> dict[str, torch.Tensor]:
    return {"features": fs.features, "targets": fs.targets, "groups": fs.groups}


def _feature_set(tensors: Mapping[str, torch.Tensor]) -> FeatureSet:
    return FeatureSet(tensors["features"], tensors["targets"], tensors["groups"])


def _is_spill_error(exc: OSError, spill: Path) -> bool:
    """Whether ``exc`` is about the spill file (its allocation), not the trunk's own I/O."""
    return exc.filename is not None and Path(exc.filename) == spill


def _compact(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: copy views of larger tensors.
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def tensors_checksum(key: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a cache entry's key and of each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(key.encode())
    for name in sorted(tensors):
        t = tensors[name]
        if not torch.is_tensor(t):
            raise TypeError(f"cache entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    return h.hexdigest()


def _write_entry(
    path: Path, key: str, key_parts: dict[str, Any], tensors: Mapping[str, torch.Tensor],
    *, what: str,
) -> bool:
    """Write a cache entry atomically; True when written, False (with a warning) when the
    folder or the disk would not take it."""
    compact = {k: _compact(v) for k, v in tensors.items()}
    payload = {
        "format": _CACHE_FORMAT,
        "key": key,
        "key_parts": _canonical_json(key_parts),  # for humans inspecting the cache
        "checksum": tensors_checksum(key, compact),
        "tensors": compact,
    }
    try:
        atomic_torch_save(payload, path)
    except OSError as exc:
        warnings.warn(
            f"could not write {what} {str(path)!r} ({exc.strerror or exc}); the values were "
            "computed but not cached (free some disk space or choose a writable --exports)",
            CacheWarning,
            stacklevel=3,
        )
        return False
    return True


def _read_entry(
    path: Path, key: str, what: str, *, mmap: bool = False, verify: bool = True
) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache entry, or None (with a warning when a file was there).
    With ``mmap`` the tensors are memory-mapped from the file (read on demand). Without
    ``verify`` their checksum is not recomputed: for an entry this process has just
    written and checksummed (one pass over its bytes saved)."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if not isinstance(payload, dict) or payload.get("format") != _CACHE_FORMAT:
            raise ValueError(f"not a fairdeploy {what} of this version")
        if payload.get("key") != key:
            raise ValueError("the file's key does not match its name")
        tensors = payload.get("tensors")
        if not isinstance(tensors, dict):
            raise ValueError("it holds no tensors")
        if verify and tensors_checksum(key, tensors) != payload.get("checksum"):
            raise ValueError("its content does not match its checksum (altered or damaged)")
        return dict(tensors)
    except Exception as exc:  # any unreadable file is a miss, never a crash
        warnings.warn(
            f"ignoring unreadable {what} {str(path)!r} ({type(exc).__name__}: "
            f"{first_line(exc)}); "
            "recomputing it",
            CacheWarning,
            stacklevel=3,
        )
        return None


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
