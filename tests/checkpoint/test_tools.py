"""Checkpoint contents and the offline tools: zero_to_fp32.py, ``export``, rotation, size, refusals."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")
sys.path.insert(0, os.path.join(REPO, "tests", "integration"))

from test_distributed import env_for  # noqa: E402

pytestmark = pytest.mark.slow


def train(cache, output_dir, *flags, expect=0):
    cmd = [sys.executable, SCRIPT, "--output_dir", str(output_dir), "--logging_steps", "1",
           "--eval_data_path", os.path.join(REPO, "tests", "checkpoint", "small_eval.json"), *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env_for(cache), timeout=600, cwd=REPO)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def zero2_run(vitacore_cache, tmp_path_factory):
    """Stage 1 under ZeRO-2 in one process: 6 steps, a checkpoint every 2, at most 2 kept."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    train(vitacore_cache, out, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "2",
          "--deepspeed", os.path.join(REPO, "configs", "zero2.json"))
    return out


def test_rotation_keeps_the_newest_complete_checkpoints(zero2_run):
    names = sorted(n for n in os.listdir(zero2_run) if "checkpoint" in n)
    assert names == ["checkpoint-4", "checkpoint-6"], names
    state = json.load(open(zero2_run / "checkpoint-6" / "vitacore_state.json"))
    assert state["position"]["step"] == 6 and state["identity"]["world_size"] == 1
    assert set(state["identity"]["trainable"]) == {f"mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert {"torch", "deepspeed", "transformers", "vitacore"} <= set(state["versions"])


def test_stage1_checkpoint_is_small(zero2_run):
    checkpoint = zero2_run / "checkpoint-6"
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file() and f.suffix != ".py")
    trainable = sum(t.numel() for t in torch.load(checkpoint / "mm_projector.bin", weights_only=True).values())
    assert size <= 1.2 * trainable * 12 + 2**20, (size, trainable)


def test_deepspeeds_zero_to_fp32_consolidates_the_checkpoint(zero2_run, tmp_path, vitacore_cache):
    checkpoint = zero2_run / "checkpoint-6"
    script = checkpoint / "zero_to_fp32.py"
    assert script.exists()
    result = subprocess.run([sys.executable, str(script), str(checkpoint), str(tmp_path / "fp32"), "-t", "state",
                             "--safe_serialization"], capture_output=True, text=True,
                            env=env_for(vitacore_cache), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    consolidated = load_file(tmp_path / "fp32" / "model.safetensors")
    projector = torch.load(checkpoint / "mm_projector.bin", weights_only=True)
    assert set(consolidated) == {k[len("model."):] for k in projector}
    for key, value in projector.items():
        assert torch.equal(consolidated[key[len("model."):]], value), key


def test_export_tool_writes_a_full_export_with_the_trained_projector(zero2_run, tmp_path, vitacore_cache):
    from vitacore.checkpoint.export import load_full_export
    from vitacore.demo.embedded import ensure_default_assets

    checkpoint, out = zero2_run / "checkpoint-6", tmp_path / "export"
    result = subprocess.run([sys.executable, "-m", "vitacore.checkpoint", "export", str(checkpoint), str(out),
                             "--dtype", "float32"], capture_output=True, text=True, env=env_for(vitacore_cache),
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            weights.update(load_file(out / name))
    for key, value in torch.load(checkpoint / "mm_projector.bin", weights_only=True).items():
        assert torch.equal(weights[key], value), key
    base_llm = load_file(os.path.join(ensure_default_assets().llm, "model.safetensors"))
    for key, value in base_llm.items():
        if key in weights:
            assert torch.equal(weights[key], value), key
    model = load_full_export(str(out)).model
    assert torch.equal(model.mm_projector[0].weight, weights["model.mm_projector.0.weight"])


def test_resume_false_refuses_an_output_dir_with_checkpoints(zero2_run, vitacore_cache):
    before = sorted(os.listdir(zero2_run))
    result = train(vitacore_cache, zero2_run, "--max_steps", "8", "--resume_from_checkpoint", "False", expect=2)
    assert "--resume_from_checkpoint False" in result.stderr and "already holds 2 checkpoint(s)" in result.stderr
    assert sorted(os.listdir(zero2_run)) == before


def test_a_checkpoint_from_another_run_is_refused(zero2_run, vitacore_cache, tmp_path):
    # Same folder, but stage 2 trains the audio adapter instead of the projector.
    result = train(vitacore_cache, zero2_run, "--stage", "2", "--max_steps", "8",
                   "--resume_from_checkpoint", str(zero2_run / "checkpoint-6"), expect=2)
    assert "is from a different run" in result.stderr and "this run trains" in result.stderr, result.stderr[-2000:]


def test_export_refuses_an_incomplete_folder(tmp_path, vitacore_cache):
    (tmp_path / "checkpoint-3").mkdir()
    result = subprocess.run([sys.executable, "-m", "vitacore.checkpoint", "export", str(tmp_path / "checkpoint-3"),
                             str(tmp_path / "out")], capture_output=True, text=True, env=env_for(vitacore_cache),
                            timeout=120, cwd=REPO)
    assert result.returncode == 2 and "not a complete checkpoint" in result.stderr
