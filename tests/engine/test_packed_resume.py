"""End to end: a packed run (``--packing True``) on the demo's stage-4 data resumes bitwise."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
from safetensors.torch import load_file

from vitacore.recipes.stage import recipe_main

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_parts(vitacore_cache):
    from vitacore.demo import ensure_default_assets

    return ensure_default_assets()


def _rows(output_dir) -> dict[int, dict]:
    """The training row of each step, the last one for a step winning (a resumed run may repeat one)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, fh) if "loss" in row}


def _weights(output_dir) -> dict:
    """Every tensor of the run's final export (the LLM and the projector it trained)."""
    tensors = {}
    for folder, _, files in os.walk(output_dir):
        if os.path.basename(folder).startswith("checkpoint-"):
            continue
        for name in sorted(files):
            if name.endswith(".safetensors"):
                path = os.path.join(folder, name)
                tensors.update({f"{os.path.relpath(path, output_dir)}:{key}": value
                                for key, value in load_file(path).items()})
    return tensors


def test_a_packed_run_stopped_and_resumed_matches_an_uninterrupted_one_bitwise(demo_parts, dist, tmp_path,
                                                                               monkeypatch):
    """Setup: stage 4 on the demo data (images, video, audio, text) with --packing True, 1 pack a micro-batch,
    accumulation 2, 4 steps, a checkpoint every 2; once straight through, once stopped at step 2 (its
    checkpoint-4 removed) and re-run. Expect: the resumed run's losses and gradient norms at steps 3-4 and
    its final weights equal the uninterrupted run's bitwise."""
    monkeypatch.chdir(tmp_path)  # no earlier demo stage's output is picked up
    common = ["--stage", "4", "--packing", "True", "--per_device_train_batch_size", "1",
              "--gradient_accumulation_steps", "2", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
              "--plot_loss", "False", "--eval_strategy", "no", "--save_total_limit", "3",
              "--eval_data_path", os.path.join(TESTS, "checkpoint", "small_eval.json")]  # a 2-sample final evaluation
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert recipe_main([*common, "--output_dir", straight]) == 0
    assert recipe_main([*common, "--output_dir", resumed]) == 0
    shutil.rmtree(os.path.join(resumed, "checkpoint-4"))
    assert recipe_main([*common, "--output_dir", resumed]) == 0

    expected, got = _rows(straight), _rows(resumed)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):
        assert (got[step]["loss"], got[step]["grad_norm"]) == (expected[step]["loss"], expected[step]["grad_norm"])
    with open(os.path.join(resumed, "metrics.jsonl")) as fh:
        assert any(row.get("event") == "resumed" for row in map(json.loads, fh))
    before, after = _weights(straight), _weights(resumed)
    assert before and sorted(before) == sorted(after)
    assert all(before[key].equal(after[key]) for key in before)


def test_a_packed_lora_run_trains_the_adapters(demo_parts, dist, tmp_path, monkeypatch):
    """Setup: stage 4 on the demo data with --packing True and --lora_enable True (rank 8), 3 steps, 1 pack a
    micro-batch. Expect: finite losses on every step, and PEFT's adapter_model.safetensors holds LoRA weights
    of which the B matrices (zeros at the start) are no longer all zero."""
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "lora")
    assert recipe_main(["--stage", "4", "--packing", "True", "--lora_enable", "True", "--lora_r", "8",
                        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
                        "--max_steps", "3", "--logging_steps", "1", "--plot_loss", "False", "--eval_strategy",
                        "no", "--save_strategy", "no", "--learning_rate", "1e-3", "--output_dir", out,
                        "--eval_data_path", os.path.join(TESTS, "checkpoint", "small_eval.json")]) == 0
    rows = _rows(out)
    assert sorted(rows) == [1, 2, 3] and all(math.isfinite(float(row["loss"])) for row in rows.values())
    adapters = load_file(os.path.join(out, "adapter_model.safetensors"))
    lora_b = [value for name, value in adapters.items() if "lora_B" in name]
    assert lora_b and any(bool(value.abs().sum() > 0) for value in lora_b)
