"""Temporary names that say which process owns them, and removal of those left by dead ones.

Every temporary file or folder fairdeploy creates (an atomic write's ``.tmp`` file, a run
folder being staged, a cache entry being created) is named
``.<name>.fdtmp-<host>-<pid>-<start>-<random><suffix>``: the host (a hash of its name), the
process id and the process's start time (Linux clock ticks since boot, 0 where unknown).
A process killed with SIGKILL, or a machine that lost power, cannot clean up after
itself; the next fairdeploy run that writes into the same folder calls
:func:`remove_stale`, which deletes exactly the temporaries whose owner is gone:

- only names in the pattern above (a user's own files never match it);
- only from this host (a folder shared over the network may hold another machine's);
- only when no process with that id runs, or the one that does started at another
  time (the id was reused), or it is a zombie (killed, not yet reaped).

Containers that share a folder and a host name but not a process table would see each
other's processes as gone; give them distinct host names (the default) or folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
from functools import lru_cache
from pathlib import Path

__all__ = [
    "is_owned_temporary",
    "make_owned_dir",
    "make_owned_file",
    "owned_name",
    "owned_target",
    "remove_stale",
]

_MARK = "fdtmp"
_PATTERN = re.compile(
    r"^\.(?P<name>.+)\." + _MARK + r"-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)"
    r"-(?P<rand>[0-9a-z]{8})(?P<suffix>.*)$",
    re.DOTALL,
)


@lru_cache(maxsize=1)
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None if absent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _start_time(pid: int) -> int:
    fields = _stat_fields(pid)
    # starttime is field 22 of the whole line, index 19 after the command name.
    return int(fields[19]) if fields is not None and len(fields) > 19 else 0


@lru_cache(maxsize=1)
def _own_token() -> tuple[str, int, int]:
    pid = os.getpid()
    return _host(), pid, _start_time(pid)


def _own() -> tuple[str, int, int]:
    if _own_token()[1] != os.getpid():  # a forked child has its own id
        _own_token.cache_clear()
    return _own_token()


def _token() -> str:
    host, pid, start = _own()
    return f"{host}-{pid}-{start}"


def owned_name(name: str, suffix: str = "") -> str:
    """A fresh temporary name for ``name``, owned by this process (see the module notes)."""
    return f".{name}.{_MARK}-{_token()}-{secrets.token_hex(4)}{suffix}"


def make_owned_file(folder: str | os.PathLike[str], name: str, suffix: str = ".tmp") -> Path:
    """Create an empty owner-only file with an owned temporary name in ``folder``."""
    folder = Path(folder)
    while True:
        path = folder / owned_name(name, suffix)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        return path


def make_owned_dir(folder: str | os.PathLike[str], name: str) -> Path:
    """Create an owner-only folder with an owned temporary name in ``folder``."""
    folder = Path(folder)
    while True:
        path = folder / owned_name(name)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path


def _owner_is_gone(host: str, pid: int, start: int) -> bool:
    if host != _host():
        return False  # another machine's: we cannot tell, so it stays
    if pid == os.getpid():
        # Ours, unless an earlier process with our id (started at another time) left it.
        own_start = _own()[2]
        return bool(start and own_start and start != own_start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return False
    fields = _stat_fields(pid)
    if fields is None:
        return False  # no /proc: the process exists, assume it is the owner
    if fields[0] == "Z":
        return True  # killed, waiting to be reaped
    now = int(fields[19]) if len(fields) > 19 else 0
    return bool(start and now and now != start)


def remove_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries in ``folder`` whose owning process is gone.

    Returns the paths removed. Errors (a concurrent run removing the same entry, a
    folder that does not exist) are ignored: this is housekeeping, never a failure.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _PATTERN.match(entry.name)
        if m is None:
            continue
        if not _owner_is_gone(m["host"], int(m["pid"]), int(m["start"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def is_owned_temporary(name: str) -> bool:
    """Whether ``name`` is an owned temporary name (of any process)."""
    return _PATTERN.match(name) is not None



def owned_target(name: str) -> str | None:
    """The name an owned temporary stands for (``x.pt`` for ``.x.pt.fdtmp-...``), or None
    when ``name`` is not an owned temporary name."""
    m = _PATTERN.match(name)
    return m["name"] if m else None
