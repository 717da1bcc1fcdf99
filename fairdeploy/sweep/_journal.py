"""The sweep's journal: every evaluation appended as it finishes, so a sweep resumes.

``sweep.jsonl`` holds one JSON object per line: first a header naming what every record
depends on besides its own plan (the checkpoint's content, the recipe's model, data and
sensitive settings, the data's content, the fairdeploy and torch versions), then one
record per evaluated plan, keyed by the plan's full settings (its scoring draw included)
and the split. Each line is written whole, flushed and fsynced before the next
evaluation starts; a line cut short by a kill is dropped (and recomputed) when the
journal is reopened. Every record carries ``sha256``, the checksum of its other fields
(canonical JSON): a record that fails it (edited by hand, one digit changed by accident)
or a line that is not UTF-8 JSON is dropped and evaluated again, and :attr:`Journal.notes`
says so in a sentence the run's notes carry. A rerun skips every plan already in the
journal, so an interrupted sweep resumes where it stopped; a journal written for another
checkpoint, recipe or data is refused, never mixed.

Only one process writes a journal at a time (an advisory ``flock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from fairdeploy._io import atomic_write_text
from fairdeploy.errors import FairDeployError

__all__ = ["JOURNAL_NAME", "Journal", "record_checksum", "record_key"]

JOURNAL_NAME = "sweep.jsonl"
_FORMAT = "fairdeploy-sweep-journal/1"


def record_key(plan: Mapping[str, Any], split: str) -> str:
    """The key of an evaluation: SHA-256 of the plan's settings (canonical JSON) and split."""
    blob = json.dumps({"plan": plan, "split": split}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def record_checksum(record: Mapping[str, Any]) -> str:
    """SHA-256 of a record's fields except ``sha256`` itself (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class Journal:
    """An append-only record of finished evaluations (see the module docstring).

    Parameters
    ----------
    path : path
        ``<sweep folder>/sweep.jsonl``; created with its header if missing.
    identity : mapping
        What every record depends on besides its plan; must equal the header of an
        existing journal.
    restart : bool
        Discard an existing journal (and its records) and start a new one.

    Raises
    ------
    FairDeployError
        The journal belongs to another checkpoint/recipe/data, or another process is
        writing it.
    """

    def __init__(
        self, path: str | os.PathLike[str], identity: Mapping[str, Any], *, restart: bool = False
    ) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))
        self.records: dict[str, dict[str, Any]] = {}
        #: Lines cut short at the end (an interrupted write), dropped and recomputed.
        self.dropped = 0
        #: Records that failed their checksum or were not UTF-8 JSON, dropped and recomputed.
        self.damaged = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock: TextIO | None = open(self.path.with_suffix(".lock"), "a")  # noqa: SIM115
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise FairDeployError(
                f"another fairdeploy sweep is writing {self.path.parent}: wait for it to finish, "
                "or give this one another --out"
            ) from None
        try:
            if restart or not self.path.exists():
                self._write_header()
            else:
                self._load()
            self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ reading

    def _write_header(self) -> None:
        header = {"format": _FORMAT, "identity": self.identity}
        atomic_write_text(self.path, json.dumps(header, sort_keys=True) + "\n")

    def _load(self) -> None:
        raw = self.path.read_bytes().splitlines(keepends=True)
        try:
            header = json.loads(raw[0].decode("utf-8")) if raw else None
        except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
            header = None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise FairDeployError(
                f"{self.path} is not a fairdeploy sweep journal: give the sweep another --out, "
                "or delete the file"
            )
        if header.get("identity") != self.identity:
            old = header.get("identity") or {}
            keys = {*old, *self.identity}
            changed = sorted(k for k in keys if old.get(k) != self.identity.get(k))
            raise FairDeployError(
                f"{self.path.parent} holds a sweep of another "
                f"{' / '.join(changed) or 'setup'} (its rows would not be comparable with this "
                "run's): give this sweep another --out, or pass --restart to discard that one"
            )
        kept = [raw[0].decode("utf-8")]
        for number, blob in enumerate(raw[1:], start=2):
            record, line = self._parse(blob, last=number == len(raw))
            if record is None:
                continue
            self.records[record["key"]] = record
            kept.append(line)
        if self.dropped or self.damaged:
            atomic_write_text(self.path, "".join(kept))

    def _parse(self, blob: bytes, *, last: bool) -> tuple[dict[str, Any] | None, str]:
        """One record line: the record, or None (counted as dropped or damaged)."""
        try:
            line = blob.decode("utf-8")
            record = json.loads(line)
        except ValueError:
            record, line = None, ""
        complete = blob.endswith(b"\n")
        if last and not complete:
            self.dropped += 1  # a line cut short by a kill
            return None, ""
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("key"), str)
            or record.get("sha256") != record_checksum(record)
        ):
            self.damaged += 1
            return None, ""
        return record, line

    @property
    def notes(self) -> list[str]:
        """What reopening the journal dropped, as sentences for the run's notes."""
        notes = []
        if self.dropped:
            notes.append(
                f"{self.dropped} incomplete record(s) at the end of {self.path.name} (an "
                "interrupted write) were dropped and evaluated again"
            )
        if self.damaged:
            notes.append(
                f"{self.damaged} record(s) of {self.path} failed their checksum or were not "
                "readable (edited or damaged): they were dropped and evaluated again"
            )
        return notes

    # ------------------------------------------------------------------ writing

    def get(self, key: str) -> dict[str, Any] | None:
        """The record stored under ``key`` (None if not evaluated yet)."""
        return self.records.get(key)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record (it must carry ``key``) as a whole line, flushed to disk."""
        record = {k: v for k, v in record.items() if k != "sha256"}
        record["sha256"] = record_checksum(record)
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:  # a full disk or a file size limit: say which file
            if exc.filename is not None or exc.errno is None:
                raise
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc
        self.records[record["key"]] = record

    def close(self) -> None:
        """Close the file and release the lock."""
        # OSError: the rest of a line whose append failed (and was reported) is still
        # buffered; every record appended before it was flushed and fsynced.
        with contextlib.suppress(AttributeError, OSError):
            self._file.close()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records.values())

    def __len__(self) -> int:
        return len(self.records)
