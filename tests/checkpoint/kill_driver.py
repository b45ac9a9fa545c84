"""Run examples/train_stage.py, but SIGKILL this process when checkpoint-<STEP> is about to be renamed.

    python kill_driver.py STEP [train_stage flags...]

This is the worst moment for a save: every file of the new checkpoint is written, none is published.
examples/train_stage.py is a thin entry point around ``vitacore.recipes.recipe_main``; this driver
calls the same function after patching the commit point (``save_checkpoint`` in
``vitacore.checkpoint.resumable``, which the Checkpointer calls, looks ``_publish`` up at call time).
"""

import os
import signal
import sys

import vitacore.checkpoint.resumable as resumable
from vitacore.recipes import recipe_main

kill_step = int(sys.argv[1])
publish = resumable._publish


def publish_or_die(tmp, final):
    if final.endswith(f"checkpoint-{kill_step}"):
        os.kill(os.getpid(), signal.SIGKILL)
    publish(tmp, final)


resumable._publish = publish_or_die
sys.exit(recipe_main(sys.argv[2:]))
