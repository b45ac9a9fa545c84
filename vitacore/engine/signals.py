"""Clean stops and checkpoints on request.

SIGTERM / SIGINT ask the run to stop: training finishes the current optimizer step, evaluation
stops at its next batch, and the run saves a checkpoint and exits. During the final export they are
deferred until the export is published. SIGUSR1 asks for a checkpoint at the end of the current
optimizer step; training goes on. The ranks agree on both requests in a collective, so every rank
acts at the same step. DataLoader workers ignore these signals (the main process handles them).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import signal
from typing import Iterator, Optional

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAVE_SIGNAL = signal.SIGUSR1
PEER_RANK = "peer rank"  # the stop reason on a rank that learned of the signal from another rank


class StopRequest:
    """Installs handlers for SIGTERM, SIGINT and SIGUSR1 while active; remembers what was asked.

    Use as a context manager; it may be entered again while active (the handlers stay those of the
    outermost entry), so a recipe can hold it over a whole run and the loop over its part. A second
    SIGINT falls back to Python's default (KeyboardInterrupt), so a stuck run can still be
    interrupted by hand, except inside :meth:`deferred`.

    Attributes:
        signal_name: the first stop signal seen (``"SIGTERM"``, ``"SIGINT"``, or ``"peer rank"`` once a
            collective showed that another rank saw one); None while no stop was asked for.
        agreed: every rank knows of a stop (set by a collective: :meth:`agree` / :meth:`settle`). Decide
            on this, never on :attr:`signal_name`, where ranks must act alike: a signal can reach one
            rank just after a collective, and that rank alone would act on it.
    """

    def __init__(self):
        self.signal_name: Optional[str] = None
        self.agreed = False
        self._previous: dict = {}
        self._depth = 0
        self._deferring = False
        self._save_signals = 0  # SIGUSR1s received (the handler only counts: no lost request)
        self._save_signals_agreed = 0  # of those, the ones already put to the ranks
        self._pending_save_signals = 0  # the count that the flags being agreed on reflect
        self._save_agreed = False  # the ranks agreed on a checkpoint request not yet served

    @property
    def requested(self) -> bool:
        """A stop was asked for (here, or on a peer rank once agreed)."""
        return self.signal_name is not None

    def _handle_stop(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT and not self._deferring:
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def _handle_save(self, signum, frame):
        self._save_signals += 1

    def __enter__(self) -> "StopRequest":
        if self._depth == 0:
            handlers = dict.fromkeys(STOP_SIGNALS, self._handle_stop)
            handlers[SAVE_SIGNAL] = self._handle_save
            for signum, handler in handlers.items():
                with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                    self._previous[signum] = signal.signal(signum, handler)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator["StopRequest"]:
        """Active, and not even a second SIGINT interrupts the block (a final export being published);
        a stop asked for meanwhile is in :attr:`signal_name` afterwards."""
        with self:
            self._deferring = True
            try:
                yield self
            finally:
                self._deferring = False

    # ---- agreement across ranks ------------------------------------------------------------------

    def local_flags(self) -> list[float]:
        """This rank's ``[stop, save]`` flags, to be MAX-reduced over ranks and passed to :meth:`settle`."""
        self._pending_save_signals = self._save_signals
        return [1.0 if self.requested else 0.0, 1.0 if self._save_signals > self._save_signals_agreed else 0.0]

    def settle(self, agreed: list[float]) -> None:
        """Take the MAX-reduced flags of :meth:`local_flags`: a peer's stop becomes this rank's stop,
        and an agreed checkpoint request waits for :meth:`take_save_request`."""
        if agreed[0]:
            self.agreed = True
            if self.signal_name is None:
                self.signal_name = PEER_RANK
        if agreed[1]:
            self._save_agreed = True
            self._save_signals_agreed = self._pending_save_signals

    def agree(self, dist) -> bool:
        """Share the flags in one small collective (every rank calls this at the same point).

        Args:
            dist: this process's place in the job (``world_size``, ``device``).

        Returns:
            True when a stop was asked for on any rank (the same answer on every rank).
        """
        flags = self.local_flags()
        if dist.world_size > 1:
            reduced = torch.tensor(flags, device=dist.device)
            torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
            flags = reduced.tolist()
        self.settle(flags)
        return bool(flags[0])

    def take_save_request(self) -> bool:
        """True once per agreed SIGUSR1 request (the same answer on every rank at the same step)."""
        wanted, self._save_agreed = self._save_agreed, False
        return wanted


def worker_signal_options() -> dict:
    """DataLoader arguments for workers that ignore SIGTERM / SIGINT / SIGUSR1 (``worker_init_fn``).

    At exit, the interpreter terminates its daemonic children with SIGTERM and then waits for them;
    workers that ignore SIGTERM (persistent ones, or those of a loader a traceback keeps alive) would
    keep it waiting for ever. So the first call also registers an exit handler, run before that
    one, that kills the daemonic children still alive then that ignore SIGTERM (what SIGTERM did to
    those workers before).
    """
    global _reaper_registered
    if not _reaper_registered:
        import multiprocessing.util  # noqa: F401 - registers its exit handler now, so ours runs before it

        atexit.register(_kill_leftover_workers)  # last registered, first run
        _reaper_registered = True
    return {"worker_init_fn": ignore_stop_signals}


_reaper_registered = False


def _kill_leftover_workers() -> None:
    leftover = [child for child in multiprocessing.active_children()
                if child.daemon and child.pid is not None and _ignores_sigterm(child.pid)]
    if leftover:
        # torch's SIGCHLD handler would report the killed workers as a failure of the finished run.
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in leftover:
        child.kill()
        child.join(5)


def _ignores_sigterm(pid: int) -> bool:
    """From ``/proc`` where there is one; elsewhere assume so (the process is ending anyway)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            ignored = next(line for line in fh if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return True
    return bool(int(ignored, 16) >> (signal.SIGTERM - 1) & 1)


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM, SIGINT and SIGUSR1.

    A signal sent to the whole process group (a scheduler's preemption, Ctrl-C) reaches the workers
    too; the main process stops the run cleanly and shuts its workers down, so a worker that died of
    the signal first would only turn that clean stop into a "worker exited unexpectedly" error.
    """
    for signum in (*STOP_SIGNALS, SAVE_SIGNAL):
        signal.signal(signum, signal.SIG_IGN)
