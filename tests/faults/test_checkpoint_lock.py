"""One run per output folder: a second run on a folder another process holds is refused; a lock left by
a killed run is taken over."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from vitacore.checkpoint import CheckpointConfig, Checkpointer

HOLDER = """
import sys, time
import torch
from vitacore.checkpoint import CheckpointConfig, Checkpointer
from vitacore.engine.distributed import DistInfo

checkpointer = Checkpointer(CheckpointConfig(sys.argv[1]), DistInfo(0, 1, 0, torch.device("cpu")))
print("held", flush=True)
time.sleep(120)
"""


def start_holder(out):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_locked_output_folder_is_refused_and_a_stale_lock_is_taken_over(dist, tmp_path, vitacore_log):
    """Setup: another process (a real Checkpointer) holds the output folder; this process starts a run
    there; then the holder is killed (SIGKILL) and the run is started again. Expect: the first start is
    refused naming the holder's host and pid, without touching the folder's checkpoints; after the kill
    the lock is taken over with a note. Before: both runs used the folder at once."""
    out = tmp_path / "out"
    holder = start_holder(out)
    try:
        started = time.time()
        with pytest.raises(ValueError, match="in use by another run") as caught:
            Checkpointer(CheckpointConfig(str(out)), dist)
        print(f"refused after {time.time() - started:.2f} s: {caught.value}")
        assert f"host {socket.gethostname()}, pid {holder.pid}" in str(caught.value)
        assert "--output_dir" in str(caught.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    checkpointer = Checkpointer(CheckpointConfig(str(out)), dist)
    assert f"took over the lock of {out}" in vitacore_log.text and f"pid {holder.pid}" in vitacore_log.text
    checkpointer.close()
    vitacore_log.clear()
    Checkpointer(CheckpointConfig(str(out)), dist).close()  # released cleanly: no stale note this time
    assert "took over" not in vitacore_log.text
