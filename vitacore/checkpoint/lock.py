"""One run per output folder: an exclusive lock on ``output_dir/.vitacore.lock``.

The lock is ``fcntl.flock`` on that file, held for the life of the run by the main rank; the file
also says who holds it (host, pid, start time) for the message a second run gets. The operating
system drops a flock when its holder exits, however it exits, so a lock file left by a killed run
is free and the next run takes it over (with a note). Within one process, several checkpointers of
one folder (tests, a script that trains twice) share the lock.

Network file systems: Linux emulates flock on NFS with byte-range locks, which work across hosts;
on file systems without locking the lock cannot protect the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from vitacore.console import logger

LOCK_FILE = ".vitacore.lock"

_held: dict[str, list] = {}  # real path of a lock file -> [open file, users] within this process


def _drop_in_child() -> None:
    # A forked child (a DataLoader worker) shares the open lock file; closing its copy leaves the lock
    # with the parent alone, so a killed run's lingering workers cannot keep its folder locked.
    for handle, _ in _held.values():
        handle.close()
    _held.clear()


os.register_at_fork(after_in_child=_drop_in_child)


def _holder_text(content: str) -> str:
    try:
        holder = json.loads(content)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        return f"host {holder['host']}, pid {holder['pid']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "an unknown holder"


class OutputLock:
    """The held lock of one output folder; :meth:`release` (or process exit) frees it.

    Use :meth:`acquire` to take it.
    """

    def __init__(self, path: str):
        self.path = path
        self._released = False

    @classmethod
    def acquire(cls, output_dir: str) -> "OutputLock":
        """Take the lock of ``output_dir`` (which must exist).

        Raises:
            ValueError: another process holds it (naming its host and pid).
        """
        path = os.path.realpath(os.path.join(output_dir, LOCK_FILE))
        if path in _held:
            _held[path][1] += 1
            return cls(path)
        handle = open(path, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = _holder_text(handle.read())
            handle.close()
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(f"--output_dir {output_dir!r} is in use by another run ({holder}; lock file {path}). "
                             "Wait for it to finish, stop it, or choose another --output_dir") from None
        handle.seek(0)
        previous = handle.read().strip()
        if previous:  # the last holder exited without releasing (killed): its flock went with it
            logger.info(f"note: took over the lock of {output_dir} left by a run that is no longer running "
                        f"({_holder_text(previous)})")
        handle.seek(0)
        handle.truncate()
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, handle)
        handle.flush()
        os.fsync(handle.fileno())
        _held[path] = [handle, 1]
        return cls(path)

    def release(self) -> None:
        """Free the lock (idempotent); the file stays, emptied, so the next run sees no stale holder."""
        if self._released:
            return
        self._released = True
        entry = _held.get(self.path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        handle = entry[0]
        del _held[self.path]
        try:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        finally:
            handle.close()

