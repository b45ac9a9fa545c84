"""Kill a run, re-run the same command: the remaining losses equal an uninterrupted run's.

Real processes, real DeepSpeed checkpoints, dropout on (the LLM is a copy of the embedded default
with ``attention_dropout`` 0.1), gradient accumulation 2 and three param groups (stage 3).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")
KILL_DRIVER = os.path.join(REPO, "tests", "checkpoint", "kill_driver.py")
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

from test_distributed import env_for, torchrun  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dropout_llm(vitacore_cache, tmp_path_factory):
    """The embedded default LLM with attention dropout on, so resuming must restore the RNG."""
    from vitacore.demo.embedded import ensure_default_assets

    assets = ensure_default_assets()
    path = str(tmp_path_factory.mktemp("dropout_llm") / "llm")
    shutil.copytree(assets.llm, path)
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    config["attention_dropout"] = 0.1
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    return path


def flags(llm, output_dir, max_steps, save_steps):
    from vitacore.demo.embedded import ensure_default_assets

    assets = ensure_default_assets()  # a run with its own LLM takes no part it is not given
    return ["--stage", "3", "--model_name_or_path", llm, "--vision_tower", assets.vision_tower,
            "--audio_encoder", assets.audio_encoder, "--output_dir", str(output_dir), "--max_steps",
            str(max_steps), "--save_steps", str(save_steps), "--logging_steps", "1", "--learning_rate", "1e-4",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--model_max_length", "512",
            "--eval_data_path", os.path.join(REPO, "tests", "checkpoint", "small_eval.json")]


def losses(output_dir) -> dict:
    """Loss per step, the last row for a step winning (a resumed run may repeat a step)."""
    by_step = {}
    for line in open(os.path.join(output_dir, "metrics.jsonl")):
        row = json.loads(line)
        if "loss" in row:
            by_step[row["step"]] = row["loss"]
    return by_step


def run_to_end(cmd, cache):
    result = subprocess.run(cmd, capture_output=True, text=True, env=env_for(cache), timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def kill_at(cmd, cache, output_dir, step):
    """Start ``cmd``; SIGKILL its whole process group once ``step`` is logged."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env_for(cache), cwd=REPO,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(output_dir, "metrics.jsonl")) and max(losses(output_dir), default=0) >= step:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)
    raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-3000:]}")


def assert_resumed_like_uninterrupted(reference, resumed, tolerance, note):
    assert sorted(resumed) == sorted(reference), note
    worst = max(abs(resumed[step] - reference[step]) for step in reference)
    print(f"{note}: {len(reference)} steps, max |loss difference| after resuming {worst:.3g}")
    for step in sorted(reference):
        assert abs(resumed[step] - reference[step]) <= tolerance, (note, step, resumed[step], reference[step])


STEPS, EVERY = 16, 4  # the one-process runs: 16 optimizer steps, a checkpoint every 4


@pytest.fixture(scope="module")
def reference(vitacore_cache, dropout_llm, tmp_path_factory):
    """Losses of the uninterrupted one-process run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_to_end([sys.executable, SCRIPT, *flags(dropout_llm, out, STEPS, EVERY)], vitacore_cache)
    return losses(out)


def test_kill_minus_nine_then_rerun_is_bitwise_identical(vitacore_cache, dropout_llm, reference, tmp_path):
    steps, every = STEPS, EVERY
    killed_dir = tmp_path / "killed"
    kill_step = random.Random().randint(2 * every + 1, steps - 2)  # after the second checkpoint
    cmd = [sys.executable, SCRIPT, *flags(dropout_llm, killed_dir, steps, every)]
    kill_at(cmd, vitacore_cache, killed_dir, kill_step)
    result = run_to_end(cmd, vitacore_cache)
    assert "resumed from" in result.stdout + result.stderr
    resumed = losses(killed_dir)
    assert_resumed_like_uninterrupted(reference, resumed, 0.0, f"killed at step {kill_step}")
    # The dropout really made a difference, so matching it proves the RNG was restored.
    assert len(set(reference.values())) == len(reference)


def test_killed_between_writing_and_renaming_publishes_the_complete_checkpoint(vitacore_cache, dropout_llm,
                                                                              reference, tmp_path):
    """Killed after checkpoint-8's files and marker are written, before its rename: the next start
    verifies the complete tmp-checkpoint-8, publishes it and resumes from it."""
    killed_dir = tmp_path / "killed"
    args = flags(dropout_llm, killed_dir, STEPS, EVERY)
    proc = subprocess.run([sys.executable, KILL_DRIVER, "8", *args], capture_output=True, text=True,
                          env=env_for(vitacore_cache), timeout=900, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    left = sorted(os.listdir(killed_dir))
    assert "checkpoint-4" in left and "checkpoint-8" not in left and "tmp-checkpoint-8" in left, left
    result = run_to_end([sys.executable, SCRIPT, *args], vitacore_cache)
    assert "published it as checkpoint-8" in result.stdout + result.stderr
    assert "resumed from " + str(killed_dir / "checkpoint-8") in result.stdout + result.stderr
    assert "tmp-checkpoint-8" not in os.listdir(killed_dir)
    assert_resumed_like_uninterrupted(reference, losses(killed_dir), 0.0, "killed while saving step 8")


def test_two_process_zero3_resume_matches_within_1e_6(vitacore_cache, dropout_llm, tmp_path):
    """The resumed half runs with --zero3_frozen_parts partitioned (the frozen audio parts partitioned, not
    whole as before the kill): the checkpoint does not depend on it, and the losses still match."""
    steps, every = 10, 3
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    zero3 = ["--deepspeed", os.path.join(REPO, "configs", "zero3.json")]
    run_to_end(torchrun(2, SCRIPT, *flags(dropout_llm, reference_dir, steps, every), *zero3), vitacore_cache)
    kill_step = random.Random().randint(2 * every + 1, steps - 2)
    kill_at(torchrun(2, SCRIPT, *flags(dropout_llm, killed_dir, steps, every), *zero3), vitacore_cache,
            killed_dir, kill_step)
    result = run_to_end(torchrun(2, SCRIPT, *flags(dropout_llm, killed_dir, steps, every), *zero3,
                                 "--zero3_frozen_parts", "partitioned"), vitacore_cache)
    assert "resumed from" in result.stdout + result.stderr
    assert "--zero3_frozen_parts: 'whole' -> 'partitioned'" in result.stdout + result.stderr
    assert_resumed_like_uninterrupted(losses(reference_dir), losses(killed_dir), 1e-6, f"killed at step {kill_step}")
    # DeepSpeed's zero_to_fp32.py, copied into the checkpoint, joins the two ranks' partitions.
    checkpoint = killed_dir / f"checkpoint-{steps}"
    consolidated = tmp_path / "fp32"
    # The LLM ties lm_head to the embeddings, which the script's --safe_serialization refuses; use .bin.
    subprocess.run([sys.executable, str(checkpoint / "zero_to_fp32.py"), str(checkpoint), str(consolidated),
                    "-t", "state"], check=True, capture_output=True, env=env_for(vitacore_cache))
    weights = {}
    for name in os.listdir(consolidated):
        if name.endswith(".bin"):
            weights.update(torch.load(consolidated / name, weights_only=False))
    projector = torch.load(checkpoint / "mm_projector.bin", weights_only=True)
    for key, value in projector.items():
        assert torch.equal(weights[key[len("model."):]], value), key
    assert any(k.startswith("llm.") for k in weights) and any(k.startswith("vision_tower.") for k in weights)


def test_lora_run_resumes_bitwise(vitacore_cache, dropout_llm, tmp_path):
    """LoRA (dropout 0.1 on the adapters) on the LLM, with the projector and tower trained in full."""
    steps, every = 12, 4
    lora = ["--lora_enable", "True", "--lora_r", "8", "--lora_dropout", "0.1"]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    run_to_end([sys.executable, SCRIPT, *flags(dropout_llm, reference_dir, steps, every), *lora], vitacore_cache)
    kill_step = random.Random().randint(2 * every + 1, steps - 1)
    cmd = [sys.executable, SCRIPT, *flags(dropout_llm, killed_dir, steps, every), *lora]
    kill_at(cmd, vitacore_cache, killed_dir, kill_step)
    result = run_to_end(cmd, vitacore_cache)
    assert "resumed from" in result.stdout + result.stderr
    assert_resumed_like_uninterrupted(losses(reference_dir), losses(killed_dir), 0.0, f"killed at step {kill_step}")
    for artifact in ("adapter_model.safetensors", "non_lora_trainables.bin"):
        assert (killed_dir / artifact).exists() and (killed_dir / f"checkpoint-{steps}" / artifact).exists()
