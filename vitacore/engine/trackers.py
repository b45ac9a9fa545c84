"""Experiment trackers as the HF Trainer has them: ``--report_to tensorboard``, ``wandb``, ``all`` or ``none``.

Every metrics row the Trainer writes to ``metrics.jsonl`` also goes to each tracker, as scalars at
``step=row["step"]``: numbers only (``None``, strings and booleans are skipped), a dict such as the
per-group ``lr`` flattened to ``lr/<group>``; eval rows too. Only the main rank tracks: other ranks
create nothing and never import a tracker's package.

Which trackers (:func:`resolve_report_to`, checked on every rank when the Trainer is built, before
training): ``none`` nothing; ``all`` every installed one among tensorboard and wandb; an explicit
name must be installed, else ``ValueError`` naming the package and the flag.

Resuming (``resumed``: the run restores a checkpoint):

- wandb: the run id is kept in ``output_dir/wandb_run_id.txt``. A fresh start draws a new id (or
  takes ``WANDB_RUN_ID``) and writes it there; a resumed run reuses it, with ``resume="allow"``, so it
  continues the same wandb run. ``WANDB_MODE=offline``, ``WANDB_PROJECT`` (default ``vitacore``) and
  ``WANDB_DIR`` (default: the output folder) are read from the environment.
- TensorBoard: one folder, ``output_dir/runs``, for every start of a run, so the curves continue.
  The writer opens at the first row that carries scalars, with ``purge_step``: on a resume, that
  row's step, so TensorBoard hides what an earlier start wrote from that step on (the steps the
  resumed run logs again after its checkpoint); on a fresh start, 0, so events of an earlier start
  that left no checkpoint are hidden, as ``metrics.jsonl`` starts empty.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import string
from dataclasses import asdict, is_dataclass
from typing import Optional

TRACKERS = ("tensorboard", "wandb")  # what ``all`` means, when installed
RUN_ID_FILE = "wandb_run_id.txt"


def installed(package: str) -> bool:
    """Whether ``package`` can be imported, found without importing it (``sys.modules[name] = None``: no)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def resolve_report_to(report_to: str, notes: Optional[list] = None) -> list[str]:
    """The trackers ``--report_to`` asks for, as the HF Trainer reads it.

    Args:
        report_to: ``none``, ``all``, ``tensorboard``, ``wandb`` or a comma list of them.
        notes: receives a line per tracker that ``all`` leaves out because it is not installed.

    Raises:
        ValueError: an unknown name, or an explicitly named tracker whose package is not installed.
    """
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    unknown = [name for name in names if name not in (*TRACKERS, "all", "none")]
    if unknown:
        raise ValueError(f"--report_to {report_to}: {', '.join(unknown)} is not one of: "
                         f"{', '.join(TRACKERS)}, all, none (or a comma-separated list of them)")
    chosen = []
    for name in TRACKERS:
        if name in names and not installed(name):
            raise ValueError(f"--report_to {report_to}: the {name} package is not installed; pip install {name}, "
                             f"or drop it from --report_to")
        if name in names or ("all" in names and installed(name)):
            chosen.append(name)
        elif "all" in names and notes is not None:
            notes.append(f"--report_to all: {name} is not installed, so the run is not tracked there "
                         f"(pip install {name})")
    return chosen


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row by name, ``step`` left out; a dict value becomes ``<key>/<name>``."""
    out = {}
    for key, value in row.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, number in items:
            if key != "step" and isinstance(number, (int, float)) and not isinstance(number, bool):
                out[key if sub is None else f"{key}/{sub}"] = number
    return out


def default_run_name(output_dir: str) -> str:
    """The output folder's base name (``--run_name`` unset)."""
    return os.path.basename(os.path.normpath(os.path.abspath(output_dir)))


def wandb_run_id(output_dir: str, resumed: bool) -> str:
    """The wandb run id: ``WANDB_RUN_ID`` if set, else the saved one on a resume, else a new one; saved.

    Args:
        output_dir: the run's folder, where :data:`RUN_ID_FILE` lives.
        resumed: the run restores a checkpoint (so it continues the wandb run that wrote it).
    """
    path = os.path.join(output_dir, RUN_ID_FILE)
    run_id = os.environ.get("WANDB_RUN_ID", "").strip()
    if not run_id and resumed and os.path.exists(path):
        with open(path) as fh:
            run_id = fh.read().strip()
    if not run_id:  # wandb's own id format: 8 characters, lower-case letters and digits
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    with open(path, "w") as fh:
        fh.write(run_id + "\n")
    return run_id


class TensorBoardLog:
    """Scalars of every metrics row into ``log_dir`` with ``torch.utils.tensorboard`` (see the module doc).

    Args:
        log_dir: the event files' folder (None: write nothing).
        resumed: the run restores a checkpoint: purge from the first step written, not from 0.
    """

    def __init__(self, log_dir: Optional[str] = None, resumed: bool = False):
        self.log_dir = log_dir
        self.resumed = resumed
        self.writer = None

    @classmethod
    def create(cls, report_to: str, output_dir: str, is_main: bool, notes: list) -> TensorBoardLog:
        """A tracker into ``output_dir/runs`` when ``report_to`` names TensorBoard (a note when it is missing).

        The single-tracker form of :meth:`Trackers.create`, for fresh runs; the Trainer uses that one.
        """
        wanted = {r.strip() for r in report_to.split(",")} & {"tensorboard", "all"}
        if not wanted or not is_main:
            return cls()
        if not installed("tensorboard"):
            notes.append("--report_to tensorboard ignored: the tensorboard package is not installed "
                         "(pip install tensorboard)")
            return cls()
        return cls(os.path.join(output_dir, "runs"))

    def write(self, row: dict) -> None:
        values = scalars(row)
        if self.log_dir is None or not values:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.log_dir, purge_step=int(row["step"]) if self.resumed else 0)
        for key, value in values.items():
            self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        """Flush and close the event file; later rows are not written."""
        if self.writer is not None:
            self.writer.close()
        self.writer = self.log_dir = None


class WandbLog:
    """Every metrics row to a wandb run (see the module doc); :meth:`start` begins or resumes the run."""

    def __init__(self, run=None):
        self.run = run

    @classmethod
    def start(cls, run_name: str, output_dir: str, resumed: bool, config: Optional[dict] = None) -> WandbLog:
        """``wandb.init`` for this run (the same run id as the checkpoint's run when ``resumed``).

        Raises:
            ValueError: ``wandb.init`` failed (e.g. online without a login), naming the flag and the ways out.
        """
        import wandb

        run_id = wandb_run_id(output_dir, resumed)
        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vitacore"), name=run_name,
                             dir=os.environ.get("WANDB_DIR") or output_dir, id=run_id, resume="allow",
                             config=config)
        except Exception as err:  # wandb's errors have no common base worth naming; the cause stays chained
            raise ValueError(f"--report_to wandb: wandb.init failed ({err}); run `wandb login`, set "
                             "WANDB_MODE=offline, or drop wandb from --report_to") from err
        return cls(run)

    def write(self, row: dict) -> None:
        values = scalars(row)
        if self.run is not None and values:
            self.run.log(values, step=int(row["step"]))

    def close(self) -> None:
        """Finish the wandb run; later rows are not written."""
        if self.run is not None:
            self.run.finish()
        self.run = None


class Trackers:
    """The run's trackers, fanned out: :meth:`write` each metrics row, :meth:`close` at the end."""

    def __init__(self, trackers: Optional[list] = None):
        self.trackers = list(trackers or [])

    @classmethod
    def create(cls, report_to: str, run_name: Optional[str], output_dir: str, is_main: bool, resumed: bool,
               notes: list, config: Optional[dict] = None) -> Trackers:
        """The trackers ``report_to`` asks for, started (main rank only; checked on every rank).

        Args:
            report_to: ``--report_to`` (see :func:`resolve_report_to`).
            run_name: the run's name in wandb (None: the output folder's base name).
            output_dir: the run's folder (``runs/`` for TensorBoard, the wandb run id file).
            is_main: this process logs; other ranks get no trackers.
            resumed: the run restores a checkpoint (wandb continues its run; TensorBoard purges re-logged steps).
            notes: receives lines worth reporting (trackers ``all`` left out).
            config: the run's settings for wandb's config panel; dataclass values are turned into dicts.

        Raises:
            ValueError: see :func:`resolve_report_to` and :meth:`WandbLog.start`.
        """
        names = resolve_report_to(report_to, notes if is_main else None)
        if not is_main:
            return cls()
        made = []
        if "tensorboard" in names:
            made.append(TensorBoardLog(os.path.join(output_dir, "runs"), resumed))
        if "wandb" in names:
            settings = {key: asdict(value) if is_dataclass(value) else value for key, value in (config or {}).items()}
            made.append(WandbLog.start(run_name or default_run_name(output_dir), output_dir, resumed, settings))
        return cls(made)

    def write(self, row: dict) -> None:
        """One metrics row to every tracker."""
        for tracker in self.trackers:
            tracker.write(row)

    def close(self) -> None:
        """Close every tracker (flush TensorBoard, finish the wandb run)."""
        for tracker in self.trackers:
            tracker.close()
