"""Resuming compares the checkpoint's resolved config with this run's: silent changes are refused.

The flat configs here are what ``RunConfig.flat_dict()`` gives and what a checkpoint's ``config.yaml``
holds; the end-to-end refusal through ``examples/train_stage.py`` is in ``test_resume_refusal.py``.
"""

from __future__ import annotations

import os

import pytest

from vitacore.checkpoint.resume_config import (
    check_resume_changes,
    compare_configs,
    parse_allowed,
    read_saved_config,
)
from vitacore.config import parse_args


def flat(*argv: str) -> dict:
    return parse_args(list(argv)).flat_dict()


def test_changed_learning_rate_is_refused_naming_both_values():
    """Setup: a run saved with --learning_rate 1e-4 resumes with 2e-4. Expect: refused, the message shows
    the old and new value and the flag that would allow it."""
    changes = compare_configs(flat("--learning_rate", "1e-4"), flat("--learning_rate", "2e-4"))
    with pytest.raises(ValueError, match=r"--learning_rate: 0\.0001 -> 0\.0002.*--allow_resume_changes learning_rate"):
        check_resume_changes(changes, "out/checkpoint-2")


@pytest.mark.parametrize("argv", [("--max_steps", "9"), ("--model_max_length", "64"), ("--bf16", "True"),
                                  ("--deepspeed", "zero3"), ("--lr_scheduler_type", "cosine"),
                                  ("--data_path", "other.json"), ("--num_train_epochs", "3")])
def test_changes_that_alter_the_run_are_refused(argv):
    """Setup: one flag of the schedule, total steps, data, length, precision or ZeRO stage differs.
    Expect: refused."""
    with pytest.raises(ValueError, match=f"--{argv[0].lstrip('-')}:"):
        check_resume_changes(compare_configs(flat(), flat(*argv)), "ckpt")


def test_named_changes_are_allowed_and_reported():
    """Setup: --learning_rate and --max_steps changed and named in --allow_resume_changes.
    Expect: no refusal; one note per change with both values."""
    allowed = parse_allowed("learning_rate, --max_steps")
    changes = compare_configs(flat("--learning_rate", "1e-4"), flat("--learning_rate", "3e-4", "--max_steps", "7"),
                              allowed)
    notes = check_resume_changes(changes, "ckpt")
    assert [c.flag for c in changes] == ["learning_rate", "max_steps"]
    assert any("--max_steps: -1 -> 7" in note for note in notes)


def test_bookkeeping_changes_pass_with_a_note():
    """Setup: logging, saving cadence and workers differ. Expect: allowed, and each printed."""
    changes = compare_configs(flat("--logging_steps", "10"), flat("--logging_steps", "1", "--save_steps", "3",
                                                                   "--dataloader_num_workers", "2"))
    notes = check_resume_changes(changes, "ckpt")
    assert len(notes) == 3 and all(c.allowed for c in changes)


def test_two_spellings_of_one_path_are_equal(tmp_path, monkeypatch):
    """Setup: the checkpoint's run named ./llm, this one /abs/llm (the same folder). Expect: no change."""
    (tmp_path / "llm").mkdir()
    monkeypatch.chdir(tmp_path)
    changes = compare_configs(flat("--model_name_or_path", "./llm"),
                              flat("--model_name_or_path", str(tmp_path / "llm")))
    assert changes == []


def test_different_folders_are_a_change(tmp_path):
    """Setup: two existing but different LLM folders. Expect: refused."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    changes = compare_configs(flat("--model_name_or_path", str(tmp_path / "a")),
                              flat("--model_name_or_path", str(tmp_path / "b")))
    with pytest.raises(ValueError, match="--model_name_or_path"):
        check_resume_changes(changes, "ckpt")


def test_saved_config_round_trip_and_unreadable_file(tmp_path):
    """Setup: a config.yaml written by RunConfig.to_yaml, and one that is not YAML. Expect: the first
    compares equal to its run; the second is refused naming the file."""
    config = parse_args(["--learning_rate", "3e-4", "--stage", "2"])
    path = str(tmp_path / "config.yaml")
    config.to_yaml(path)
    assert compare_configs(read_saved_config(path), config.flat_dict()) == []
    broken = tmp_path / "broken.yaml"
    broken.write_bytes(b"model: [unclosed\n\xff")
    with pytest.raises(ValueError, match="broken.yaml"):
        read_saved_config(str(broken))
    assert read_saved_config(os.path.join(str(tmp_path), "absent.yaml")) is None
