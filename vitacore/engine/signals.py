"""Clean stops: SIGTERM / SIGINT ask the loop to finish the current optimizer step and save."""

from __future__ import annotations

import signal
from typing import Optional

import torch


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
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self, world_size: int, device: torch.device) -> bool:
        """True on every rank once any rank got a signal (ranks must stop at the same step)."""
        if world_size == 1:
            return self.signal_name is not None
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "peer rank"
        return bool(flag.item())
