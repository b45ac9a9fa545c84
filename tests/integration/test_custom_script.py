"""End to end: ``examples/custom_script.py`` trains its own model's head on vitacore's engine,
in one process and in two processes under ZeRO-3."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "custom_script.py")
SEED, STEPS = 7, 60
LAUNCHES = {
    "single": [sys.executable, SCRIPT],
    "zero3": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", SCRIPT,
              "--deepspeed", os.path.join(REPO, "configs", "zero3.json")],
}


def load_script():
    """The script as a module, to rebuild its model's initial weights independently of the run."""
    spec = importlib.util.spec_from_file_location("custom_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=sorted(LAUNCHES))
def run(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(request.param))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([*LAUNCHES[request.param], "--output_dir", out, "--max_steps", str(STEPS),
                             "--seed", str(SEED)], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)  # a hung collective fails the test instead of blocking it
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {"name": request.param, "out": out, "stdout": result.stdout, "rows": rows}


@pytest.mark.slow
def test_runs_all_steps_and_the_loss_falls(run):
    train = [r for r in run["rows"] if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert f"{STEPS} steps on {1 if run['name'] == 'single' else 2} process(es)" in run["stdout"]


@pytest.mark.slow
def test_frozen_encoder_did_not_change(run):
    script = load_script()
    initial = script.digest(script.build_model(SEED).encoder)
    with open(os.path.join(run["out"], "frozen_encoder.json")) as fh:
        recorded = json.load(fh)
    assert recorded == {"before": initial, "after": initial}


@pytest.mark.slow
def test_saved_head_is_full_trained_and_better(run):
    script = load_script()
    model = script.build_model(SEED)
    initial = {f"head.{k}": v.clone() for k, v in model.head.state_dict().items()}
    saved = torch.load(os.path.join(run["out"], "head.bin"), map_location="cpu", weights_only=True)
    assert sorted(saved) == ["head.bias", "head.weight"]
    # Full gathered shapes (a rank-local ZeRO-3 partition would be 0-element), new values.
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in initial.items()}
    assert all(not torch.equal(saved[k], initial[k]) for k in initial)
    # The saved head, put on the untouched initial encoder, classifies the training data better.
    data = script.points(1024, SEED)
    batch = script.collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        before = float(model(**batch)["loss"])
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in saved.items()})
        after = float(model(**batch)["loss"])
    assert after < 0.8 * before, (before, after)
