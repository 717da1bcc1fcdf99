"""Run folders: checked before any work, assembled under a temporary name, renamed when complete.

A failed run leaves nothing behind; an earlier run folder is replaced only once the new
one is complete; a folder that is not a run folder is never replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from fairdeploy.errors import FairDeployError

__all__ = ["check_out", "ensure_dir", "staging_dir"]


def check_out(final: Path) -> None:
    """Refuse, before any work, an output folder we cannot write or must not replace."""
    if final.exists() and not final.is_dir():
        raise FairDeployError(f"--out {str(final)!r} is a file: give a folder path")
    if final.is_dir() and any(final.iterdir()) and not (final / "report.json").is_file():
        raise FairDeployError(
            f"--out {str(final)!r} exists and is not a fairdeploy run folder (no report.json): "
            "give a new or empty folder, so nothing of yours is replaced"
        )
    ensure_dir(final.parent)


def ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FairDeployError(f"cannot create the folder {str(path)!r} ({exc.strerror})") from None


def _public_permissions(root: Path) -> None:
    """Give a run folder the permissions a plain mkdir/open would (temporary names are
    created owner-only), so a serving process running as another user can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


@contextlib.contextmanager
def staging_dir(final: Path):
    """A temporary folder beside ``final``, renamed onto it when the block succeeds.

    A failed run leaves nothing behind; a successful one replaces an earlier run of the
    same name only once the new one is complete.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        _public_permissions(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            os.replace(final, old / "run")
        os.replace(tmp, final)
    except OSError as exc:
        if old is not None and not final.exists():
            os.replace(old / "run", final)  # put the earlier run back
        shutil.rmtree(tmp, ignore_errors=True)
        raise FairDeployError(f"cannot write the run folder {str(final)!r}: {exc}") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
