"""Atomic file writes: a temporary name in the same folder, then a rename.

The temporary name says which process owns it (:mod:`fairdeploy._stale`): a write cut
short by SIGKILL leaves a file that the next write into the same folder removes, and a
SIGTERM during the write removes it at once (:mod:`fairdeploy._signals`). A full disk
surfaces as an ``OSError`` naming the file, whichever library did the writing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from fairdeploy._signals import cleanup_on_sigterm
from fairdeploy._stale import make_owned_file, remove_stale

__all__ = [
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "publish",
]


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a finished temporary file onto ``path`` with the permissions a plain
    ``open()`` would give (temporary files are created owner-only)."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without a window in which it is 0 for other threads:
    from ``/proc/self/status`` where Linux gives it, else set and restored under a lock
    (``compare`` writes files from two threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask

# Folders already cleared of dead processes' temporaries by this process.
_SWEPT: set[str] = set()


def _sweep_once(folder: Path) -> None:
    """Remove dead processes' temporaries from ``folder``, once per process."""
    key = os.path.abspath(folder)
    if key not in _SWEPT:
        remove_stale(folder)
        _SWEPT.add(key)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    On an exception (SIGTERM included) the temporary file is removed and ``path`` is
    left as it was, so a reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    with cleanup_on_sigterm():
        tmp_path = make_owned_file(path.parent, path.name, suffix or ".tmp")
        try:
            yield tmp_path
            publish(tmp_path, path)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
            if exc.filename is not None or exc.errno is None:
                raise
            # A failed write() (a full disk, a file size limit) names no file: name it.
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
            raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: object, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically, flushed to disk before the rename.

    torch's archive writer reports a failed write (a full disk, a file size limit) as a
    ``RuntimeError`` about stream positions; it is raised here as an ``OSError`` naming
    the file, like every other failed write.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        except RuntimeError as exc:
            text = str(exc)
            if "inline_container" not in text and "PytorchStreamWriter" not in text:
                raise
            raise OSError(
                errno.EIO, "could not write the file (is the disk full?)", str(path)
            ) from None
