"""``--ddp_timeout`` reaches the process group: a stalled rank makes its peer fail within the timeout.

Two ranks train the embedded default under ``torchrun``; once a metrics row is written, rank 1 is
frozen with SIGSTOP. Rank 0 then waits in its next collective and must give up after ``--ddp_timeout``
seconds (15 here, to keep the suite short; VITA's scripts' 60 behaves the same), naming the timeout,
instead of after the 1800 s default.
"""

import contextlib
import os
import signal
import subprocess
import time

import psutil  # a DeepSpeed dependency
import pytest
from test_distributed import REPO, SCRIPT, env_for, torchrun

pytestmark = pytest.mark.slow

TIMEOUT_S = 15
# Rank 0 must give up on its own, about TIMEOUT_S after the stall (gloo counts from the collective's start).
GIVES_UP_WITHIN_S = 90


def wait_for_a_row(path, proc, stderr_path, timeout=300):
    """Wait until ``path`` has a line (the job's output goes to files: a pipe could fill and block it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, open(stderr_path).read()[-3000:]
        if os.path.exists(path) and os.path.getsize(path) > 0:
            return
        time.sleep(0.2)
    raise AssertionError("no metrics row appeared in time")


def rank_processes(agent_pid):
    """{rank: psutil.Process} of the training processes under the torchrun agent."""
    ranks = {}
    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            if "train_stage.py" in " ".join(child.cmdline()) and "RANK" in child.environ():
                ranks[int(child.environ()["RANK"])] = child
        except psutil.NoSuchProcess:
            continue
    return ranks


def rank0_timeout_line(stderr_path) -> str:
    """Rank 0's line naming a timed-out collective, or ""; ``--tee 3`` prefixes its lines with ``[default0]``."""
    with open(stderr_path) as fh:
        return next((line for line in fh if line.startswith("[default0]") and "timed out" in line.lower()), "")


def test_a_stalled_rank_fails_the_job_after_ddp_timeout(vitacore_cache, tmp_path):
    out = tmp_path / "o"
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("stdout", "stderr")}
    proc = subprocess.Popen(torchrun(2, "--tee", "3", SCRIPT, "--ddp_timeout", str(TIMEOUT_S), "--max_steps",
                                     "100000", "--logging_steps", "1", "--save_strategy", "no",
                                     "--output_dir", str(out)),
                            env=env_for(vitacore_cache), cwd=REPO, stdout=logs["stdout"], stderr=logs["stderr"])
    ranks = {}
    try:
        wait_for_a_row(out / "metrics.jsonl", proc, tmp_path / "stderr.log")
        ranks = rank_processes(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        ranks[1].send_signal(signal.SIGSTOP)
        stalled_at = time.time()
        line = ""
        while not line and time.time() - stalled_at < GIVES_UP_WITHIN_S:
            time.sleep(0.5)
            line = rank0_timeout_line(tmp_path / "stderr.log")
        seconds = time.time() - stalled_at
        print(f"rank 0 gave up {seconds:.1f} s after rank 1 was stopped: {line.strip()[:200]}")
        tail = open(tmp_path / "stderr.log").read()[-4000:]
        assert line, f"rank 0 still waiting {seconds:.0f} s after the stall:\n{tail}"
        assert f"{TIMEOUT_S * 1000}ms" in line  # the timeout it was given (gloo counts milliseconds)
        assert seconds >= TIMEOUT_S - 5
        # A SIGSTOPped process ignores SIGTERM until continued: kill it, and the job ends with an error.
        ranks[1].kill()
        assert proc.wait(timeout=120) != 0
    finally:
        for worker in ranks.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        for fh in logs.values():
            fh.close()


GROUP_PROBE = '''
import sys, time
import torch
from vitacore.engine import init_distributed
from deepspeed.utils import groups

info = init_distributed(int(sys.argv[1]))
group = groups._get_data_parallel_group()  # ZeRO's gradient / parameter collectives run here
tensor = torch.ones(1)
torch.distributed.all_reduce(tensor, group=group)
if info.rank == 1:
    time.sleep(int(sys.argv[2]))
start = time.time()
try:
    torch.distributed.all_reduce(tensor, group=group)
    print(f"rank {info.rank} waited {time.time() - start:.1f} s", flush=True)
except RuntimeError as err:
    print(f"rank {info.rank} raised after {time.time() - start:.1f} s: {err}", flush=True)
'''


def test_deepspeed_groups_take_the_timeout_too(tmp_path):
    """DeepSpeed makes its data-parallel group with new_group(ranks), which torch gives 30 minutes by default."""
    script = tmp_path / "probe.py"
    script.write_text(GROUP_PROBE)
    env = dict(env_for(str(tmp_path / "cache")), PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get(
        "PYTHONPATH")])))
    result = subprocess.run(torchrun(2, str(script), "3", "12"), capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank 0")]
    assert lines and "raised after" in lines[0], result.stdout[-2000:] + result.stderr[-3000:]
    assert float(lines[0].split("after ")[1].split(" s")[0]) < 10
    assert "3000ms" in lines[0]
