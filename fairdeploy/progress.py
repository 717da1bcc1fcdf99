"""Progress of long phases: rich bars on a terminal, one log line per phase elsewhere.

Every phase of the pipeline that can take more than a second (a trunk pass, training,
the ONNX export and its checks, verification, latency) reports through :func:`phase`;
training also reports each epoch through :func:`log`. Where that goes depends on the
standard error stream:

- a terminal: a rich progress bar per phase (transient: it disappears when the phase
  ends), with a count, elapsed and remaining time;
- anything else (a CI log, ``2> run.log``, a pipe): no bars and no control characters,
  but one plain line when a phase of half a second or more ends (``fairdeploy: trunk
  pass: test split: 900 samples in 1.2 s``) and one per training epoch, so a
  five-minute ``train`` in a log file is not a single line; a phase that counts its
  items and is still running after :data:`HEARTBEAT_FIRST` seconds also writes where it
  is, with the time left at its pace (``fairdeploy: training: 120/900 steps, 1 min 10 s
  elapsed, about 6 min 50 s left``), then every :data:`HEARTBEAT_EVERY` seconds.

Library functions take ``progress: bool`` and stay silent when it is False (the default
of the Python API); the command line turns it on. Nested phases share one live display.
The environment variable ``FAIRDEPLOY_PROGRESS`` overrides the choice: ``bars``,
``lines`` or ``off``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from fairdeploy._text import plural, seconds

__all__ = ["Phase", "log", "mode", "phase"]

#: Prefix of every log line, so a log can be grepped for fairdeploy's phases.
PREFIX = "fairdeploy: "

#: Seconds a counted phase runs, in log-line mode, before its first "where it is" line.
HEARTBEAT_FIRST = 5.0
#: Seconds between later such lines.
HEARTBEAT_EVERY = 30.0

_live: dict[str, Any] = {"progress": None, "depth": 0}


def mode() -> str:
    """How progress is shown now: ``"bars"`` (stderr is a terminal), ``"lines"`` or ``"off"``."""
    forced = os.environ.get("FAIRDEPLOY_PROGRESS", "").strip().lower()
    if forced in ("bars", "lines", "off"):
        return forced
    stream = sys.stderr
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        tty = False
    return "bars" if tty else "lines"


def _write_line(text: str) -> None:
    # Looked up at call time: a test runner or the CLI may have replaced sys.stderr.
    stream = sys.stderr
    with contextlib.suppress(OSError, ValueError):  # a closed pipe must not fail the run
        stream.write(PREFIX + text + "\n")
        stream.flush()


def log(message: str, *, enabled: bool = True) -> None:
    """One progress line (e.g. a training epoch): printed above the bars on a terminal,
    as a plain ``fairdeploy: ...`` line elsewhere, nowhere when ``enabled`` is False."""
    how = mode() if enabled else "off"
    if how == "off":
        return
    bar = _live["progress"]
    if how == "bars" and bar is not None:
        bar.console.print(message, highlight=False, markup=False)
    else:
        _write_line(message)


class Phase:
    """Handle of a running phase: :meth:`advance` the count, set a :meth:`status` text."""

    def __init__(self, description: str, total: int | None, unit: str, how: str) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.text = ""
        self.started = time.perf_counter()
        self._how = how
        self._task: Any = None
        self._next_line = HEARTBEAT_FIRST

    @property
    def elapsed(self) -> float:
        """Seconds since the phase started."""
        return time.perf_counter() - self.started

    def advance(self, n: int = 1) -> None:
        """``n`` more items done."""
        self.done += n
        if self._task is not None:
            _live["progress"].advance(self._task, n)
        elif self._how == "lines" and self.total and self.elapsed >= self._next_line:
            _write_line(self.where())
            self._next_line = self.elapsed + HEARTBEAT_EVERY

    def where(self) -> str:
        """A running phase's line: count of total, elapsed, and the time left at the pace
        so far (``training: 120/900 steps, 1 min 10 s elapsed, about 6 min 50 s left``)."""
        took, total = self.elapsed, self.total or 0
        count = f"{self.done:,}/" + (plural(total, self.unit) if self.unit else f"{total:,}")
        parts = [count, f"{seconds(took)} elapsed"]
        if self.total and 0 < self.done < self.total:
            parts.append(f"about {seconds(took / self.done * (self.total - self.done))} left")
        status = f" ({self.text})" if self.text else ""
        return f"{self.description}: {', '.join(parts)}{status}"

    def status(self, text: str) -> None:
        """A short status shown beside the bar (e.g. the running loss) and in the log line."""
        self.text = text
        if self._task is not None:
            _live["progress"].update(self._task, status=text)

    def summary(self) -> str:
        """The log line of a finished phase."""
        took = seconds(self.elapsed)
        done = f"{plural(self.done, self.unit)} in {took}" if self.done and self.unit else (
            f"done in {took}"
        )
        status = f" ({self.text})" if self.text else ""
        return f"{self.description}: {done}{status}"


def _new_progress() -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        transient=True,
    )


@contextlib.contextmanager
def phase(
    description: str,
    *,
    total: int | None = None,
    unit: str = "sample",
    enabled: bool = True,
    quiet_below: float = 0.5,
) -> Iterator[Phase]:
    """Report a phase of work while the ``with`` block runs.

    Parameters
    ----------
    description : str
        What runs, e.g. ``"trunk pass: test split"`` or ``"export: model.onnx"``.
    total : int, optional
        Items to do (a bar with a count); None for a phase without a count (a spinner
        and the elapsed time).
    unit : str
        Name of one item in the log line (``sample``, ``epoch``, ``run``; empty for
        none); the plural adds an ``s``.
    enabled : bool
        False: nothing is shown (the handle still counts).
    quiet_below : float
        In log-line mode, a phase shorter than this many seconds writes no line (the
        progress of phases that last is what a log needs; default half a second).

    Yields
    ------
    Phase
        Call ``advance(n)`` as items complete and ``status(text)`` to show a status.
    """
    how = mode() if enabled else "off"
    handle = Phase(description, total, unit, how)
    if how == "bars":
        if _live["progress"] is None:
            _live["progress"] = _new_progress()
            _live["progress"].start()
        _live["depth"] += 1
        handle._task = _live["progress"].add_task(description, total=total, status="")
    try:
        yield handle
    finally:
        if how == "bars":
            bar = _live["progress"]
            bar.remove_task(handle._task)
            handle._task = None
            _live["depth"] -= 1
            if _live["depth"] == 0:
                bar.stop()
                _live["progress"] = None
    if how == "lines" and handle.elapsed >= quiet_below:
        _write_line(handle.summary())
