"""The SHA-256 of a file's bytes, read in chunks: what run manifests, the feature
cache's integrity records and its content keys compare."""

from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks (memory stays flat for
    a large checkpoint). Not memoized: every call reads the file, which is what an
    integrity check needs; :func:`fairdeploy.cache.file_sha256` memoizes by size and
    modification time for cache keys."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
