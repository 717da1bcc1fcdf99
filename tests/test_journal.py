"""The sweep journal: checksummed records, damaged and non-UTF-8 lines (issue 21, 1 and 8)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fairdeploy.errors import FairDeployError
from fairdeploy.sweep import Journal, record_key

IDENTITY = {"checkpoint_sha256": "ab" * 32, "fairdeploy": "test"}


def _record(i: int) -> dict:
    plan = {"method": "fairlrf", "sr": i / 10}
    return {"key": record_key(plan, "val"), "plan": plan, "split": "val",
            "metrics": {"accuracy": 0.5 + i / 100, "eodd": 0.1 * i}}


def _journal_with(path: Path, n: int) -> list[dict]:
    records = [_record(i) for i in range(n)]
    with Journal(path, IDENTITY) as journal:
        for r in records:
            journal.append(r)
    return records


def test_every_record_carries_the_checksum_of_its_content(tmp_path: Path) -> None:
    path = tmp_path / "sweep.jsonl"
    _journal_with(path, 2)
    for line in path.read_text().splitlines()[1:]:
        record = json.loads(line)
        body = {k: v for k, v in record.items() if k != "sha256"}
        blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        assert record["sha256"] == hashlib.sha256(blob).hexdigest()


def test_an_edited_record_is_dropped_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "sweep.jsonl"
    records = _journal_with(path, 3)
    lines = path.read_text().splitlines(keepends=True)
    # A hand edit of a metric, and one digit changed by accident in another record.
    lines[1] = lines[1].replace('"eodd": 0.0', '"eodd": 0.9')
    lines[3] = lines[3].replace('"accuracy": 0.52', '"accuracy": 0.57')
    assert lines[1] != path.read_text().splitlines(keepends=True)[1]
    path.write_text("".join(lines))
    with Journal(path, IDENTITY) as journal:
        assert journal.damaged == 2 and journal.dropped == 0
        assert journal.get(records[0]["key"]) is None
        assert journal.get(records[2]["key"]) is None
        assert journal.get(records[1]["key"])["metrics"] == records[1]["metrics"]
        assert len(journal.notes) == 1 and "2 record(s)" in journal.notes[0]
        assert "checksum" in journal.notes[0]
    # The damaged lines are gone from the file: a second opening finds nothing wrong.
    with Journal(path, IDENTITY) as journal:
        assert journal.damaged == 0 and len(journal) == 1 and journal.notes == []


def test_a_record_without_checksum_is_recomputed(tmp_path: Path) -> None:
    path = tmp_path / "sweep.jsonl"
    _journal_with(path, 1)
    header, line = path.read_text().splitlines(keepends=True)
    record = json.loads(line)
    del record["sha256"]
    path.write_text(header + json.dumps(record) + "\n")
    with Journal(path, IDENTITY) as journal:
        assert journal.damaged == 1 and len(journal) == 0


def test_a_cut_tail_is_dropped_not_damaged(tmp_path: Path) -> None:
    path = tmp_path / "sweep.jsonl"
    _journal_with(path, 2)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with Journal(path, IDENTITY) as journal:
        assert (journal.dropped, journal.damaged, len(journal)) == (1, 0, 1)
        assert "interrupted write" in journal.notes[0]


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00bad\n", b"\x80" * 50 + b"\n",
                                     b"not json\n", b"[1, 2]\n", b'{"no": "key"}\n'])
def test_non_utf8_or_random_lines_are_dropped_with_a_note(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "sweep.jsonl"
    records = _journal_with(path, 2)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1] + garbage + lines[2] + garbage)
    with Journal(path, IDENTITY) as journal:
        assert journal.damaged == 2 and len(journal) == 2
        assert journal.get(records[1]["key"]) is not None
        assert journal.notes


@pytest.mark.parametrize("content", [b"\xff\xfe garbage", b"", b"\x00" * 100,
                                     b'{"format": "x"}\n'])
def test_a_journal_with_a_garbage_header_is_refused_in_one_line(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "sweep.jsonl"
    path.write_bytes(content)
    with pytest.raises(FairDeployError, match="not a fairdeploy sweep journal"):
        Journal(path, IDENTITY)
