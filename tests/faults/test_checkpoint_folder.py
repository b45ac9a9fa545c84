"""Checkpoint folders that must not go stale or vanish: rollback then rotate, a crash between removing
and publishing, another tool's checkpoint folder. Real DeepSpeed engine, real Checkpointer."""

import hashlib
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoint_driver import engine_for, identity, save, train_step  # noqa: E402

import vitacore.checkpoint.resumable as resumable  # noqa: E402
from vitacore.checkpoint import CheckpointConfig, Checkpointer, list_checkpoints, verify_checkpoint  # noqa: E402
from vitacore.checkpoint.state_files import read_trainer_state  # noqa: E402


@pytest.fixture(scope="module")
def engine(dist):
    engine = engine_for(zero_stage=0)
    train_step(engine)
    return engine


def names(folder):
    return sorted(os.listdir(folder))


def test_rollback_then_rotate_keeps_the_new_checkpoint_and_sets_the_abandoned_one_aside(engine, dist, tmp_path):
    """Setup: checkpoints 300 and 500; resume from 300 with save_total_limit 1, save step 400.
    Expect: 500 is moved to abandoned-checkpoint-500-<time>/ (not deleted) before training; saving 400
    deletes only 300; 400 is the one checkpoint left and the next automatic resume picks it."""
    out = str(tmp_path)
    first = Checkpointer(CheckpointConfig(out), dist)
    save(first, engine, 300)
    save(first, engine, 500)
    first.close()
    started = time.time()
    resumed = Checkpointer(CheckpointConfig(out, save_total_limit=1, resume_from_checkpoint=f"{out}/checkpoint-300"),
                           dist)
    assert resumed.load(engine, identity(1))["step"] == 300
    save(resumed, engine, 400)
    resumed.close()
    print(f"resume + save + rotate: {time.time() - started:.2f} s")
    left = names(out)
    assert "checkpoint-400" in left and "checkpoint-300" not in left and "checkpoint-500" not in left, left
    abandoned = [n for n in left if n.startswith("abandoned-checkpoint-500-")]
    assert len(abandoned) == 1 and os.path.exists(os.path.join(out, abandoned[0], "state")), left
    assert [step for step, _ in list_checkpoints(out)] == [400]
    assert Checkpointer(CheckpointConfig(out), dist).resume_path == os.path.join(out, "checkpoint-400")


class SimulatedKill(BaseException):
    """Stands for SIGKILL at the commit point (no handler runs after it)."""


def test_crash_between_removing_and_publishing_the_same_step_is_rolled_forward(engine, dist, tmp_path, monkeypatch):
    """Setup: checkpoint-4 exists; step 4 is saved again and the process dies right before the new
    folder is renamed (after the old checkpoint-4 was taken away). Expect: the next start publishes the
    complete tmp-checkpoint-4 as checkpoint-4 (its files verify; it holds the second save) and resumes
    from it; before, the next start deleted it and no checkpoint was left."""
    out = str(tmp_path)
    checkpointer = Checkpointer(CheckpointConfig(out), dist)
    save(checkpointer, engine, 4, save=1)

    def die(tmp, final):
        raise SimulatedKill

    monkeypatch.setattr(resumable, "_publish", die)
    with pytest.raises(SimulatedKill):
        save(checkpointer, engine, 4, save=2)
    monkeypatch.undo()
    checkpointer.close()
    assert "tmp-checkpoint-4" in names(out) and "checkpoint-4" not in names(out), names(out)
    started = time.time()
    restarted = Checkpointer(CheckpointConfig(out), dist)
    print(f"start with roll-forward: {time.time() - started:.2f} s")
    final = os.path.join(out, "checkpoint-4")
    assert restarted.resume_path == final
    assert [n for n in names(out) if "checkpoint" in n] == ["checkpoint-4"], names(out)
    verify_checkpoint(final)
    assert read_trainer_state(final)["save"] == 2
    assert restarted.load(engine, identity(1))["step"] == 4


def tree_digest(folder):
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(path.encode() + open(path, "rb").read() + str(os.stat(path).st_mtime_ns).encode())
    return digest.hexdigest()


def test_another_tools_checkpoint_folder_is_never_deleted_rotated_or_resumed(engine, dist, tmp_path):
    """Setup: an HF-style checkpoint-2/ (trainer_state.json + pytorch_model.bin, no vitacore marker) in
    the output folder; a run with save_total_limit 1 saves steps 1 and 3, then tries step 2.
    Expect: the folder is never resumed from, rotated or deleted (byte- and mtime-identical); saving
    step 2 is refused naming it; an explicit resume from it is refused. Before: saving step 2 deleted it."""
    out = tmp_path / "out"
    hf = out / "checkpoint-2"
    hf.mkdir(parents=True)
    (hf / "trainer_state.json").write_text('{"global_step": 2, "log_history": []}')
    (hf / "pytorch_model.bin").write_bytes(os.urandom(256))
    before = tree_digest(hf)
    checkpointer = Checkpointer(CheckpointConfig(str(out), save_total_limit=1), dist)
    assert checkpointer.resume_path is None
    save(checkpointer, engine, 1)
    save(checkpointer, engine, 3)
    started = time.time()
    with pytest.raises(ValueError, match=r"checkpoint-2.* not written by vitacore"):
        save(checkpointer, engine, 2)
    print(f"refused save into the foreign folder after {time.time() - started:.2f} s")
    checkpointer.close()
    assert tree_digest(hf) == before
    assert names(out).count("checkpoint-2") == 1 and "checkpoint-3" in names(out) and "checkpoint-1" not in names(out)
    with pytest.raises(ValueError, match="not a vitacore checkpoint"):
        Checkpointer(CheckpointConfig(str(out), resume_from_checkpoint=str(hf)), dist)
    assert tree_digest(hf) == before


def test_a_kill_during_the_final_save_leaves_the_previous_final_files_whole(dist, tmp_path):
    """Setup: a finished run's config.yaml at the top of the output folder; the next final save dies
    halfway through writing its config. Expect: the previous config.yaml is still there, whole; a
    later final save replaces it. Before: the final files were written in place, so the kill left half
    a config.yaml."""
    out = tmp_path / "out"
    previous = "learning_rate: 0.001\nmax_steps: 10\n"

    def write_whole(text):
        def write(path):
            with open(path, "w") as fh:
                fh.write(text)
        return write

    def write_half_then_die(path):
        with open(path, "w") as fh:
            fh.write(previous[:9])
        raise SimulatedKill

    Checkpointer(CheckpointConfig(str(out)), dist, write_run_config=write_whole(previous)).save_final()
    dying = Checkpointer(CheckpointConfig(str(out)), dist, write_run_config=write_half_then_die)
    with pytest.raises(SimulatedKill):
        dying.save_final()
    dying.close()
    assert (out / "config.yaml").read_text() == previous
    Checkpointer(CheckpointConfig(str(out)), dist, write_run_config=write_whole("max_steps: 20\n")).save_final()
    assert (out / "config.yaml").read_text() == "max_steps: 20\n"
    assert "tmp-final-artifacts" not in names(out)
