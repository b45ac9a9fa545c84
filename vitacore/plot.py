"""Draw a run's curves from its ``metrics.jsonl``, or compare several runs.

Usage::

    python -m vitacore.plot OUTPUT_DIR                  # -> OUTPUT_DIR/training_curves.png
    python -m vitacore.plot RUN_A RUN_B [--output x.png] # -> ./runs_comparison.png (or x.png)

Prints the path written. Exit status 2, with a message naming the folder, when a folder has no
``metrics.jsonl`` or no training row in it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from vitacore.engine.plots import METRICS_FILE, draw_runs, draw_training_curves

COMPARISON_FILE = "runs_comparison.png"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitacore.plot",
        description="Draw training curves from a run's metrics.jsonl (one folder), or compare several runs.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="a run's --output_dir (holding metrics.jsonl)")
    parser.add_argument("--output", "-o", default=None,
                        help="the PNG to write (default: DIR/training_curves.png for one folder, "
                             f"./{COMPARISON_FILE} for several)")
    parser.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                        help="legend labels of a comparison, one per DIR (default: the folder names)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 drawn, 2 a folder without metrics)."""
    args = _parser().parse_args(argv)
    for run_dir in args.dirs:
        if not os.path.isfile(os.path.join(run_dir, METRICS_FILE)):
            where = "no such folder" if not os.path.isdir(run_dir) else f"no {METRICS_FILE} in it"
            print(f"error: {run_dir}: {where}; pass a run's --output_dir (a run writes {METRICS_FILE} from its "
                  "first logged step)", file=sys.stderr)
            return 2
    if len(args.dirs) == 1:
        if args.labels:
            print("error: --labels names the runs of a comparison; pass two or more DIRs", file=sys.stderr)
            return 2
        path = draw_training_curves(args.dirs[0], args.output)
        if path is None:
            print(f"error: {os.path.join(args.dirs[0], METRICS_FILE)} has no training row (no finite 'loss') yet; "
                  "plot it once the run has logged a step", file=sys.stderr)
            return 2
    else:
        try:
            path = draw_runs(args.dirs, args.output or COMPARISON_FILE, labels=args.labels)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
