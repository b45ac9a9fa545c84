"""Signals against real runs of examples/train_stage.py on the embedded default: SIGTERM during a long
evaluation, during ``--stage all`` and during the final export; SIGUSR1 mid-run; SIGTERM to a
DataLoader worker. Each test spawns real processes and reads the output folder they leave."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from launch import env_for, free_port

from vitacore.checkpoint import is_full_export, latest_checkpoint, read_run_status

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "train_stage.py")
EXPORT_DRIVER = os.path.join(REPO, "tests", "faults", "export_signal_driver.py")
pytestmark = pytest.mark.slow


class Run:
    """A training process whose output (stdout and stderr together) is read as it comes."""

    def __init__(self, cache, cmd):
        self.proc = subprocess.Popen(cmd, env=env_for(cache), cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.arrived: list[float] = []  # when each line was read
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self.arrived.append(time.time())

    def seen_at(self, text: str) -> float:
        return next(t for t, line in zip(self.arrived, self.lines) if text in line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.text[-3000:]}"
            if time.time() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                raise AssertionError(f"no {what} within {timeout}s:\n{self.text[-3000:]}")
            time.sleep(0.05)

    def wait_for_text(self, text: str, timeout: float = 300) -> None:
        self.wait_for(lambda: text in self.text, repr(text), timeout)

    def wait_for_rows(self, metrics: str, count: int) -> None:
        def enough():
            return os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= count
        self.wait_for(enough, f"{count} rows in {metrics}")

    def signal_and_wait(self, signum, timeout: float = 90) -> float:
        """Send ``signum``; the seconds until the process exited (killed, and the test fails, past ``timeout``)."""
        sent = time.time()
        self.proc.send_signal(signum)
        return self.finish(timeout) - sent

    def finish(self, timeout: float = 300) -> float:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher and its ranks
            self.proc.wait()
            self._reader.join(5)
            raise AssertionError(f"still running after {timeout}s:\n{self.text[-3000:]}") from None
        ended = time.time()
        self._reader.join(10)
        return ended


def rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def big_eval_set(tmp_path_factory):
    """3,000 short text records: with one sample per batch, evaluating them takes well over 20 s."""
    words = [(c, s) for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")]
    records = [{"id": f"e{i}", "conversations": [
        {"from": "human", "value": f"{c} {s} describe a {c} {s}"}, {"from": "gpt", "value": f"a {c} {s}"}]}
        for i, (c, s) in enumerate(words[i % len(words)] for i in range(3000))]
    path = tmp_path_factory.mktemp("eval") / "eval.json"
    path.write_text(json.dumps(records))
    return str(path)


@pytest.mark.parametrize("when", ["periodic", "final"])
def test_sigterm_during_a_long_evaluation_stops_within_seconds_with_a_checkpoint(vitacore_cache, tmp_path,
                                                                                  big_eval_set, when):
    """Setup: stage 1 with 3,000 eval samples one per batch (an evaluation of > 20 s), evaluated every 2
    steps (``periodic``) or only after the last of 2 steps (``final``); SIGTERM once the log says the
    evaluation started. Expect: exit 0 within 10 s of the signal, a complete checkpoint of step 2, and
    run_status.json saying stopped by SIGTERM at step 2."""
    out = tmp_path / "o"
    schedule = (["--max_steps", "100", "--eval_strategy", "steps", "--eval_steps", "2"] if when == "periodic"
                else ["--max_steps", "2", "--eval_strategy", "no"])
    run = Run(vitacore_cache, [sys.executable, SCRIPT, *schedule, "--logging_steps", "1", "--save_steps", "1000",
                               "--eval_data_path", big_eval_set, "--per_device_eval_batch_size", "1",
                               "--output_dir", str(out)])
    run.wait_for_text("evaluation started")
    time.sleep(0.5)  # well inside the evaluation's batches
    seconds = run.signal_and_wait(signal.SIGTERM)
    print(f"{when} evaluation: exited {seconds:.1f}s after SIGTERM")
    assert run.proc.returncode == 0, run.text[-3000:]
    assert seconds < 10, f"exited {seconds:.1f}s after SIGTERM"
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    status = read_run_status(str(out))
    assert status["status"] == "stopped" and status["signal"] == "SIGTERM", status
    assert status["step"] == 2 and status["last_checkpoint"] == str(out / "checkpoint-2"), status
    stop = next(r for r in rows(out / "metrics.jsonl") if r.get("event") == "stopped")
    assert stop == {"step": 2, "epoch": stop["epoch"], "event": "stopped", "signal": "SIGTERM",
                    "during": "evaluation"}
    assert not any("eval_loss" in r for r in rows(out / "metrics.jsonl"))  # no partial evaluation logged
    assert "stopped by SIGTERM after step 2" in run.text


def test_sigterm_during_stage_all_starts_no_later_stage(vitacore_cache, tmp_path):
    """Setup: ``--stage all`` (stages 1 -> 4 into <out>/stage-k); SIGTERM once stage 1 has logged 3
    steps. Expect: exit 0 within 10 s, stage 1 saved and recorded as stopped, and no folder or log line of
    stage 2, 3 or 4."""
    out = tmp_path / "o"
    run = Run(vitacore_cache, [sys.executable, SCRIPT, "--stage", "all", "--max_steps", "100000",
                               "--logging_steps", "1", "--output_dir", str(out)])
    run.wait_for_rows(str(out / "stage-1" / "metrics.jsonl"), 3)
    seconds = run.signal_and_wait(signal.SIGTERM)
    print(f"--stage all: exited {seconds:.1f}s after SIGTERM")
    assert run.proc.returncode == 0, run.text[-3000:]
    assert seconds < 10, f"exited {seconds:.1f}s after SIGTERM"
    assert sorted(os.listdir(out)) == ["stage-1"]
    assert "vitacore: stage 2" not in run.text and "stage(s) 2, 3, 4 not started" in run.text
    status = read_run_status(str(out / "stage-1"))
    assert status["status"] == "stopped" and status["signal"] == "SIGTERM", status
    assert latest_checkpoint(str(out / "stage-1")) == status["last_checkpoint"] is not None


def test_sigterm_and_sigint_during_the_final_export_wait_until_it_is_published(vitacore_cache, tmp_path):
    """Setup: stage 3 (the LLM trains: the final artifact is a full export), 2 steps; as the final export
    starts, the process gets SIGTERM and then SIGINT (a second stop signal, which elsewhere interrupts
    at once). Expect: exit 0, a complete full export whose weight files all load (safetensors, and the
    adapter .bin files weights-only), and run_status.json saying stopped by SIGTERM (not finished)."""
    out = tmp_path / "o"
    run = Run(vitacore_cache, [sys.executable, EXPORT_DRIVER, "SIGTERM,SIGINT", "--stage", "3", "--max_steps", "2",
                               "--logging_steps", "1", "--output_dir", str(out)])
    run.finish(timeout=300)
    assert run.proc.returncode == 0, run.text[-3000:]
    assert is_full_export(str(out)), sorted(os.listdir(out))
    from safetensors.torch import load_file

    shards = [name for name in os.listdir(out) if name.endswith(".safetensors")]
    assert shards and all(load_file(str(out / name)) for name in shards)
    assert all(torch.load(out / name, weights_only=True) for name in os.listdir(out) if name.endswith(".bin"))
    status = read_run_status(str(out))
    assert status["status"] == "stopped" and status["signal"] == "SIGTERM" and status["step"] == 2, status
    assert "stopped by SIGTERM after step 2" in run.text


def test_sigusr1_saves_a_checkpoint_and_training_goes_on(vitacore_cache, tmp_path):
    """Setup: stage 1 for 20 steps with no periodic checkpoints (``--save_strategy no``); SIGUSR1 once 3
    steps are logged. Expect: a complete checkpoint-<k> for a step k < 20, and the run trains on to step
    20, exits 0 and is recorded as finished."""
    out = tmp_path / "o"
    run = Run(vitacore_cache, [sys.executable, SCRIPT, "--max_steps", "20", "--save_strategy", "no",
                               "--logging_steps", "1", "--output_dir", str(out)])
    run.wait_for_rows(str(out / "metrics.jsonl"), 3)
    run.proc.send_signal(signal.SIGUSR1)
    run.finish()
    assert run.proc.returncode == 0, run.text[-3000:]
    saved = [r for r in rows(out / "metrics.jsonl") if r.get("event") == "checkpoint"]
    assert len(saved) == 1 and 3 <= saved[0]["step"] < 20, saved
    assert latest_checkpoint(str(out)) == saved[0]["path"] == str(out / f"checkpoint-{saved[0]['step']}")
    assert max(r["step"] for r in rows(out / "metrics.jsonl") if "loss" in r) == 20
    status = read_run_status(str(out))
    assert status["status"] == "finished" and status["step"] == 20, status


def test_sigterm_to_a_dataloader_worker_does_not_kill_the_run(vitacore_cache, tmp_path):
    """Setup: stage 1 for 20 steps with one persistent DataLoader worker; SIGTERM to that worker (as a
    scheduler signalling every process would) once 3 steps are logged. Expect: the worker ignores it,
    and the run trains to step 20 and exits 0 (before: the worker died and the run failed with
    "DataLoader worker (pid N) is killed by signal: Terminated")."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "o"
    run = Run(vitacore_cache, [sys.executable, SCRIPT, "--max_steps", "20", "--logging_steps", "1",
                               "--dataloader_num_workers", "1", "--dataloader_persistent_workers", "True",
                               "--output_dir", str(out)])
    run.wait_for_rows(str(out / "metrics.jsonl"), 3)
    workers = psutil.Process(run.proc.pid).children()
    assert workers, "no DataLoader worker found"
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    run.finish()
    assert run.proc.returncode == 0, run.text[-3000:]
    status = read_run_status(str(out))
    assert status["status"] == "finished" and status["step"] == 20, status


def test_sigterm_to_one_rank_during_evaluation_stops_both_ranks_together(vitacore_cache, tmp_path, big_eval_set):
    """Setup: 2 processes (torchrun), stage 1, evaluating 3,000 samples one per batch every 2 steps;
    SIGTERM to rank 1 only once the evaluation started. Expect: both ranks leave the evaluation at the
    same batch (agreed in a collective) and have saved checkpoint-2 and the artifacts within 10 s; the job
    exits 0 (within 20 s: tearing the process group down takes seconds more on a loaded CPU); rank 0
    records the stop as learned from its peer."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), SCRIPT, "--max_steps", "100", "--eval_strategy", "steps",
           "--eval_steps", "2", "--logging_steps", "1", "--save_steps", "1000", "--eval_data_path", big_eval_set,
           "--per_device_eval_batch_size", "1", "--output_dir", str(out)]
    run = Run(vitacore_cache, cmd)
    run.wait_for_text("evaluation started")
    time.sleep(0.5)
    ranks = sorted((p for p in psutil.Process(run.proc.pid).children(recursive=True)
                    if "train_stage.py" in " ".join(p.cmdline())), key=lambda p: p.environ().get("RANK", ""))
    assert len(ranks) == 2
    sent = time.time()
    ranks[1].send_signal(signal.SIGTERM)
    seconds = run.finish(timeout=90) - sent
    assert run.proc.returncode == 0, run.text[-3000:]
    saved = run.seen_at("wrote ") - sent
    print(f"2 ranks exited {seconds:.1f}s after SIGTERM to rank 1 (artifacts saved at {saved:.1f}s)")
    assert saved < 10 and seconds < 20, f"saved {saved:.1f}s, exited {seconds:.1f}s after SIGTERM"
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    status = read_run_status(str(out))
    assert status["status"] == "stopped" and status["signal"] == "peer rank" and status["step"] == 2, status

