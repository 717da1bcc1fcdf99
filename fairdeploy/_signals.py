"""SIGTERM cleans up like Ctrl-C while fairdeploy has something half-written.

A process stopped with SIGTERM (``kill``, a scheduler's time limit, ``docker stop``)
would otherwise die on the spot and leave its temporary files behind. Inside
:func:`cleanup_on_sigterm` a SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``)
instead, so the ``except``/``finally`` blocks that remove temporaries run; when the
outermost such block has unwound, the process terminates by SIGTERM as it would have
(exit status 143 in a shell), so supervisors see what happened.

Outside these blocks nothing is half-written and SIGTERM keeps its default action. A
handler installed by the host application is never replaced, and the guard does nothing
outside the main thread (Python delivers signals only there). SIGKILL cannot be caught:
its leftovers are removed by the next run (:mod:`fairdeploy._stale`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Terminated", "cleanup_on_sigterm"]


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives inside :func:`cleanup_on_sigterm`."""


_depth = 0


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # One exception is enough: a second SIGTERM must not interrupt the cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated("terminated by SIGTERM")


@contextlib.contextmanager
def cleanup_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the duration of the block (re-entrant)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            yield  # the application handles SIGTERM itself
            return
        signal.signal(signal.SIGTERM, _raise_terminated)
    _depth += 1
    terminated = False
    try:
        yield
    except Terminated:
        terminated = True
        raise
    finally:
        _depth -= 1
        if _depth == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if terminated:
                # Cleanup is done: end the way SIGTERM ends a process.
                os.kill(os.getpid(), signal.SIGTERM)
