"""``run_status.json``: what a run in an output folder is doing, or how it ended.

A scheduler or a person can read one small file instead of parsing logs: ``running``, ``finished``,
``stopped`` (by a signal; the run can be resumed from ``last_checkpoint``) or ``failed`` (with the
error message). The file is replaced atomically, so a reader never sees half of it.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Optional

from vitacore.durable import atomic_write

RUN_STATUS_FILE = "run_status.json"
RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"


def read_run_status(output_dir: str) -> Optional[dict]:
    """The output folder's ``run_status.json``, or None where there is none."""
    path = os.path.join(output_dir, RUN_STATUS_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class RunStatus:
    """Keeps ``<output_dir>/run_status.json`` up to date (on the main rank; a no-op elsewhere).

    Fields: ``status``, ``step``, ``total_steps``, ``last_checkpoint``, ``started``, ``time`` (of this
    write, UTC ISO 8601), plus ``signal`` when stopped and ``error`` when failed.

    Args:
        output_dir: the run's folder.
        enabled: write the file (the main rank).
        min_interval_s: training rows update the file at most this often (checkpoints, resumes and
            the end always do).
    """

    def __init__(self, output_dir: str, enabled: bool, min_interval_s: float = 30.0):
        self.path = os.path.join(output_dir, RUN_STATUS_FILE)
        self.enabled = enabled
        self.min_interval_s = min_interval_s
        self.fields: dict = {"status": RUNNING, "step": 0, "total_steps": None, "last_checkpoint": None,
                             "started": _now()}
        self._written_at = 0.0

    def running(self, total_steps: int, last_checkpoint: Optional[str]) -> None:
        """Training is about to start (or resume)."""
        self.fields.update(status=RUNNING, total_steps=total_steps, last_checkpoint=last_checkpoint)
        self._write()

    def observe(self, row: dict) -> None:
        """Follow the trainer's metrics rows: the step, and the checkpoints as they are written."""
        if "step" in row:
            self.fields["step"] = row["step"]
        event = row.get("event")
        if event == "checkpoint":
            self.fields["last_checkpoint"] = row.get("path")
        if event in ("checkpoint", "resumed") or time.monotonic() - self._written_at >= self.min_interval_s:
            self._write()

    def finished(self, step: int, last_checkpoint: Optional[str]) -> None:
        """The run trained to its end and wrote its final artifacts."""
        self.fields.update(status=FINISHED, step=step, last_checkpoint=last_checkpoint)
        self._write()

    def stopped(self, signal_name: str, step: int, last_checkpoint: Optional[str]) -> None:
        """A signal stopped the run; its last checkpoint resumes it."""
        self.fields.update(status=STOPPED, signal=signal_name, step=step, last_checkpoint=last_checkpoint)
        self._write()

    def failed(self, error: str) -> None:
        """The run ended with an error (``error``: the message shown to the user)."""
        self.fields.update(status=FAILED, error=error)
        self._write()

    def _write(self) -> None:
        if not self.enabled:
            return
        record = {**self.fields, "time": _now()}

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=2)

        atomic_write(self.path, write)
        self._written_at = time.monotonic()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
