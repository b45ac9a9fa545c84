"""The side-by-side summary both step-time benchmarks print: a table per side, then the ratios."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def print_summary(say: Callable[..., None], ours: str, theirs: str, means: dict, medians: dict,
                  extra_name: str, extra: dict, note: str, started: float) -> list[float]:
    """Print the table and per-round ratios; return the ratios of mean step time (ours / theirs).

    Args:
        say: print-like function.
        ours / theirs: the two side names (keys of ``means`` / ``medians`` / ``extra``).
        means / medians: side -> per-round mean and median single-step seconds.
        extra_name: title of the extra column; ``extra``: side -> (values, format spec).
        note: what the figures do not say.
        started: ``time.time()`` when the benchmark began.
    """
    say(f"{'':10s} {'ms/step (median of rounds)':>27s} {'min':>9s} {'max':>9s} {'median single step':>19s} "
        f"{extra_name:>14s}")
    for side in (ours, theirs):
        values, spec = extra[side]
        say(f"{side:10s} {statistics.median(means[side]) * 1e3:27.2f} {min(means[side]) * 1e3:9.2f} "
            f"{max(means[side]) * 1e3:9.2f} {statistics.median(medians[side]) * 1e3:19.2f} "
            f"{statistics.median(values):{spec}}")
    ratios = [a / b for a, b in zip(means[ours], means[theirs])]
    step_ratios = [a / b for a, b in zip(medians[ours], medians[theirs])]
    say(f"\nper-round ratios {ours}/{theirs} (mean step time): {', '.join(f'{r:.3f}' for r in ratios)}")
    say(f"per-round ratios {ours}/{theirs} (median single step): {', '.join(f'{r:.3f}' for r in step_ratios)}")
    say(f"note: {note}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    say(f"(total wall time {time.time() - started:.0f}s; {os.cpu_count()} CPUs, "
        f"1-min load average at the end {load:.1f})")
    return ratios
