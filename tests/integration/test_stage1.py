"""End to end: ``python examples/train_stage.py`` trains stage 1 of the embedded default."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")


def run_script(args, cache, timeout=900):
    env = dict(os.environ, VITACORE_CACHE=cache, PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def demo_run(vitacore_cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    result = run_script(["--output_dir", out], vitacore_cache)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return out, result, rows


@pytest.mark.slow
def test_demo_loss_falls_by_a_third(demo_run):
    _, _, rows = demo_run
    train = [r for r in rows if "loss" in r]
    assert len(train) >= 30
    third = len(train) // 3
    first = sum(r["loss"] for r in train[:third]) / third
    last = sum(r["loss"] for r in train[-third:]) / third
    assert last <= 0.7 * first, (first, last)
    assert all(r["grad_norm"] is not None and r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 for r in train)
    assert [r["step"] for r in train] == sorted(r["step"] for r in train)


@pytest.mark.slow
def test_demo_final_eval_reads_the_images(demo_run):
    _, _, rows = demo_run
    final = rows[-1]
    assert "eval_loss" in final and "eval_accuracy" in final
    assert final["eval_accuracy"] >= 0.9, final
    assert final["eval_samples"] == 120


@pytest.mark.slow
def test_demo_projector_file_loads_with_vitas_rule(demo_run):
    out, result, _ = demo_run
    weights = torch.load(os.path.join(out, "mm_projector.bin"), map_location="cpu", weights_only=True)
    assert sorted(weights) == sorted(["model.mm_projector.0.weight", "model.mm_projector.0.bias",
                                      "model.mm_projector.2.weight", "model.mm_projector.2.bias"])
    # VITA: keep keys containing mm_projector, strip through "mm_projector.", load strictly.
    state = {k.split("mm_projector.")[1]: v for k, v in weights.items() if "mm_projector" in k}
    out_features, in_features = state["0.weight"].shape
    projector = nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))
    projector.load_state_dict(state, strict=True)
    assert "mm_projector.bin" in result.stdout and "loss" in result.stdout


@pytest.mark.slow
def test_demo_prints_report_and_summary(demo_run):
    _, result, _ = demo_run
    assert "mm_projector" in result.stdout and "trainable" in result.stdout
    assert "done: 600 steps" in result.stdout
    assert "eval:" in result.stdout


@pytest.mark.slow
def test_dry_run_writes_report_json(vitacore_cache, tmp_path):
    report_path = tmp_path / "report.json"
    result = run_script(["--dry_run", "--report_json", str(report_path), "--output_dir", str(tmp_path / "o")],
                        vitacore_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert set(report) == {"units", "trainable_names", "param_groups"}
    assert report["trainable_names"] and all(n.startswith("mm_projector.") for n in report["trainable_names"])
    assert report["units"]["llm"]["trainable"] == 0 and report["units"]["llm"]["total"] > 0
    assert report["units"]["mm_projector"]["trainable"] == report["units"]["mm_projector"]["total"]
    assert sum(g["num_params"] for g in report["param_groups"]) == report["units"]["mm_projector"]["trainable"]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_projector_file_with_wrong_shape_is_refused(vitacore_cache, tmp_path):
    bad = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(7, 5), "model.mm_projector.0.bias": torch.zeros(7),
                "model.mm_projector.2.weight": torch.zeros(7, 7), "model.mm_projector.2.bias": torch.zeros(7)}, bad)
    result = run_script(["--dry_run", "--pretrain_mm_mlp_adapter", str(bad)], vitacore_cache)
    assert result.returncode == 2
    assert "--pretrain_mm_mlp_adapter" in result.stderr and "(7, 5)" in result.stderr


@pytest.mark.slow
def test_misspelt_flag_gets_a_suggestion(vitacore_cache):
    result = run_script(["--learnig_rate", "1e-3"], vitacore_cache, timeout=120)
    assert result.returncode == 2
    assert "--learning_rate" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_unknown_stage_lists_known_ones(vitacore_cache):
    result = run_script(["--stage", "nine"], vitacore_cache, timeout=120)
    assert result.returncode == 2
    assert "--stage" in result.stderr and "pretrain_mlp" in result.stderr


@pytest.mark.slow
def test_yaml_config_and_flags_combine(vitacore_cache, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("training:\n  learning_rate: 1.0e-3\n  max_steps: 3\n  logging_steps: 1\n")
    out = tmp_path / "o"
    result = run_script(["--config", str(config), "--max_steps", "2", "--output_dir", str(out)], vitacore_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]  # the flag overrode the YAML's max_steps
