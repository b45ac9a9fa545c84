"""Checkpoint discovery, resume rules, identity checks and rotation, on folders (no engine needed)."""

import json
import os

import pytest

from vitacore.checkpoint.manifest import OWNER_FILE
from vitacore.checkpoint.resumable import (
    COMPLETE_MARKER,
    CheckpointMismatchError,
    check_identity,
    clean_partial_saves,
    latest_checkpoint,
    list_checkpoints,
    resolve_resume,
    rotate,
)


def make(root, name, complete=True, ours=True):
    path = root / name
    path.mkdir(parents=True)
    (path / "payload").write_text(name)
    if ours:
        (path / OWNER_FILE).write_text(json.dumps({"format": "vitacore-checkpoint"}))
    if complete:
        (path / COMPLETE_MARKER).write_text(json.dumps({"step": 1}))
    return path


def test_only_complete_checkpoints_count_and_newest_is_by_step(tmp_path):
    make(tmp_path, "checkpoint-9")
    make(tmp_path, "checkpoint-10")
    make(tmp_path, "checkpoint-12", complete=False)  # killed while saving (before the rename)
    make(tmp_path, "tmp-checkpoint-14", complete=False)
    make(tmp_path, "checkpoint-x")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [9, 10]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert latest_checkpoint(tmp_path / "missing") is None


def test_resume_flag_rules(tmp_path):
    empty = tmp_path / "empty"
    assert resolve_resume(None, str(empty)) is None
    assert resolve_resume("False", str(empty)) is None
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint True: no complete checkpoint"):
        resolve_resume("True", str(empty))
    run = tmp_path / "run"
    make(run, "checkpoint-2")
    make(run, "checkpoint-4")
    assert resolve_resume(None, str(run)) == str(run / "checkpoint-4")
    assert resolve_resume("true", str(run)) == str(run / "checkpoint-4")
    assert resolve_resume(str(run / "checkpoint-2"), str(tmp_path / "other")) == str(run / "checkpoint-2")
    assert resolve_resume(str(run), str(tmp_path / "other")) == str(run / "checkpoint-4")
    with pytest.raises(ValueError, match="already holds 2 checkpoint"):
        resolve_resume("False", str(run))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_resume(str(tmp_path / "nope"), str(run))
    partial = make(tmp_path, "partial/checkpoint-6", complete=False)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(partial), str(run))


def test_rotation_deletes_oldest_complete_and_never_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        make(tmp_path, f"checkpoint-{step}")
    make(tmp_path, "checkpoint-5", complete=False)
    deleted = rotate(str(tmp_path), 2)
    assert [os.path.basename(p) for p in deleted] == ["checkpoint-1", "checkpoint-2"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    rotate(str(tmp_path), 0)  # a limit below one still keeps the newest complete checkpoint
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]


def test_partial_saves_are_cleaned(tmp_path):
    make(tmp_path, "checkpoint-3")
    make(tmp_path, "tmp-checkpoint-6", complete=False)
    make(tmp_path, "deleting-checkpoint-1-99", complete=False)
    make(tmp_path, "tmp-checkpoint-7", complete=False, ours=False)  # another tool's: left alone
    assert sorted(clean_partial_saves(str(tmp_path))) == ["deleting-checkpoint-1-99", "tmp-checkpoint-6"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "tmp-checkpoint-7"]


IDENTITY = {"world_size": 2, "llm": "/m/llm", "vision_tower": "/m/tower", "audio_encoder": "/m/audio",
            "mm_projector_type": "mlp2x_gelu", "trainable": {"mm_projector.0.weight": [8, 4]}, "batch": [4, 2],
            "seed": 42}


def test_identity_must_match():
    check_identity(IDENTITY, dict(IDENTITY), "ckpt")
    cases = [
        ({"world_size": 4}, "written by 2 process(es) and this run has 4"),
        ({"llm": "/other"}, "llm is '/m/llm' there but '/other' here"),
        ({"trainable": {}}, "it trains 1 parameter(s) this run freezes"),
        ({"trainable": {"mm_projector.0.weight": [8, 4], "llm.x": [1]}}, "this run trains 1 parameter(s) it did not"),
        ({"trainable": {"mm_projector.0.weight": [8, 8]}}, "changed shape"),
        ({"batch": [8, 1]}, "--gradient_accumulation_steps"),
        ({"seed": 1}, "--seed was 42"),
    ]
    for change, message in cases:
        with pytest.raises(CheckpointMismatchError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_identity(IDENTITY, {**IDENTITY, **change}, "ckpt")
