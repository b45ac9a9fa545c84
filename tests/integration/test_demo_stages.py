"""``--stage all``: the embedded demo chained 1 -> 2 -> 3 -> 4, each stage from the previous artifacts."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")


@pytest.mark.slow
def test_stage_all_chains_four_stages_that_each_learn(vitacore_cache, tmp_path):
    env = dict(os.environ, VITACORE_CACHE=vitacore_cache)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, SCRIPT, "--stage", "all"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "output"
    for stage in ("1", "2", "3", "4"):
        rows = [json.loads(line) for line in open(out / f"demo-stage-{stage}" / "metrics.jsonl")]
        evals = [r for r in rows if "eval_accuracy" in r]
        assert evals and evals[-1] is rows[-1] and rows[-1]["eval_accuracy"] >= 0.9, (stage, rows[-1])
    assert (out / "demo-stage-1" / "mm_projector.bin").exists()
    assert (out / "demo-stage-2" / "audio_adpter.bin").exists()
    for stage in ("3", "4"):  # the LLM trained: a full export
        assert (out / f"demo-stage-{stage}" / "config.json").exists()
        assert (out / f"demo-stage-{stage}" / "model.safetensors").exists()
    # Each stage started from the earlier ones, and said so.
    assert "stage 1 demo output: pretrain_mm_mlp_adapter='output/demo-stage-1/mm_projector.bin'" in result.stdout
    assert "stage 2 demo output: pretrain_audio_mlp_adapter='output/demo-stage-2/audio_adpter.bin'" in result.stdout
    assert "stage 3 demo output: model_name_or_path='output/demo-stage-3'" in result.stdout

    # The last export's LLM part loads with plain transformers.
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(out / "demo-stage-4")
    assert llm.config.model_type == "qwen2" and llm.config.mm_projector_type == "mlp2x_gelu"
