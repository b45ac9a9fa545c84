"""Non-finite numbers in training: gradients, skipped micro-batches, checkpoints, and how metrics record them.

Real DeepSpeed (one gloo process, CPU, fp32) around a tiny random text-only Qwen2. Faults are
injected in the test only: a tensor hook that turns one parameter's gradient infinite at one
backward, a model whose loss is NaN at one forward, or weights set to NaN by hand.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from tiny_models import NanLossAtCall
from transformers import Qwen2Config, Qwen2ForCausalLM

from vitacore.checkpoint import CheckpointConfig, Checkpointer
from vitacore.data.dataset import Collator, Sample
from vitacore.engine import LoopConfig, NonFiniteLossError, OptimConfig, Trainer, resolve_deepspeed_config
from vitacore.engine.metrics import MetricsLog, MetricsWindow
from vitacore.model.multimodal import VitaModel

VOCAB, HIDDEN, PAD = 64, 32, 0


def tiny_model(bad_loss_call: int = 0) -> VitaModel:
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                       tie_word_embeddings=False, pad_token_id=PAD))
    model = NanLossAtCall(llm, model_max_length=128)
    model.bad_call = bad_loss_call
    return model


def samples(n: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (10,), generator=gen).tolist()
        rows.append(Sample(f"s{i}", ids, list(ids), [], [], [], "lang"))
    return rows


def make_trainer(dist, tmp_path, model, zero_stage: int, output_dir=None, bf16: bool = False,
                 **loop_fields) -> Trainer:
    """A Trainer as a stage run builds it, with a DeepSpeed file asking for ``zero_stage`` (written in
    ``tmp_path``); the run's folder is ``output_dir`` (default ``tmp_path/out``)."""
    fields = dict(max_steps=4, per_device_train_batch_size=2, logging_steps=1, save_strategy="no", seed=7)
    fields.update(loop_fields)
    loop = LoopConfig(**fields)
    optim = OptimConfig(learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=1.0)
    zero = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    ds_file = tmp_path / f"zero{zero_stage}.json"
    ds_file.write_text(json.dumps({"zero_optimization": zero, "gradient_clipping": "auto",
                                   "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                   "train_batch_size": "auto"}))
    ds_config, _ = resolve_deepspeed_config(str(ds_file), loop=loop, optim=optim, world_size=dist.world_size,
                                            hidden_size=HIDDEN, bf16=bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"name": "all", "params": params, "lr": optim.learning_rate, "weight_decay": 0.0}]
    return Trainer(model, groups, samples(32), Collator(PAD), dist, loop=loop, optim=optim, deepspeed_config=ds_config,
                   checkpointer=Checkpointer(CheckpointConfig(str(output_dir or tmp_path / "out")), dist))


def local_weights(model) -> dict[str, torch.Tensor]:
    """This rank's copy of every trainable parameter (its partition under ZeRO-3)."""
    return {n: getattr(p, "ds_tensor", p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def adam_steps(engine) -> list[float]:
    """The AdamW step counts in the optimizer state (inside DeepSpeed's ZeRO wrapper where there is one)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sorted(float(state["step"]) for state in inner.state.values() if "step" in state)


def metrics_rows(tmp_path) -> list[dict]:
    with open(tmp_path / "out" / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.parametrize("zero_stage,bf16", [(0, False), (2, False), (3, False), (0, True)])
def test_infinite_gradient_with_finite_loss_skips_the_step(dist, tmp_path, zero_stage, bf16):
    """Setup: 4 steps; at step 3's backward a tensor hook makes one weight's gradient +inf (the loss stays
    finite), with --skip_nonfinite_steps 1; ZeRO-0, -2 and -3 in fp32, and ZeRO-0 in bf16 (DeepSpeed's bf16
    optimizer). Expect: step 3 is skipped (weights and Adam
    state equal to those after step 2), metrics.jsonl says "inf" for its grad_norm, the run finishes with
    finite weights and num_skipped_steps 1."""
    model = tiny_model()
    trainer = make_trainer(dist, tmp_path, model, zero_stage, bf16=bf16, skip_nonfinite_steps=1)
    target = model.llm.model.layers[0].mlp.down_proj.weight
    backward_calls = []

    def infinite_at_step_3(grad):
        backward_calls.append(1)
        return torch.full_like(grad, float("inf")) if len(backward_calls) == 3 else grad

    target.register_hook(infinite_at_step_3)
    snapshots = {}
    trainer.on_log = lambda row: snapshots.setdefault(row.get("step"), (local_weights(model),
                                                                       adam_steps(trainer.engine)))
    result = trainer.fit()

    assert result.num_steps == 4 and result.num_skipped_steps == 1
    before, after = snapshots[2], snapshots[3]
    assert all(torch.equal(before[0][name], after[0][name]) for name in before[0]), "skipped step changed weights"
    assert before[1] == after[1], "skipped step advanced the optimizer state"
    assert not all(torch.equal(snapshots[3][0][n], snapshots[4][0][n]) for n in before[0]), "step 4 applied nothing"
    assert all(bool(torch.isfinite(w).all()) for w in local_weights(model).values())
    grad_norms = {row["step"]: row["grad_norm"] for row in metrics_rows(tmp_path) if "loss" in row}
    assert grad_norms[3] == "inf"
    assert all(isinstance(grad_norms[s], float) and math.isfinite(grad_norms[s]) for s in (1, 2, 4))


def test_infinite_gradient_past_the_allowed_skips_stops_naming_the_step(dist, tmp_path):
    """Setup: an infinite gradient (finite loss) at step 2, --skip_nonfinite_steps 0, ZeRO-0. Expect: the run
    stops with an error naming optimizer step 2 and the flag, and the weights stay finite (before: the
    clipped inf became NaN weights and the run went on)."""
    model = tiny_model()
    trainer = make_trainer(dist, tmp_path, model, 0)
    calls = []
    model.llm.lm_head.weight.register_hook(
        lambda g: calls.append(1) or (torch.full_like(g, float("inf")) if len(calls) == 2 else g))
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 2\b.*--skip_nonfinite_steps"):
        trainer.fit()
    assert all(bool(torch.isfinite(w).all()) for w in local_weights(model).values())


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_group_whose_only_micro_batch_is_skipped_does_not_step(dist, tmp_path, zero_stage):
    """Setup: accumulation 1, the loss is NaN at the 3rd forward, --skip_nonfinite_steps 1 (ZeRO-0 and ZeRO-2).
    Expect: step 3 changes no weight and no Adam state (before: engine.step() ran on an empty gradient, and
    under ZeRO-2 Adam's momentum moved every weight)."""
    model = tiny_model(bad_loss_call=3)
    trainer = make_trainer(dist, tmp_path, model, zero_stage, skip_nonfinite_steps=1)
    snapshots = {}
    trainer.on_log = lambda row: snapshots.setdefault(row.get("step"), (local_weights(model),
                                                                       adam_steps(trainer.engine)))
    result = trainer.fit()
    assert result.num_steps == 4 and result.num_skipped_steps == 1
    assert all(torch.equal(snapshots[2][0][n], snapshots[3][0][n]) for n in snapshots[2][0])
    assert snapshots[2][1] == snapshots[3][1]


def test_skipped_last_micro_batch_of_a_group_leaves_the_weights_finite(dist, tmp_path):
    """Setup: ZeRO-2, accumulation 2, the loss is NaN at the 6th forward (the last micro-batch of
    step 3, after the 5th contributed), --skip_nonfinite_steps 1. Expect: the run finishes, counts one skip,
    and every weight stays finite (step 3 is applied from the 5th forward, or skipped when the NaN reaches
    the gradient; before: the boundary's gradient reduction never ran and DeepSpeed's step failed on the
    gradients it had not built)."""
    model = tiny_model(bad_loss_call=6)
    trainer = make_trainer(dist, tmp_path, model, 2, skip_nonfinite_steps=1, gradient_accumulation_steps=2)
    result = trainer.fit()
    assert result.num_steps == 4 and result.num_skipped_steps == 1
    assert all(bool(torch.isfinite(w).all()) for w in local_weights(model).values())
    assert all(isinstance(row["loss"], float) for row in metrics_rows(tmp_path) if "loss" in row)


def test_no_checkpoint_is_written_with_nan_weights(dist, tmp_path):
    """Setup: after 2 steps one trainable weight is set to NaN by hand, then a checkpoint is saved. Expect: a
    ValueError naming the parameter, and no checkpoint-2 folder (before: the NaN weights were saved and a
    resume would continue from them)."""
    model = tiny_model()
    trainer = make_trainer(dist, tmp_path, model, 0, max_steps=2)
    trainer.fit()
    with torch.no_grad():
        model.llm.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"llm\.lm_head\.weight"):
        trainer.save(0, 4, MetricsWindow())
    assert not any(name.startswith("checkpoint-") for name in os.listdir(tmp_path / "out"))


def test_metrics_write_non_finite_numbers_as_strings(tmp_path):
    """Setup: a metrics row with inf, -inf and NaN values, one inside a per-group dict. Expect: the file says
    "inf", "-inf" and "nan" (before: null, which hides what happened), and the curve reader still skips them."""
    from vitacore.engine.curves import curve_rows

    log = MetricsLog(str(tmp_path))
    log.write({"step": 1, "loss": 0.5, "grad_norm": float("inf"), "lr": {"a": float("-inf"), "b": 1e-3}})
    log.write({"step": 2, "loss": float("nan"), "grad_norm": 2.0})
    with open(tmp_path / "metrics.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert rows[0]["grad_norm"] == "inf" and rows[0]["lr"] == {"a": "-inf", "b": 1e-3} and rows[1]["loss"] == "nan"
    curves = curve_rows(str(tmp_path / "metrics.jsonl"))
    assert curves.series["grad_norm"] == ([2], [2.0]) and curves.series["loss"] == ([1], [0.5])


def test_a_fresh_start_moves_an_earlier_metrics_file_aside(dist, tmp_path, vitacore_log):
    """Setup: the output folder holds a metrics.jsonl of an earlier run and no checkpoint; a fresh run starts.
    Expect: the earlier file is kept as metrics.<time>.jsonl with its content, a note names it, and the new
    metrics.jsonl has only the new run's rows (before: the earlier file was deleted)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    trainer = make_trainer(dist, tmp_path, tiny_model(), 0, max_steps=1)
    trainer.fit()
    kept = [name for name in os.listdir(out) if name.startswith("metrics.") and name != "metrics.jsonl"]
    assert len(kept) == 1 and (out / kept[0]).read_text() == '{"step": 1, "loss": 9.0}\n'
    assert kept[0] in vitacore_log.text
    assert [row["step"] for row in metrics_rows(tmp_path)] == [1]
    assert metrics_rows(tmp_path)[0]["loss"] != 9.0


@pytest.mark.slow
def test_infinite_gradient_on_one_rank_skips_the_step_on_both_under_zero3(vitacore_cache, tmp_path):
    """Setup: 2 processes (torchrun), ZeRO-3, --skip_nonfinite_steps 1; at step 3 rank 1 alone gets an infinite
    gradient on one weight (finite loss). Expect: both ranks skip step 3 (their partitions equal to those after
    step 2), step 4 trains, the weights stay finite, both count one skip, and rank 0's metrics say "inf"
    (before: DeepSpeed skipped silently, nothing was counted, and metrics.jsonl said null)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nonfinite_grad_driver.py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), driver, str(tmp_path), "3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report == {"steps": 4, "skipped": 1, "unchanged_at_3": True, "changed_at_4": True, "finite": True}, \
            (rank, report)
    grad_norms = {row["step"]: row["grad_norm"] for row in metrics_rows(tmp_path) if "loss" in row}
    assert grad_norms[3] == "inf" and all(math.isfinite(grad_norms[s]) for s in (1, 2, 4))
