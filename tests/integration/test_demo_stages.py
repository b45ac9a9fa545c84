"""The embedded demo chained over stages 1 -> 2 -> 3: each picks up earlier adapters and learns."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")


@pytest.mark.slow
def test_stages_chain_and_learn(vitacore_cache, tmp_path):
    env = dict(os.environ, VITACORE_CACHE=vitacore_cache)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    outputs = {}
    for stage in ("1", "2", "3"):
        result = subprocess.run([sys.executable, SCRIPT, "--stage", stage], capture_output=True, text=True,
                                env=env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[stage] = result.stdout
        rows = [json.loads(line) for line in open(tmp_path / "output" / f"demo-stage-{stage}" / "metrics.jsonl")]
        assert rows[-1]["eval_accuracy"] >= 0.9, (stage, rows[-1])
    assert (tmp_path / "output" / "demo-stage-2" / "audio_adpter.bin").exists()
    # Stage 3 started from stage 1's projector (picked up from the demo output, and said so).
    assert "stage 1 demo output: pretrain_mm_mlp_adapter='output/demo-stage-1/mm_projector.bin'" in outputs["3"]
