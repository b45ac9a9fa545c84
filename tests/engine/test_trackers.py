"""``--report_to`` trackers as the HF Trainer has them: wandb (offline) and TensorBoard, read back with their own
readers, a resume that continues the same wandb run without duplicated TensorBoard steps, and the refusals."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from vitacore.engine.trackers import RUN_ID_FILE, Trackers, resolve_report_to, scalars
from vitacore.recipes import recipe_main


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """wandb offline and silent, every folder it writes inside ``tmp_path``; returns ``WANDB_DIR``."""
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    for name in ("WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    return wandb_dir


def run_demo(out, *flags: str) -> int:
    """The embedded demo's stage 1, in this process, into ``out`` (checkpoints every 5 steps, the last two kept)."""
    return recipe_main(["--output_dir", str(out), "--logging_steps", "2", "--save_steps", "5",
                        "--save_total_limit", "2", *flags])


def metrics_rows(out) -> dict[int, dict]:
    """``metrics.jsonl``'s training rows by step (the last row per step, as the contract says)."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {row["step"]: row for row in rows if "loss" in row}


def wandb_records(run_file: str) -> list[dict]:
    """The records of an offline ``run-<id>.wandb`` log, decoded by wandb's own reader (``wandb leet inspect``)."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_file],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def offline_run(wandb_dir, run_id: str, nth: int) -> tuple[dict, dict[int, dict]]:
    """The ``nth`` (0-based, by start time) offline run of ``run_id``: its run record and its history by step."""
    folders = sorted(glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}")))
    assert len(folders) > nth, folders
    records = wandb_records(os.path.join(folders[nth], f"run-{run_id}.wandb"))
    run = next(r["run"] for r in records if r["type"] == "run")
    history = {}
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            history.setdefault(item["_step"], {}).update(item)
    return run, history


def tensorboard_scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` as TensorBoard shows it (its own reader, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def assert_history_matches(history: dict[int, dict], rows: dict[int, dict]) -> None:
    train_steps = sorted(step for step, item in history.items() if "loss" in item)
    assert train_steps == sorted(rows), (train_steps, sorted(rows))
    for step, row in rows.items():
        for key in ("loss", "grad_norm", "epoch", "lr"):
            assert history[step][key] == pytest.approx(row[key], rel=1e-9, abs=1e-12), (step, key)


def test_wandb_and_tensorboard_track_a_run_and_continue_it_on_resume(dist, vitacore_cache, tmp_path, wandb_env):
    out = tmp_path / "run"
    assert run_demo(out, "--report_to", "wandb,tensorboard", "--run_name", "t1", "--max_steps", "10") == 0
    first_rows = metrics_rows(out)
    assert sorted(first_rows) == [2, 4, 6, 8, 10]
    run_id = (out / RUN_ID_FILE).read_text().strip()
    assert len(run_id) == 8

    run, history = offline_run(wandb_env, run_id, 0)
    assert run["run_id"] == run_id and run["display_name"] == "t1" and run["project"] == "vitacore"
    assert run["config"]["update"]["loop"]["max_steps"] == 10  # the run's settings in wandb's config
    assert_history_matches(history, first_rows)
    assert "eval_loss" in history[10] and "eval_accuracy" in history[10]  # the final eval row, at its step
    assert all(not isinstance(v, str) for item in history.values() for v in item.values())  # "event" rows skipped
    loss = tensorboard_scalars(str(out / "runs"), "loss")
    assert [step for step, _ in loss] == [2, 4, 6, 8, 10]
    assert [value for _, value in loss] == pytest.approx([first_rows[s]["loss"] for s in (2, 4, 6, 8, 10)])

    # A crash after step 10 was logged but before checkpoint-10 was complete: the rerun resumes from
    # checkpoint-5 and logs steps 6, 8 and 10 again.
    shutil.rmtree(out / "checkpoint-10")
    assert run_demo(out, "--report_to", "wandb,tensorboard", "--run_name", "t1", "--max_steps", "20",
                    "--allow_resume_changes", "max_steps") == 0  # a longer run, allowed by name
    assert (out / RUN_ID_FILE).read_text().strip() == run_id
    resumed_run, resumed_history = offline_run(wandb_env, run_id, 1)
    assert resumed_run["run_id"] == run_id and resumed_run["resume"] is True
    every_row = metrics_rows(out)  # the last row per step: the resumed run's from step 6 on
    assert_history_matches(resumed_history, {step: row for step, row in every_row.items() if step > 5})

    loss = tensorboard_scalars(str(out / "runs"), "loss")
    steps = [step for step, _ in loss]
    assert steps == list(range(2, 21, 2)), steps  # no step twice: the rerun's start purged the stale 6, 8, 10
    assert [value for _, value in loss] == pytest.approx([every_row[s]["loss"] for s in steps])
    assert len(glob.glob(str(out / "runs" / "events.out.tfevents.*"))) == 2  # one folder, one file per start


def test_report_to_wandb_without_the_package_fails_before_training(dist, vitacore_cache, tmp_path, monkeypatch,
                                                                    capsys, wandb_env):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module that cannot be imported
    out = tmp_path / "run"
    assert run_demo(out, "--report_to", "wandb", "--max_steps", "2") == 2
    err = capsys.readouterr().err
    assert "--report_to wandb: the wandb package is not installed; pip install wandb, or drop it" in err
    assert not os.path.exists(out / "metrics.jsonl") and not glob.glob(str(out / "checkpoint-*"))
    with pytest.raises(ValueError, match="--report_to tensorboard,wandb: the wandb package is not installed"):
        Trackers.create("tensorboard,wandb", None, str(tmp_path), is_main=False, resumed=False, notes=[])
    notes: list = []  # "all" takes what is installed and says what it left out
    assert resolve_report_to("all", notes) == ["tensorboard"] and "wandb is not installed" in notes[0]


def test_report_to_none_creates_nothing(dist, vitacore_cache, tmp_path, wandb_env):
    out = tmp_path / "run"
    assert run_demo(out, "--report_to", "none", "--max_steps", "2") == 0
    assert metrics_rows(out)  # the run did log
    assert not os.path.exists(out / "runs") and not os.path.exists(out / RUN_ID_FILE)
    assert os.listdir(wandb_env) == []


def test_only_the_main_rank_tracks_and_it_never_imports_wandb(tmp_path, monkeypatch, wandb_env):
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    trackers = Trackers.create("wandb,tensorboard", "t", str(out), is_main=False, resumed=False, notes=[])
    trackers.write({"step": 1, "loss": 0.5})
    trackers.close()
    assert trackers.trackers == [] and "wandb" not in sys.modules
    assert os.listdir(out) == [] and os.listdir(wandb_env) == []


def test_scalars_flatten_group_lrs_and_skip_what_is_not_a_number():
    row = {"step": 4, "epoch": 0.5, "loss": 0.25, "lr": {"llm": 1e-5, "mm_projector": 1e-3}, "grad_norm": None,
           "event": "checkpoint", "bad_samples": 0, "flag": True}
    assert scalars(row) == {"epoch": 0.5, "loss": 0.25, "lr/llm": 1e-5, "lr/mm_projector": 1e-3, "bad_samples": 0}


def test_unknown_tracker_names_the_flag():
    with pytest.raises(ValueError, match="--report_to mlflow: mlflow is not one of: tensorboard, wandb, all, none"):
        resolve_report_to("mlflow")
    assert resolve_report_to("none") == [] and resolve_report_to("none,tensorboard") == ["tensorboard"]
