"""The one exception type for user mistakes.

A ``FairDeployError`` is a problem the user can fix (a bad recipe value, a missing
file, an unsafe checkpoint). Its message says what was found, what is allowed and
how to fix it; the CLI prints it as one ``Error: ...`` line and exits with code 1.
Anything else that escapes is a bug in fairdeploy and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["FairDeployError", "first_line"]


class FairDeployError(Exception):
    """A user-facing error: bad input, not a bug. Printed without a traceback."""


def first_line(exc: BaseException, *, limit: int | None = 200) -> str:
    """The first line of ``exc``'s message, cut at ``limit`` characters (None: whole), for
    quoting a library's error inside one ``Error: ...`` line; the exception's type name
    when it has no message."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if limit is None else text[:limit]
