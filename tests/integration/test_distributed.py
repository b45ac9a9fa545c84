"""Several processes on CPU: ZeRO-2/3 against one process, partitioning, mixed modalities, clean
stops, two node agents, and the deepspeed launcher. Each test spawns real processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from launch import env_for, free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")
DRIVER = os.path.join(REPO, "tests", "integration", "dist_driver.py")
pytestmark = pytest.mark.slow


def torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def run(cmd, cache, timeout=600):
    result = subprocess.run(cmd, capture_output=True, text=True, env=env_for(cache), timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def driver_run(cache, tmp_path, nproc, *flags):
    out = str(tmp_path / f"dump{nproc}")
    common = ["--max_steps", "5", "--logging_steps", "1", "--output_dir", str(tmp_path / f"o{nproc}"), *flags]
    cmd = ([sys.executable, DRIVER] if nproc == 1 else torchrun(nproc, DRIVER)) + [out, *common]
    run(cmd, cache)
    return [json.load(open(f"{out}.rank{rank}")) for rank in range(nproc)]


@pytest.fixture(scope="module")
def reference(vitacore_cache, tmp_path_factory):
    """One-process losses (built-in ZeRO-0, micro-batch 8) per stage, computed once."""
    cache = {}

    def losses(stage):
        if stage not in cache:
            dumps = driver_run(vitacore_cache, tmp_path_factory.mktemp(f"ref{stage}"), 1, "--stage", stage,
                               "--per_device_train_batch_size", "8")
            cache[stage] = dumps[0]["losses"]
        return cache[stage]

    return losses


def test_packed_rows_under_zero3_on_two_processes_match_one_process(vitacore_cache, tmp_path):
    """Setup: stage 4 on the demo data with --packing True and VITA's grouped order; one process with 2 packs a
    micro-batch against 2 processes under ZeRO-3 with 1 pack each (the same packs per step, dealt to the ranks).
    Expect: the same losses as the one-process run (step 1 within 1e-6, later steps within 0.1%), on both ranks,
    with the frozen tower and audio parts held out of ZeRO-3 (whole on every rank)."""
    packed = ["--stage", "4", "--packing", "True", "--group_by_modality_length", "True"]
    one = driver_run(vitacore_cache, tmp_path, 1, *packed, "--per_device_train_batch_size", "2")[0]
    assert one["sampler"] == "PackSampler"
    one = one["losses"]
    two = driver_run(vitacore_cache, tmp_path, 2, *packed, "--per_device_train_batch_size", "1",
                     "--deepspeed", os.path.join(REPO, "configs", "zero3.json"))
    got = two[0]["losses"]
    assert two[0]["sampler"] == "PackSampler" and len(one) == 5 and got == two[1]["losses"]
    # Stage 4 freezes the tower (built partitioned, made whole again): held out of ZeRO-3 with the audio parts.
    assert {"vision_tower", "audio_encoder"} <= set(two[0]["held_out"]) and "llm" not in two[0]["held_out"]
    assert abs(got[0] - one[0]) < 1e-6, (got, one)
    for step, (value, want) in enumerate(zip(got, one), start=1):
        assert abs(value - want) < 1e-3 * want, (step, got, one)


@pytest.mark.parametrize("stage", ["1", "3"])
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_match_one_with_the_same_global_batch(vitacore_cache, tmp_path, reference, stage, zero):
    """Under ZeRO-3, stage 1 runs with --zero3_frozen_parts partitioned (every parameter partitioned) and stage 3
    with the default (frozen encoders and adapters whole on every rank, everything else partitioned)."""
    frozen_parts = "partitioned" if stage == "1" else "whole"
    dumps = driver_run(vitacore_cache, tmp_path, 2, "--stage", stage, "--per_device_train_batch_size", "4",
                       "--deepspeed", os.path.join(REPO, "configs", f"{zero}.json"),
                       "--zero3_frozen_parts", frozen_parts)
    expected = reference(stage)
    got = dumps[0]["losses"]
    assert len(expected) == 5 and got == dumps[1]["losses"]
    # Step 1 runs the same weights on the same samples: only the order of the float sums differs.
    assert abs(got[0] - expected[0]) < 1e-6, (got, expected)
    # After it, those last-bit differences grow through each update (Adam's step is nearly sign-sized
    # for near-zero gradients): about x10 a step, 1.6e-4 by step 4 on some CPUs. A loss or gradient
    # weighted per rank instead of per token would differ by percents.
    for step, (value, want) in enumerate(zip(got, expected), start=1):
        assert abs(value - want) < 1e-3 * want, (step, got, expected)
    if zero == "zero3":
        # The parts held out: every part but the LLM without a trainable parameter (none when partitioned).
        units = {name.split(".")[0] for name in dumps[0]["local"]}
        trained = {name.split(".")[0] for name in dumps[0]["trainable"]}
        held_out = set() if frozen_parts == "partitioned" else units - trained - {"llm"}
        assert stage == "1" or {"audio_encoder", "llm"} <= units and "audio_encoder" in held_out, (units, trained)
        for rank_dump in dumps:
            assert set(rank_dump["held_out"]) == held_out
            # Really partitioned: each rank holds about half of every other parameter, nothing outside a gather.
            partitioned = {name for name in rank_dump["local"] if name.split(".")[0] not in held_out}
            assert rank_dump["shards"] and set(rank_dump["shards"]) == set(rank_dump["full"]) == partitioned
            for name, full in rank_dump["full"].items():
                assert rank_dump["local"][name] == 0, name
                assert rank_dump["shards"][name] == (full + 1) // 2, name
    else:
        assert not dumps[0]["shards"]  # ZeRO-2 keeps whole parameters on every rank


def test_zero3_ranks_alternating_text_and_image_batches_finish(vitacore_cache, tmp_path):
    dumps = driver_run(vitacore_cache, tmp_path, 2, "--stage", "3", "--per_device_train_batch_size", "1",
                       "--deepspeed", os.path.join(REPO, "configs", "zero3.json"), "--alternate_modalities")
    assert all(d["steps"] == 5 for d in dumps)


def wait_for_rows(path, count, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(path) and sum(1 for _ in open(path)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError("no metrics rows appeared in time")


def test_sigterm_finishes_the_step_saves_and_exits_0(vitacore_cache, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--max_steps", "100000", "--logging_steps", "1",
                             "--output_dir", str(out)], env=env_for(vitacore_cache), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    stop = next(r for r in rows if r.get("event") == "stopped")
    assert stop["signal"] == "SIGTERM" and stop["step"] >= 3
    assert stop["step"] == max(r["step"] for r in rows if "loss" in r)  # the step in progress was finished
    assert (out / "mm_projector.bin").exists()
    # ... and saved a resumable checkpoint of that step.
    assert rows[-1] == {"step": stop["step"], "event": "checkpoint", "path": str(out / f"checkpoint-{stop['step']}")}
    assert (out / f"checkpoint-{stop['step']}" / "checkpoint_complete.json").exists()
    assert f"stopped by SIGTERM after step {stop['step']}" in stdout


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(vitacore_cache, tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "o"
    proc = subprocess.Popen(torchrun(2, SCRIPT, "--max_steps", "100000", "--logging_steps", "1",
                                     "--output_dir", str(out)),
                            env=env_for(vitacore_cache), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_rows(out / "metrics.jsonl", 3, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "train_stage.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGTERM)  # one rank only; the other learns it at the step's end
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    stop = next(r for r in map(json.loads, open(out / "metrics.jsonl")) if r.get("event") == "stopped")
    assert stop["signal"] in ("SIGTERM", "peer rank")
    assert (out / f"checkpoint-{stop['step']}" / "checkpoint_complete.json").exists()


def test_two_node_agents_on_loopback(vitacore_cache, tmp_path):
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               SCRIPT, "--max_steps", "3", "--logging_steps", "1", "--output_dir", str(tmp_path / "o")]
        procs.append(subprocess.Popen(cmd, env=env_for(vitacore_cache), cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "2 process(es)" in outputs[0][0]
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


@pytest.mark.skipif(shutil.which("numactl") is None,
                    reason="the deepspeed launcher needs numactl on CPU (install.sh installs it where it can)")
def test_deepspeed_launcher(vitacore_cache, tmp_path):
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    result = run([launcher, "--num_accelerators", "2", "--master_port", str(free_port()), SCRIPT,
                  "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(tmp_path / "o")], vitacore_cache)
    assert "2 process(es)" in result.stdout
    assert (tmp_path / "o" / "mm_projector.bin").exists()
