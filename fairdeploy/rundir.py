"""Run folders: checked before any work, assembled under a temporary name, renamed when complete.

Promises (each has a test in ``tests/test_rundir.py`` or ``tests/test_crash.py``):

- A failed, interrupted (Ctrl-C, SIGTERM) or killed run leaves no run folder and no
  partial one: the folder is staged as ``.<name>.fdtmp-<owner>`` beside it and renamed
  when complete. A SIGKILL cannot be caught; its staging folder is removed by the next
  run in the same parent folder, once its process is gone (:mod:`fairdeploy._stale`).
- Every run folder holds ``manifest.json``: the name, size and SHA-256 of every file the
  run wrote. An existing ``--out`` folder is replaced only when it holds nothing but the
  files its manifest lists, unchanged; anything else in it (a user's file, a subfolder,
  an edited report) makes the run refuse before any work, and again just before the
  rename. Nothing a run did not write is ever deleted.
- An earlier run is replaced only once the new one is complete; if the rename fails the
  earlier run is put back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fairdeploy._digest import sha256_file
from fairdeploy._io import atomic_write_text, current_umask
from fairdeploy._signals import cleanup_on_sigterm
from fairdeploy._stale import make_owned_dir, remove_stale
from fairdeploy.errors import FairDeployError

__all__ = [
    "MANIFEST",
    "check_folder_path",
    "check_out",
    "check_replaceable_files",
    "check_unchanged",
    "ensure_dir",
    "record_files",
    "run_manifest",
    "staging_dir",
]

#: The file, in every run folder, that lists what the run wrote.
MANIFEST = "manifest.json"
_FORMAT = "fairdeploy-run-manifest/1"


def check_out(final: Path) -> None:
    """Refuse, before any work, an output folder we cannot write or must not replace.

    ``final`` may be missing, empty, or a run folder whose ``manifest.json`` lists every
    file in it, each unchanged since the run wrote it. A symlink whose target does not
    exist is refused too (the rename at the end of the run could not replace it).
    """
    check_folder_path(final)
    if final.is_dir():
        _check_replaceable(final)
    ensure_dir(final.parent)


def check_folder_path(path: Path) -> None:
    """Refuse an ``--out`` that cannot become a folder: a file, or a symlink whose target
    does not exist (the rename at the end of a run could not replace it)."""
    if path.is_symlink() and not path.exists():
        raise FairDeployError(
            f"--out {str(path)!r} is a symlink to {os.readlink(path)!r}, which does not "
            "exist: create the folder it points to, or give another --out"
        )
    if path.exists() and not path.is_dir():
        raise FairDeployError(f"--out {str(path)!r} is a file: give a folder path")


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and its parents), or say why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FairDeployError(f"cannot create the folder {str(path)!r} ({exc.strerror})") from None


def run_manifest(folder: Path) -> dict[str, Any] | None:
    """The parsed ``manifest.json`` of a run folder, or None when it has no valid one."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if data.get("format") != _FORMAT or not isinstance(files, dict):
        return None
    folders = data.get("folders", [])
    if not isinstance(folders, list) or not all(_safe_relative(f) for f in folders):
        return None
    for name, entry in files.items():
        if (
            not _safe_relative(name)
            or not isinstance(entry, dict)
            or not isinstance(entry.get("bytes"), int)
            or not isinstance(entry.get("sha256"), str)
        ):
            return None
    return data


def _safe_relative(name: Any) -> bool:
    """A manifest path: relative, ``/``-separated, no empty, ``.`` or ``..`` part."""
    return (
        isinstance(name, str)
        and "\\" not in name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def _walk(folder: Path) -> tuple[list[str], list[str]]:
    """Relative paths (``/``-separated) of the sub-folders and files under ``folder``;
    anything that is neither a plain file nor a folder (a link, a socket) is refused."""
    dirs: list[str] = []
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        for name in sorted(dirnames):
            p = Path(dirpath) / name
            if p.is_symlink():
                files.append((rel / name).as_posix())  # reported as "not a file" by callers
            else:
                dirs.append((rel / name).as_posix())
        files += [(rel / name).as_posix() for name in sorted(filenames)]
        dirnames[:] = sorted(d for d in dirnames if not (Path(dirpath) / d).is_symlink())
    return dirs, files


def check_unchanged(path: str | os.PathLike[str]) -> None:
    """Raise if ``path`` sits in a run folder whose manifest records other content for it.

    ``verify`` and ``predict`` call this on the model (and reference) they read: a file
    altered after ``optimize`` wrote it — a flipped byte in a weight, a hand edit, bit rot
    that leaves the modification time alone — would otherwise be served or checked as if
    it were the run's. The SHA-256 is always compared (one more read of the file). Files
    outside a run folder carry no such record and are not checked (ONNX itself has no
    checksum).
    """
    p = Path(path)
    rec = None
    for folder in (p.parent, p.parent.parent):  # a model, or a compare row's model
        manifest = run_manifest(folder)
        if manifest is not None:
            rec = manifest["files"].get(p.relative_to(folder).as_posix())
            if rec is not None:
                break
    if rec is None:
        return
    try:
        st = p.stat()
    except OSError:
        return  # a missing file is reported by the caller
    if st.st_size == rec["bytes"] and sha256_file(p) == rec["sha256"]:
        return
    raise FairDeployError(
        f"{str(p)!r} was changed after the run wrote it (its size or SHA-256 differs from "
        f"{MANIFEST}): restore it, or run fairdeploy optimize again"
    )


def _check_replaceable(final: Path) -> None:
    """Raise unless everything in ``final`` was written by a fairdeploy run, unchanged."""
    try:
        entries = sorted(os.scandir(final), key=lambda e: e.name)
    except OSError as exc:
        raise FairDeployError(f"--out {str(final)!r} cannot be read ({exc.strerror})") from None
    if not entries:
        return
    manifest = run_manifest(final)
    fix = "give a new or empty folder, so nothing of yours is replaced"
    if manifest is None:
        raise FairDeployError(
            f"--out {str(final)!r} exists and is not a fairdeploy run folder (no valid "
            f"{MANIFEST} listing the files a run wrote; folders from fairdeploy versions "
            f"without manifests too): {fix}"
        )
    files = manifest["files"]
    folders = set(manifest.get("folders", []))
    dirs, names = _walk(final)
    for rel in dirs:
        if rel not in folders:
            raise FairDeployError(
                f"--out {str(final)!r} holds a folder that no fairdeploy run wrote "
                f"({rel!r}): {fix}, or move it out first"
            )
    for rel in names:
        if rel == MANIFEST:
            continue
        path = final / rel
        recorded = files.get(rel)
        if recorded is None or path.is_symlink() or not path.is_file():
            raise FairDeployError(
                f"--out {str(final)!r} holds a file that no fairdeploy run wrote "
                f"({rel!r}): {fix}, or move it out first"
            )
        st = path.stat()
        same = st.st_size == recorded["bytes"] and (
            st.st_mtime_ns == recorded.get("mtime_ns") or sha256_file(path) == recorded["sha256"]
        )
        if not same:
            raise FairDeployError(
                f"--out {str(final)!r}: {rel!r} was changed after the run wrote it: "
                f"{fix}, or move the file out first"
            )


def check_replaceable_files(folder: Path, rels: list[str], *, fix: str) -> None:
    """Raise unless each of ``rels`` (paths under ``folder``) that exists is a plain file
    that ``folder``'s manifest records, unchanged: what a command may replace or delete
    in a folder that also holds other things (a sweep folder's outputs beside its
    journal). ``fix`` ends the message."""
    recorded = (run_manifest(folder) or {}).get("files", {})
    for rel in rels:
        path = folder / rel
        if not (path.exists() or path.is_symlink()):
            continue
        rec = recorded.get(rel)
        if rec is None or path.is_symlink() or not path.is_file():
            problem = "was not written by fairdeploy (it is not in the folder's manifest)"
        else:
            st = path.stat()
            same = st.st_size == rec["bytes"] and (
                st.st_mtime_ns == rec.get("mtime_ns") or sha256_file(path) == rec["sha256"]
            )
            if same:
                continue
            problem = "was changed after fairdeploy wrote it"
        raise FairDeployError(f"{str(path)!r} {problem}: {fix}")


def record_files(folder: Path, rels: list[str]) -> None:
    """Write ``folder``'s manifest listing ``rels`` (their size, SHA-256 and modification
    time), so a later run may replace exactly these files while they stay unchanged."""
    from fairdeploy import __version__

    files = {}
    for rel in sorted(set(rels)):
        path = folder / rel
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            files[rel] = {"bytes": st.st_size, "sha256": sha256_file(path),
                          "mtime_ns": st.st_mtime_ns}
    doc = {
        "format": _FORMAT,
        "written_by": f"fairdeploy {__version__}",
        "note": "the files fairdeploy wrote here; a later run replaces them only while they "
        "are unchanged",
        "files": files,
        "folders": sorted({Path(r).parent.as_posix() for r in files} - {"."}),
    }
    atomic_write_text(folder / MANIFEST, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _write_manifest(folder: Path) -> None:
    from fairdeploy import __version__

    files = {}
    dirs, names = _walk(folder)
    for rel in names:
        path = folder / rel
        if rel == MANIFEST:
            continue
        if path.is_symlink() or not path.is_file():
            raise RuntimeError(f"a run folder holds {rel!r}, which is not a file")
        st = path.stat()
        files[rel] = {"bytes": st.st_size, "sha256": sha256_file(path), "mtime_ns": st.st_mtime_ns}
    doc = {
        "format": _FORMAT,
        "written_by": f"fairdeploy {__version__}",
        "note": "every file this run wrote; a later run replaces this folder only if it "
        "holds exactly these files, unchanged",
        "files": files,
        "folders": dirs,
    }
    (folder / MANIFEST).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _public_permissions(root: Path) -> None:
    """Give a run folder the permissions a plain mkdir/open would (temporary names are
    created owner-only), so a serving process running as another user can read it."""
    umask = current_umask()
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary folder beside ``final``, renamed onto it when the block succeeds.

    A failed or interrupted run (an exception, Ctrl-C, SIGTERM) leaves nothing behind;
    a successful one writes ``manifest.json`` and replaces an earlier run of the same
    name only once the new one is complete, and only if that earlier folder still
    holds nothing but its own files.
    """
    ensure_dir(final.parent)
    remove_stale(final.parent)
    with cleanup_on_sigterm():
        tmp = make_owned_dir(final.parent, final.name)
        try:
            yield tmp
            _write_manifest(tmp)
            _public_permissions(tmp)
            _swap_in(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``, moving an earlier run out of the way first.

    The earlier run is deleted only after the new one is in place; if anything fails
    (or the process is interrupted) before that, it is put back.
    """
    old = None
    try:
        if final.exists():
            _check_replaceable(final)  # again: the folder may have changed during the run
            old = make_owned_dir(final.parent, f"{final.name}.old")
            os.replace(final, old / "run")
            # Something may have been added between the check and the move.
            _check_replaceable(old / "run")
        os.replace(tmp, final)
    except BaseException as exc:
        kept = ""
        if old is not None:
            if (old / "run").exists() and not final.exists():
                try:
                    os.replace(old / "run", final)  # put the earlier run back
                except OSError:
                    kept = f"; the earlier run is kept at {str(old / 'run')!r}"
            if not kept:
                shutil.rmtree(old, ignore_errors=True)
        if isinstance(exc, OSError):
            raise FairDeployError(
                f"cannot write the run folder {str(final)!r}: {exc}{kept}"
            ) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
