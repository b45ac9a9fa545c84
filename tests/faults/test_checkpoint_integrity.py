"""Checkpoints that are truncated, partly copied or planted are refused, naming the file, before anything
is restored; RNG files are read without running code. Real DeepSpeed engine, real Checkpointer."""

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DRIVER = os.path.join(HERE, "checkpoint_driver.py")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
from checkpoint_driver import engine_for, identity, save, train_step  # noqa: E402
from test_distributed import env_for, torchrun  # noqa: E402

from vitacore.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402
from vitacore.checkpoint.manifest import COMPLETE_MARKER  # noqa: E402


@pytest.fixture(scope="module")
def engine(dist):
    engine = engine_for(zero_stage=0)
    train_step(engine)
    return engine


def saved_checkpoint(engine, dist, out, step=2):
    def write_config(path):
        with open(path, "w") as fh:
            fh.write("a: 1\n")

    checkpointer = Checkpointer(CheckpointConfig(str(out)), dist, write_run_config=write_config)
    path = save(checkpointer, engine, step)
    checkpointer.close()
    return path


def refused_load(engine, dist, out, match):
    started = time.time()
    checkpointer = Checkpointer(CheckpointConfig(str(out)), dist)
    with pytest.raises(ValueError, match=match) as caught:
        checkpointer.load(engine, identity(1))
    checkpointer.close()
    print(f"refused after {time.time() - started:.2f} s: {caught.value}")
    return str(caught.value)


def test_marker_lists_every_file_and_a_truncated_one_is_refused(engine, dist, tmp_path):
    """Setup: a saved checkpoint; then its DeepSpeed model-state file is cut to half its size.
    Expect: the completion marker lists every other file with its size and sha256; the resume is
    refused naming the file, its size and the expected one, and saying what to do. Before: the marker
    held only step and time, and the truncated folder counted as complete."""
    path = saved_checkpoint(engine, dist, tmp_path)
    marker = json.load(open(os.path.join(path, COMPLETE_MARKER)))
    on_disk = {os.path.relpath(os.path.join(root, n), path) for root, _, files in os.walk(path) for n in files}
    assert set(marker["files"]) == on_disk - {COMPLETE_MARKER}
    assert {"config.yaml", "vitacore_state.json", "rng_state_0.pth", "state/mp_rank_00_model_states.pt"} <= on_disk
    for name, entry in marker["files"].items():
        data = open(os.path.join(path, name), "rb").read()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    shard = os.path.join(path, "state", "mp_rank_00_model_states.pt")
    size = os.path.getsize(shard)
    os.truncate(shard, size // 2)
    message = refused_load(engine, dist, tmp_path, "damaged")
    assert f"checkpoint-2/state/mp_rank_00_model_states.pt: size {size // 2}, expected {size}" in message
    assert "--resume_from_checkpoint" in message


def test_a_checkpoint_with_a_file_missing_is_refused(engine, dist, tmp_path):
    """Setup: a saved checkpoint whose config.yaml was deleted (a partial copy). Expect: refused, naming
    checkpoint-2/config.yaml as missing. Before: it resumed as if whole."""
    path = saved_checkpoint(engine, dist, tmp_path)
    os.remove(os.path.join(path, "config.yaml"))
    message = refused_load(engine, dist, tmp_path, "damaged")
    assert "checkpoint-2/config.yaml: missing" in message


class Planted:
    """Unpickling this creates a file: what a planted checkpoint file could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_as_rng_file_is_not_executed(engine, dist, tmp_path):
    """Setup: rng_state_0.pth replaced by a pickle whose loading would create a marker file, with the
    completion marker updated to match (as a crafted download would be). Expect: the resume is refused
    naming rng_state_0.pth, and the marker file does not exist. Before: torch.load(weights_only=False)
    ran it."""
    path = saved_checkpoint(engine, dist, tmp_path / "out")
    evidence = tmp_path / "code_ran"
    rng = os.path.join(path, "rng_state_0.pth")
    with open(rng, "wb") as fh:
        # Protocol 2, which the weights-only loader reads: it refuses the planted call itself.
        pickle.dump({"python": Planted(str(evidence)), "numpy": None, "torch": None}, fh, protocol=2)
    marker_file = os.path.join(path, COMPLETE_MARKER)
    marker = json.load(open(marker_file))
    data = open(rng, "rb").read()
    marker["files"]["rng_state_0.pth"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(marker, open(marker_file, "w"))
    message = refused_load(engine, dist, tmp_path / "out", "rng_state_0.pth")
    assert "not loadable as plain tensors" in message
    assert not evidence.exists()


def test_a_checkpoint_whose_marker_lists_no_files_is_accepted_with_a_note(engine, dist, tmp_path, vitacore_log):
    """Setup: a checkpoint whose marker is in the earlier form ({"step", "time"}). Expect: it resumes,
    with a note that its files are not verified."""
    path = saved_checkpoint(engine, dist, tmp_path)
    json.dump({"step": 2, "time": 0.0}, open(os.path.join(path, COMPLETE_MARKER), "w"))
    checkpointer = Checkpointer(CheckpointConfig(str(tmp_path)), dist)
    assert checkpointer.load(engine, identity(1))["step"] == 2
    checkpointer.close()
    assert "its files are not verified" in vitacore_log.text


def test_truncated_zero3_shard_of_rank_1_stops_both_ranks_naming_it(vitacore_cache, tmp_path):
    """Setup: one 2-process ZeRO-3 job (torchrun) saves checkpoint-4, then rank 1's optimizer shard is
    cut in half and the job resumes from it. Expect: both ranks refuse within 30 s of entering load,
    each naming checkpoint-4/state/zero_pp_rank_1_mp_rank_00_optim_states.pt, and the job exits
    non-zero. Before: the cut folder counted as complete and rank 1 failed inside DeepSpeed alone."""
    started = time.time()
    job = subprocess.run(torchrun(2, DRIVER, "truncated", str(tmp_path / "out")), capture_output=True, text=True,
                         env=env_for(vitacore_cache), timeout=300, cwd=REPO)
    wall = time.time() - started
    output = job.stdout + job.stderr
    assert job.returncode != 0, output[-3000:]
    # The two ranks print into one pipe: their lines may run together, so each line is found by its pattern.
    cut = json.loads(re.search(r'\{"size": \d+, "expected": \d+\}', job.stdout).group(0))
    name = (f"checkpoint-4/state/zero_pp_rank_1_mp_rank_00_optim_states.pt: size {cut['size']}, "
            f"expected {cut['expected']}")
    refusals = re.findall(r"rank (\d) refused after ([\d.]+) s: ([^\n]*?\(truncated or partly copied\))", job.stdout)
    assert sorted(rank for rank, _, _ in refusals) == ["0", "1"], output[-3000:]
    for _, seconds, message in refusals:
        assert name in message, message
        assert float(seconds) < 30, seconds
    print(f"both ranks refused; the whole job (start-up, save, resume) took {wall:.1f} s; {refusals}")
