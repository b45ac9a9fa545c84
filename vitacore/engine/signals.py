"""Clean stops: SIGTERM / SIGINT ask the loop to finish the current optimizer step and save."""

from __future__ import annotations

import contextlib
import signal
from typing import Optional


class StopRequest:
    """Installs handlers for SIGTERM and SIGINT while active; remembers the first signal.

    Use as a context manager around the loop. A second SIGINT falls back to Python's default
    (KeyboardInterrupt), so a stuck run can still be interrupted by hand.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        for signum in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
