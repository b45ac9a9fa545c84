"""``metrics.jsonl`` as curves: one point per step, continuous across resumes.

A resumed run appends to the same file, so a ``resumed`` row at step S drops the earlier rows past
S, and of several rows for one step the last one written wins. Values that are not finite numbers
(``null``, ``"inf"``, ``"nan"``) are skipped. :mod:`vitacore.engine.plots` draws what this reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

_NOT_SERIES = ("step", "epoch", "lr", "event", "path", "signal")

Series = tuple[list[int], list[float]]


@dataclass
class Curves:
    """What a ``metrics.jsonl`` says, one point per step.

    Attributes:
        series: metric name -> (steps, values), steps ascending; ``loss``, ``grad_norm``, ``eval_loss``,
            ``loss_image`` ... as logged. Learning rates are ``lr`` (one group) or ``lr/<group>``.
        resumes: steps a resumed run started from.
        checkpoints: steps a checkpoint was saved at.
    """

    series: dict[str, Series] = field(default_factory=dict)
    resumes: list[int] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)

    @property
    def has_training(self) -> bool:
        """Whether any training row (one with a finite ``loss``) was logged."""
        return bool(self.series.get("loss", ((), ()))[0])

    def lr_series(self) -> dict[str, Series]:
        """Group name -> learning-rate series (``"lr"`` when the log never told groups apart)."""
        return {k.split("/", 1)[1] if "/" in k else k: v for k, v in self.series.items()
                if k == "lr" or k.startswith("lr/")}


def read_rows(metrics_path: str) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` with a numeric ``step``, in file order.

    Lines that are not JSON objects (a line cut short by a killed run) are skipped.
    """
    rows = []
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = _number(row.get("step")) if isinstance(row, dict) else None
            if step is not None:
                rows.append({**row, "step": int(step)})
    return rows


def current_rows(rows: Iterable[dict]) -> list[dict]:
    """The rows of the run as it stands, ordered by step.

    A ``resumed`` row at step S drops the rows written before it for steps past S (the killed run's
    tail, redone after the resume); then, for each step, the last row of each kind (training row,
    eval row, each event) is kept.
    """
    kept: list[dict] = []
    for row in rows:
        if row.get("event") == "resumed":
            kept = [r for r in kept if r["step"] <= row["step"]]
        kept.append(row)
    latest: dict[tuple, dict] = {}
    for row in kept:
        key = (_kind(row), row["step"])
        latest.pop(key, None)  # re-inserted, so the dict keeps the order of the last write
        latest[key] = row
    return sorted(latest.values(), key=lambda r: r["step"])


def curve_rows(metrics_path: str) -> Curves:
    """Read ``metrics_path`` into :class:`Curves`: one point per step and metric, finite values only."""
    rows = current_rows(read_rows(metrics_path))
    groups = list(dict.fromkeys(g for r in rows if isinstance(r.get("lr"), dict) for g in r["lr"]))
    points: dict[str, dict[int, float]] = {}

    def add(name: str, step: int, value) -> None:
        number = _number(value)
        if number is not None:
            points.setdefault(name, {})[step] = number

    curves = Curves()
    for row in rows:
        step = int(row["step"])
        event = row.get("event")
        if event == "resumed":
            curves.resumes.append(step)
        elif event == "checkpoint":
            curves.checkpoints.append(step)
        if event is not None:
            continue
        for name, value in row.items():
            if name not in _NOT_SERIES:
                add(name, step, value)
        lr = row.get("lr")
        if isinstance(lr, dict):
            for group, value in lr.items():
                add(f"lr/{group}", step, value)
        elif lr is not None:  # one number: every group had this LR
            for group in groups or [None]:
                add(f"lr/{group}" if group else "lr", step, lr)
    curves.series = {name: (sorted(by_step), [by_step[s] for s in sorted(by_step)])
                     for name, by_step in points.items()}
    curves.resumes, curves.checkpoints = sorted(set(curves.resumes)), sorted(set(curves.checkpoints))
    return curves


def smooth(values: Sequence[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average with ``alpha = 2 / (span + 1)`` (TensorBoard's smoothing)."""
    alpha, average, weight, out = 2.0 / (span + 1), 0.0, 0.0, []
    for value in values:
        average = (1 - alpha) * average + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append(average / weight)
    return out


def smoothing_span(count: int) -> int:
    """The EMA span for ``count`` logged rows: about a tenth of them, between 2 and 100."""
    return max(2, min(100, count // 10))


def _kind(row: dict) -> str:
    if row.get("event") is not None:
        return f"event:{row['event']}"
    return "eval" if any(k.startswith("eval_") for k in row) else "train"


def _number(value) -> Optional[float]:
    """``value`` as a finite float, or None (null, bools, "inf" / "nan", text)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
