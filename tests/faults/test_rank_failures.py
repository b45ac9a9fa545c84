"""Ranks fail together: what one rank alone runs into stops every rank at once, with the original message.

Each test starts the two ranks of a job as separate processes with the environment ``torchrun`` gives
them (RANK, WORLD_SIZE, MASTER_ADDR, ...), but without torchrun's agent: the agent kills the other
ranks once one exits, which would hide a rank that waits in a collective. Here each rank must exit
on its own, and the test measures when.
"""

import json
import os
import subprocess
import sys
import time

import pytest
from launch import free_port
from torch.utils.data import DistributedSampler

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")
DRIVER = os.path.join(REPO, "tests", "faults", "rank_flags_driver.py")
pytestmark = pytest.mark.slow

EXIT_WITHIN_S = 30  # after the first rank reports its error
GIVE_UP_S = 300  # the test's own limit (start-up included)


def start_ranks(tmp_path, cache, argv: list[str]) -> list[subprocess.Popen]:
    """The two ranks of one job, each writing rank<R>.out / rank<R>.err under ``tmp_path``."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, VITACORE_CACHE=cache, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=REPO,
                                      stdout=open(tmp_path / f"rank{rank}.out", "w"),
                                      stderr=open(tmp_path / f"rank{rank}.err", "w")))
    return procs


def error_line(path) -> str:
    with open(path) as fh:
        return next((line for line in fh if line.startswith("error:")), "")


def wait_for_exits(tmp_path, procs) -> tuple[list[int], list[float], list[str]]:
    """(exit codes, seconds from the first ``error:`` line of any rank to each rank's exit, the error lines)."""
    deadline, first_error, exited = time.time() + GIVE_UP_S, None, [None, None]
    try:
        while None in exited and time.time() < deadline:
            now = time.time()
            if first_error is None and any(error_line(tmp_path / f"rank{r}.err") for r in (0, 1)):
                first_error = now
            for rank, proc in enumerate(procs):
                if exited[rank] is None and proc.poll() is not None:
                    exited[rank] = now
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    logs = "\n".join(f"--- rank {r}:\n" + (tmp_path / f"rank{r}.err").read_text()[-3000:] for r in (0, 1))
    assert first_error is not None, f"no rank reported an error:\n{logs}"
    assert None not in exited, f"a rank was still running {GIVE_UP_S} s after start:\n{logs}"
    lines = [error_line(tmp_path / f"rank{r}.err") for r in (0, 1)]
    return [p.returncode for p in procs], [round(t - first_error, 1) for t in exited], lines


@pytest.fixture(scope="module")
def demo_images(vitacore_cache):
    """The first 16 image records of the embedded default's data, with absolute image paths."""
    from vitacore.demo import ensure_default_assets

    root = ensure_default_assets().data_root
    with open(os.path.join(root, "image.json")) as fh:
        records = json.load(fh)[:16]
    for record in records:
        record["image"] = os.path.join(root, record["image"])
    return records


COMMON = ["--stage", "1", "--seed", "42", "--group_by_modality_length", "False", "--per_device_train_batch_size",
          "2", "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no", "--plot_loss", "False"]


def test_a_bad_record_only_rank_1_draws_stops_both_ranks(vitacore_cache, demo_images, tmp_path):
    """Setup: --on_bad_sample error; the record rank 1's sampler visits first (seed 42, 2 ranks) names a missing
    image; rank 0 never draws it. Expect: both ranks exit 2 within 30 s of rank 1's error; rank 1 names the
    file and record, rank 0 says rank 1 failed with the same message (before: rank 1 raised, then waited 60 s
    in the exit barrier while rank 0 waited in its next collective)."""
    records = [dict(r) for r in demo_images]
    bad = next(iter(DistributedSampler(range(len(records)), num_replicas=2, rank=1, shuffle=True, seed=42)))
    records[bad]["image"] = str(tmp_path / "gone.png")
    records[bad]["id"] = "the-bad-one"
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    procs = start_ranks(tmp_path, vitacore_cache, [SCRIPT, *COMMON, "--data_path", str(data), "--on_bad_sample",
                                                   "error", "--output_dir", str(tmp_path / "out")])
    codes, seconds, lines = wait_for_exits(tmp_path, procs)
    print(f"exit codes {codes}, seconds after the first error {seconds}")
    assert codes == [2, 2], lines
    assert max(seconds) < EXIT_WITHIN_S, seconds
    assert "gone.png" in lines[1] and "the-bad-one" in lines[1], lines[1]
    assert "rank 1 failed" in lines[0] and "gone.png" in lines[0] and "the-bad-one" in lines[0], lines[0]


def test_ranks_with_different_data_or_settings_refuse_to_start(vitacore_cache, demo_images, tmp_path):
    """Setup: rank 1 alone gets a data file with one record fewer and another --learning_rate. Expect: both
    ranks exit 2 before training, within 30 s of each other, naming the training data (16 vs 15 records)
    and learning_rate (before: each rank trained on its own data and schedule, unnoticed)."""
    full, short = tmp_path / "full.json", tmp_path / "short.json"
    full.write_text(json.dumps(demo_images))
    short.write_text(json.dumps(demo_images[:-1]))
    procs = start_ranks(tmp_path, vitacore_cache, [DRIVER, *COMMON, "--data_path", str(full), "--output_dir",
                                                   str(tmp_path / "out"), "--only_rank", "1", "--data_path",
                                                   str(short), "--learning_rate", "0.001"])
    codes, seconds, lines = wait_for_exits(tmp_path, procs)
    print(f"exit codes {codes}, seconds after the first error {seconds}")
    assert codes == [2, 2], lines
    assert max(seconds) < EXIT_WITHIN_S, seconds
    for line in lines:
        assert "training data" in line and "16 records" in line and "15 records" in line, line
        assert "learning_rate" in line, line
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")
