"""End to end: a resume with a changed --learning_rate is refused with the difference; two spellings
of the LLM's folder (``./llm``, ``/abs/llm``) resume."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from vitacore.recipes.stage import recipe_main


@pytest.fixture(scope="module")
def demo_parts(vitacore_cache):
    from vitacore.demo import ensure_default_assets

    return ensure_default_assets()


def _steps(output_dir) -> list[int]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [row["step"] for row in map(json.loads, fh) if "loss" in row]


def test_changed_learning_rate_refused_and_two_spellings_of_the_llm_resume(demo_parts, dist, tmp_path, monkeypatch,
                                                                            capsys):
    """Setup: stage 2 from ``--model_name_or_path ./llm`` for 2 steps (checkpoint at 2); then the same
    run with ``/abs/llm`` and ``--learning_rate`` changed; then with the learning rate back.
    Expect: the second start is refused (exit 2) naming ``--learning_rate`` with both values and
    nothing is trained; the third resumes at step 2 and trains step 3."""
    shutil.copytree(demo_parts.llm, tmp_path / "llm")
    monkeypatch.chdir(tmp_path)
    common = ["--stage", "2", "--vision_tower", demo_parts.vision_tower, "--audio_encoder", demo_parts.audio_encoder,
              "--output_dir", "out", "--save_steps", "2", "--logging_steps", "1", "--plot_loss", "False"]
    assert recipe_main([*common, "--model_name_or_path", "./llm", "--max_steps", "2"]) == 0
    assert _steps("out") == [1, 2]
    capsys.readouterr()

    absolute = str(tmp_path / "llm")
    code = recipe_main([*common, "--model_name_or_path", absolute, "--max_steps", "3", "--learning_rate", "3e-3",
                        "--allow_resume_changes", "max_steps"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--learning_rate:" in err and "0.003" in err and "--allow_resume_changes" in err, err
    assert "--model_name_or_path" not in err, err  # the same folder, spelt differently
    assert _steps("out") == [1, 2]

    assert recipe_main([*common, "--model_name_or_path", absolute, "--max_steps", "3",
                        "--allow_resume_changes", "max_steps"]) == 0
    assert _steps("out") == [1, 2, 3]


def _lrs(output_dir) -> dict[int, object]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return {row["step"]: row["lr"] for row in map(json.loads, fh) if "loss" in row}


def test_an_allowed_learning_rate_change_takes_effect_from_the_resumed_step(demo_parts, dist, tmp_path):
    """Setup: stage 1 for 2 steps at --learning_rate 1e-3 (linear decay over 4 steps), then resumed with
    --learning_rate 4e-3 allowed by --allow_resume_changes. Expect: steps 3 and 4 log the learning
    rates of a fresh 4-step run at 4e-3 (not the checkpoint's 1e-3 schedule)."""
    common = ["--stage", "1", "--max_steps", "4", "--logging_steps", "1", "--plot_loss", "False", "--save_total_limit",
              "3", "--lr_scheduler_type", "linear", "--warmup_ratio", "0"]
    resumed, fresh = str(tmp_path / "resumed"), str(tmp_path / "fresh")
    assert recipe_main([*common, "--output_dir", resumed, "--learning_rate", "1e-3", "--save_steps", "2"]) == 0
    shutil.rmtree(os.path.join(resumed, "checkpoint-4"))
    assert recipe_main([*common, "--output_dir", resumed, "--learning_rate", "4e-3",
                        "--allow_resume_changes", "learning_rate"]) == 0
    assert recipe_main([*common, "--output_dir", fresh, "--learning_rate", "4e-3"]) == 0
    got, expected = _lrs(resumed), _lrs(fresh)
    assert [got[3], got[4]] == pytest.approx([expected[3], expected[4]], rel=1e-9), (got, expected)
    assert got[2] != pytest.approx(expected[2])  # the first run's own rate before the resume
