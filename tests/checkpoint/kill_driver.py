"""Run examples/train_stage.py, but SIGKILL this process when checkpoint-<STEP> is about to be renamed.

    python kill_driver.py STEP [train_stage flags...]

This is the worst moment for a save: every file of the new checkpoint is written, none is published.
"""

import os
import signal
import sys

import vitacore.checkpoint.resumable as resumable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "examples"))

import train_stage  # noqa: E402

kill_step = int(sys.argv[1])
publish = resumable._publish


def publish_or_die(tmp, final):
    if final.endswith(f"checkpoint-{kill_step}"):
        os.kill(os.getpid(), signal.SIGKILL)
    publish(tmp, final)


resumable._publish = publish_or_die
sys.exit(train_stage.main(sys.argv[2:]))
