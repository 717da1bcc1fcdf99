"""Reading a CSV file strictly: UTF-8 (a byte-order mark is allowed), one header row,
every row exactly as long as the header, quotes closed.

The csv module's defaults are lenient in ways that lose data silently: an unterminated
quote swallows the rest of the file into one field, a short row leaves columns unset, a
byte-order mark becomes part of the first column's name. Here each of those is a
:class:`FairDeployError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fairdeploy.errors import FairDeployError

__all__ = ["MAX_CSV_FIELD", "read_csv"]

#: Longest field accepted (the csv module's default limit): a longer one is almost
#: always an unterminated quote or a binary file.
MAX_CSV_FIELD = 131_072


def read_csv(path: Path, *, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows (as ``{column: text}``) of a CSV file.

    Parameters
    ----------
    path : Path
        The file.
    what : str
        Names the file in messages, e.g. ``"data.csv labels.csv"``.

    Raises
    ------
    FairDeployError
        Unreadable or non-UTF-8 file, no header, a repeated column name, a row with
        more or fewer fields than the header, an unterminated quote, a field over
        :data:`MAX_CSV_FIELD` characters.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FairDeployError(f"{what}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FairDeployError(
            f"{what}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}): save the CSV as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    old_limit = csv.field_size_limit(MAX_CSV_FIELD)
    try:
        header = next(reader, None)
        if header is None:
            raise FairDeployError(f"{what}: the file is empty: expected a header row")
        header = [c.strip() for c in header]
        seen: set[str] = set()
        for col in header:
            if col in seen:
                raise FairDeployError(f"{what}:1: column {col!r} appears twice in the header")
            seen.add(col)
        rows = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                continue  # blank line
            if len(row) != len(header):
                raise FairDeployError(
                    f"{what}:{reader.line_num}: the row has {len(row)} field"
                    f"{'s' if len(row) != 1 else ''}, the header {len(header)}: every row "
                    "needs one value per column (quote values that contain commas)"
                )
            rows.append(dict(zip(header, row, strict=True)))
    except csv.Error as exc:
        hint = (
            f" (longer than {MAX_CSV_FIELD:,} characters: an unterminated quote?)"
            if "field limit" in str(exc) else ""
        )
        raise FairDeployError(
            f"{what}:{reader.line_num}: not valid CSV ({exc}){hint}: check the quoting"
        ) from None
    finally:
        csv.field_size_limit(old_limit)
    return header, rows
