"""A Ctrl-C that cannot be lost while the driver waits on Ray.

Why: Python turns SIGINT into a KeyboardInterrupt at the next bytecode of the main thread. While a Ray
driver waits, that bytecode may belong to a callback Ray's C++ core runs on the main thread, and an
exception raised there is reported as "Exception ignored" and dropped (ray-project/ray#7734 shows the
pattern), so the search would carry on as if Ctrl-C had never been pressed (seen once in three suite runs
on a loaded machine: the interrupted search finished its budget and exited 0).

`SigintLatch` wraps the SIGINT handler in place: a Ctrl-C is remembered before the handler runs, and
`check()`, called by the executor between waits (at least every second), raises KeyboardInterrupt for a
Ctrl-C whose exception never reached us. Nothing else changes: the previous handler still runs first (by
default it raises KeyboardInterrupt at once), an ignored SIGINT stays ignored, and off the main thread
(where Python allows no handler) the latch does nothing. The latch cannot tell a KeyboardInterrupt that
reached the caller from one that was dropped: a caller that catches Ctrl-C and keeps waiting on the same
executor gets it once more from `check()` (the search closes the executor instead).
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class SigintLatch:
    """Install with `install()`, poll with `check()`, restore the previous handler with `uninstall()`."""

    def __init__(self) -> None:
        self.pending = False
        self._previous: Any = None
        self._installed = False

    def install(self) -> "SigintLatch":
        if self._installed or threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):  # SIG_IGN or SIG_DFL: whoever started us chose that; keep it
            return self
        self._previous = previous
        signal.signal(signal.SIGINT, self._handle)
        self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.pending = True
        self._previous(signum, frame)

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C arrived and its exception was swallowed on the way."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)
