"""Runs ``examples/train_stage.py``'s entry point with extra flags on one rank only.

    rank_flags_driver.py [flags for every rank...] --only_rank R [flags for rank R only...]

Used to give the ranks of one job different data or settings, which a launcher never does on purpose
but a per-node path or a file edited during start-up does by accident.
"""

import os
import sys

from vitacore.recipes import recipe_main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--only_rank" in argv:
        cut = argv.index("--only_rank")
        argv, rank, extra = argv[:cut], argv[cut + 1], argv[cut + 2:]
        if os.environ.get("RANK") == rank:
            argv += extra
    sys.exit(recipe_main(argv))
