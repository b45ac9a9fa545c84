"""Run examples/train_stage.py's recipe, but signal this process as its final export begins.

    python export_signal_driver.py SIGTERM,SIGINT [train_stage flags...]

Each named signal is sent to this process, in order, when the final export starts
(``StageArtifacts.write(..., final=True)``, which ``Checkpointer.save_final`` calls): the moment a
scheduler's preemption would hurt most. examples/train_stage.py is a thin entry point around
``vitacore.recipes.recipe_main``; this driver calls the same function.
"""

import os
import signal
import sys

from vitacore.checkpoint import run_artifacts
from vitacore.recipes import recipe_main

signals = [signal.Signals[name] for name in sys.argv[1].split(",")]
write = run_artifacts.StageArtifacts.write


def write_after_signals(self, directory, is_main, final=False):
    if final:
        for signum in signals:
            os.kill(os.getpid(), signum)
    return write(self, directory, is_main, final)


run_artifacts.StageArtifacts.write = write_after_signals
sys.exit(recipe_main(sys.argv[2:]))
