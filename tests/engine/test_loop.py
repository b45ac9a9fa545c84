"""The Trainer with a real DeepSpeed engine (ZeRO-0, one gloo process, CPU, fp32).

Nothing of DeepSpeed is mocked. The model is a text-only ``VitaModel`` around a tiny random
``Qwen2ForCausalLM`` (vocabulary 64, width 32, one layer), so every run takes well under a second.
Expected values (parameters after a step, gradient norms, learning rates, accuracy) are computed
here by hand with plain PyTorch on a fresh copy of the model, never read back from vitacore.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os

import pytest
import torch
from tiny_models import NanLossAtCall
from transformers import Qwen2Config, Qwen2ForCausalLM

from vitacore.checkpoint import CheckpointConfig, Checkpointer
from vitacore.data.dataset import Collator, Sample
from vitacore.engine import (
    LoopConfig,
    NonFiniteLossError,
    OptimConfig,
    Trainer,
    resolve_deepspeed_config,
)
from vitacore.model import prepare_for_training
from vitacore.model.multimodal import VitaModel

VOCAB, HIDDEN, PAD = 64, 32, 0
ROW_KEYS = {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def make_model(seed: int = 0) -> VitaModel:
    """A tiny random Qwen2 wrapped as a text-only VitaModel (no tower, projector or audio)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=PAD)
    return VitaModel(Qwen2ForCausalLM(config), model_max_length=128)


def pair_samples(n: int, length: int = 10, seed: int = 1, lengths=None) -> list[Sample]:
    """Rows of pairs ``(a, a+1)``: every second next token is predictable, the others are random.

    All tokens are supervised (labels = ids), so equal-length rows carry equal numbers of targets.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        row_len = lengths[i] if lengths is not None else length
        ids = []
        while len(ids) < row_len:
            a = int(torch.randint(1, VOCAB - 1, (1,), generator=gen))
            ids += [a, a + 1]
        ids = ids[:row_len]
        out.append(Sample(f"s{seed}-{i}", ids, list(ids), [], [], [], "lang"))
    return out


def param_groups(model, learning_rate: float, weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters as a decay group (matrices) and a no-decay group (vectors), built here
    rather than with vitacore's helper so these tests depend only on the Trainer's contract."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 and "embed" not in name else no_decay).append((name, param))
    groups = []
    for label, members, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
        if members:
            groups.append({"name": label, "params": [p for _, p in members], "param_names": [n for n, _ in members],
                           "lr": learning_rate, "weight_decay": wd})
    return groups


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a test run is built from: each component's own config, plus the precision flags (which
    complete the DeepSpeed config) and the run-time switches (set on the model before the Trainer)."""

    loop: LoopConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    tf32: bool | None = None


_LOOP_FIELDS = {f.name for f in dataclasses.fields(LoopConfig)}
_OPTIM_FIELDS = {f.name for f in dataclasses.fields(OptimConfig)}
_CHECKPOINT_FIELDS = {f.name for f in dataclasses.fields(CheckpointConfig)}
_RUN_FIELDS = {"bf16", "fp16", "gradient_checkpointing", "tf32"}


def make_config(tmp_path, **fields) -> RunSettings:
    """The tests' defaults, then ``fields``, each routed to the config that owns it."""
    values = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                  learning_rate=1e-2, logging_steps=1, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                  seed=7, save_strategy="no")
    values.update(fields)
    unknown = set(values) - _LOOP_FIELDS - _OPTIM_FIELDS - _CHECKPOINT_FIELDS - _RUN_FIELDS
    assert not unknown, f"make_config: no config has {sorted(unknown)}"
    pick = lambda names: {k: v for k, v in values.items() if k in names}  # noqa: E731
    return RunSettings(LoopConfig(**pick(_LOOP_FIELDS)), OptimConfig(**pick(_OPTIM_FIELDS)),
                       CheckpointConfig(**pick(_CHECKPOINT_FIELDS)), **pick(_RUN_FIELDS))


def build_run(dist, cfg: RunSettings, model, train, eval_dataset=None, groups=None) -> tuple[Trainer, list[str]]:
    """The Trainer as a stage run builds it, and every note of the set-up (DeepSpeed config, run-time
    switches, Trainer)."""
    if groups is None:
        groups = param_groups(model, cfg.optim.learning_rate, cfg.optim.weight_decay)
    ds_config, notes = resolve_deepspeed_config(None, loop=cfg.loop, optim=cfg.optim, world_size=dist.world_size,
                                                hidden_size=HIDDEN, bf16=cfg.bf16, fp16=cfg.fp16)
    notes += prepare_for_training(model, cfg.gradient_checkpointing, cfg.tf32, dist.world_size, dist.device)
    trainer = Trainer(model, groups, train, Collator(PAD), dist, loop=cfg.loop, optim=cfg.optim,
                      deepspeed_config=ds_config, checkpointer=Checkpointer(cfg.checkpoint, dist),
                      eval_dataset=eval_dataset)
    return trainer, notes + trainer.notes


def make_trainer(dist, cfg, model, train, eval_dataset=None, groups=None) -> Trainer:
    return build_run(dist, cfg, model, train, eval_dataset=eval_dataset, groups=groups)[0]


def read_metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def count_training_samples(model) -> list[int]:
    """Batch sizes of every forward the model runs in train mode."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        if module.training:
            seen.append(kwargs["input_ids"].shape[0])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def reference_step(model, samples, lr, eps, max_grad_norm=0.0, weight_decay=0.0):
    """One plain-PyTorch optimizer step on ``samples`` as a single batch.

    Returns ``(loss, pre-clip grad norm, {name: updated parameter})``.
    """
    batch = Collator(PAD)(samples)
    output = model(**batch)
    output["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
    groups = param_groups(model, lr, weight_decay)
    optimizer = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                  lr=lr, eps=eps)
    optimizer.step()
    return float(output["loss"].detach()), norm, {n: p.detach().clone() for n, p in model.named_parameters()}


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_close(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


# ---------------------------------------------------------------------------------------------
# Metrics rows and the progress bar
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("logging_steps", [1, 2])
def test_run_writes_a_metrics_row_per_logging_step(dist, tmp_path, capsys, logging_steps):
    steps, length = 5, 10
    cfg = make_config(tmp_path, max_steps=steps, logging_steps=logging_steps, gradient_accumulation_steps=2)
    trainer = make_trainer(dist, cfg, make_model(), pair_samples(12, length))
    result = trainer.fit()

    assert result.num_steps == steps
    rows = read_metrics(tmp_path)
    expected_steps = [k for k in range(1, steps + 1) if k % logging_steps == 0 or k == steps]
    assert [r["step"] for r in rows] == expected_steps
    assert rows == result.rows
    for row in rows:
        assert row.keys() >= ROW_KEYS, row
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert row["lr"] == pytest.approx(1e-2)  # constant schedule
        assert row["grad_norm"] is not None and row["grad_norm"] > 0
        assert row["tokens_per_s"] > 0 and row["samples_per_s"] > 0
        # Every sample has `length` real tokens and both rates share one clock.
        assert row["tokens_per_s"] / row["samples_per_s"] == pytest.approx(length)
    assert result.first_loss == rows[0]["loss"] and result.last_loss == rows[-1]["loss"]
    # tqdm drew its bar (to stderr) and got to the end without disturbing the run.
    err = capsys.readouterr().err
    assert f"{steps}/{steps}" in err


# ---------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------

def test_gradient_accumulation_equals_one_big_batch(dist, tmp_path):
    """4 x 2 accumulated == 8 x 1 == a hand-written full-batch step.

    AdamW's first step is scale-invariant when eps is tiny (update ~ lr * sign(g)), which would hide
    a sum-instead-of-mean bug; a large eps makes the update roughly linear in the gradient.
    Clipping is off for the same reason.
    """
    samples = pair_samples(8, 10, seed=3)
    common = dict(max_steps=1, learning_rate=0.05, adam_epsilon=1.0, max_grad_norm=0.0)
    updated, logged = {}, {}
    for micro, accum in ((4, 2), (8, 1)):
        model = make_model()
        out = tmp_path / f"m{micro}"
        cfg = make_config(out, per_device_train_batch_size=micro, gradient_accumulation_steps=accum, **common)
        seen = count_training_samples(model)
        result = make_trainer(dist, cfg, model, samples).fit()
        assert result.num_steps == 1 and seen == [micro] * accum
        updated[micro] = params_of(model)
        logged[micro] = result.rows[0]

    ref_loss, ref_norm, expected = reference_step(make_model(), samples, lr=0.05, eps=1.0)
    assert_params_close(updated[4], updated[8])
    assert_params_close(updated[4], expected)
    # The step did move the weights (else the comparisons above prove nothing).
    assert max_diff(expected, params_of(make_model())) > 1e-3
    for micro in (4, 8):
        assert logged[micro]["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert logged[micro]["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------

def test_lr_schedule_steps_per_optimizer_step_and_keeps_group_ratio(dist, tmp_path):
    """Accumulation 2: a scheduler stepped per micro-batch would decay twice as fast."""
    lrs = {"decay": 1e-2, "no_decay": 1e-3}
    cfg = make_config(tmp_path, max_steps=4, gradient_accumulation_steps=2, lr_scheduler_type="linear",
                      warmup_steps=0, learning_rate=lrs["decay"])
    model = make_model()
    groups = param_groups(model, lrs["decay"], 0.0)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    for group in groups:
        group["lr"] = lrs[group["name"]]
    trainer = make_trainer(dist, cfg, model, pair_samples(16), groups=groups)
    rows = trainer.fit().rows

    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        k = row["step"]
        expected = {name: base * (1 - k / 4) for name, base in lrs.items()}
        lr = row["lr"]
        if k < 4:
            assert isinstance(lr, dict), row
            assert lr == pytest.approx(expected, rel=1e-9)
            assert lr["decay"] / lr["no_decay"] == pytest.approx(10.0)
        else:  # both groups at 0: the log collapses them into one number
            assert lr == pytest.approx(0.0, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# Gradient clipping and the logged gradient norm
# ---------------------------------------------------------------------------------------------

def test_gradient_clipping_reaches_deepspeed_and_grad_norm_is_pre_clip(dist, tmp_path):
    samples = pair_samples(8, 10, seed=4)
    clip, lr, eps = 0.05, 0.05, 1.0
    cfg = make_config(tmp_path, max_steps=1, per_device_train_batch_size=8, max_grad_norm=clip,
                      learning_rate=lr, adam_epsilon=eps)
    model = make_model()
    fresh = copy.deepcopy(model)
    trainer = make_trainer(dist, cfg, model, samples)
    assert trainer.engine.gradient_clipping() == clip
    assert trainer.ds_config["gradient_clipping"] == clip
    row = trainer.fit().rows[0]

    ref_loss, ref_norm, expected = reference_step(fresh, samples, lr=lr, eps=eps, max_grad_norm=clip)
    assert ref_norm > 10 * clip  # the clip really bites
    assert row["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert row["loss"] == pytest.approx(ref_loss, rel=1e-5)
    # The optimizer saw clipped gradients: the weights match a clipped reference step ...
    assert_params_close(params_of(model), expected)
    # ... and not an unclipped one (which moves the weights visibly further).
    _, _, unclipped = reference_step(make_model(), samples, lr=lr, eps=eps)
    assert max_diff(params_of(model), unclipped) > 1e-4


# ---------------------------------------------------------------------------------------------
# How many steps
# ---------------------------------------------------------------------------------------------

def test_max_steps_overrides_epochs(dist, tmp_path):
    cfg = make_config(tmp_path, max_steps=3, num_train_epochs=5.0, per_device_train_batch_size=2)
    model = make_model()
    seen = count_training_samples(model)
    trainer = make_trainer(dist, cfg, model, pair_samples(8))
    assert trainer.total_steps == 3
    result = trainer.fit()
    assert result.num_steps == 3 and result.rows[-1]["step"] == 3
    assert seen == [2, 2, 2]


@pytest.mark.parametrize("n, micro, accum, epochs", [(10, 3, 2, 2.5), (10, 3, 3, 1.0), (8, 2, 1, 0.5),
                                                     (9, 4, 2, 3.0), (5, 8, 4, 2.0)])
def test_total_steps_from_epochs(dist, tmp_path, n, micro, accum, epochs):
    cfg = make_config(tmp_path, max_steps=-1, num_train_epochs=epochs, per_device_train_batch_size=micro,
                      gradient_accumulation_steps=accum)
    trainer = make_trainer(dist, cfg, make_model(), pair_samples(n))
    batches = -(-n // micro)
    assert len(trainer.loader) == batches
    assert trainer.total_steps == max(1, math.ceil(epochs * math.ceil(batches / accum)))


def test_epochs_run_whole_epochs_when_accumulation_divides_the_batches(dist, tmp_path):
    # 10 samples, micro 3 -> 4 batches (3, 3, 3, 1); accumulation 2 -> 2 steps an epoch; 2.5 epochs -> 5 steps.
    cfg = make_config(tmp_path, max_steps=-1, num_train_epochs=2.5, per_device_train_batch_size=3,
                      gradient_accumulation_steps=2)
    model = make_model()
    seen = count_training_samples(model)
    trainer = make_trainer(dist, cfg, model, pair_samples(10))
    result = trainer.fit()
    assert result.num_steps == trainer.total_steps == 5
    assert trainer.engine.global_steps == 5
    # Two whole epochs, then the first half of the third.
    assert seen == [3, 3, 3, 1] * 2 + [3, 3]


def test_one_epoch_with_a_partial_accumulation_sees_each_sample_once(dist, tmp_path):
    # 8 samples, micro 2 -> 4 batches; accumulation 3 -> ceil(4/3) = 2 steps: (b1, b2, b3) and (b4).
    cfg = make_config(tmp_path, max_steps=-1, num_train_epochs=1.0, per_device_train_batch_size=2,
                      gradient_accumulation_steps=3)
    model = make_model()
    seen = count_training_samples(model)
    trainer = make_trainer(dist, cfg, model, pair_samples(8))
    optimizer_steps_after: list[int] = []
    trainer.engine.optimizer.register_step_post_hook(lambda *a: optimizer_steps_after.append(len(seen)))
    result = trainer.fit()

    assert trainer.total_steps == result.num_steps == 2
    assert optimizer_steps_after == [3, 4]  # each loop step is an optimizer step on its own micro-batches
    assert sum(seen) == 8  # one epoch: every sample once
    assert result.rows[-1]["epoch"] == pytest.approx(1.0)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # nothing left unapplied


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def hand_eval(model, samples) -> dict:
    """Teacher-forced next-token argmax accuracy and token-weighted loss, one sample at a time."""
    model.eval()
    correct = total = exact = 0
    loss_sum = 0.0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample.input_ids])
            logits = model.llm(input_ids=ids).logits[0]
            targets = torch.tensor(sample.labels[1:])
            hits = logits[:-1].argmax(-1) == targets
            correct += int(hits.sum())
            total += targets.numel()
            exact += int(bool(hits.all()))
            loss_sum += float(torch.nn.functional.cross_entropy(logits[:-1].double(), targets, reduction="sum"))
    return {"accuracy": correct / total, "loss": loss_sum / total, "exact": exact / len(samples)}


def test_eval_rows_and_accuracy_by_hand(dist, tmp_path):
    train = pair_samples(16, 10, seed=1)
    # Uneven lengths and a partial last eval batch (6 rows, batches of 4) exercise padding and summing.
    evalset = pair_samples(6, seed=9, lengths=[8, 12, 10, 9, 12, 7])
    cfg = make_config(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
                      per_device_train_batch_size=4, learning_rate=1e-2)
    model = make_model()
    trainer = make_trainer(dist, cfg, model, train, eval_dataset=evalset)
    result = trainer.fit()

    eval_rows = [r for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert [r["step"] for r in eval_rows] == [2, 4, 6]
    final = eval_rows[-1]
    assert result.final_eval == final
    assert final["eval_samples"] == 6
    assert 0.0 <= final["eval_accuracy"] <= 1.0
    by_hand = hand_eval(trainer.engine.module, evalset)
    # The pairs make about half the targets learnable: a value strictly inside (0, 1) is a real check.
    assert 0.0 < by_hand["accuracy"] < 1.0, by_hand
    assert final["eval_accuracy"] == pytest.approx(by_hand["accuracy"], abs=1e-12)
    assert final["eval_loss"] == pytest.approx(by_hand["loss"], rel=1e-5)
    assert final["eval_exact_match"] == pytest.approx(by_hand["exact"], abs=1e-12)
    # Training went on after the first evaluation (engine back in train mode, loss improving).
    assert eval_rows[2]["eval_loss"] < eval_rows[1]["eval_loss"] < eval_rows[0]["eval_loss"]


# ---------------------------------------------------------------------------------------------
# Failure modes and flags
# ---------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_the_run_naming_the_step(dist, tmp_path):
    base = make_model()
    model = NanLossAtCall(base.llm, model_max_length=128)
    # Accumulation 2: the 5th micro-batch belongs to optimizer step 3.
    cfg = make_config(tmp_path, max_steps=6, gradient_accumulation_steps=2)
    trainer = make_trainer(dist, cfg, model, pair_samples(16))
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3\b") as info:
        trainer.fit()
    assert "nan" in str(info.value)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_skip_nonfinite_steps_skips_that_micro_batch_and_goes_on(dist, tmp_path):
    base = make_model()
    model = NanLossAtCall(base.llm, model_max_length=128)
    cfg = make_config(tmp_path, max_steps=6, gradient_accumulation_steps=2, skip_nonfinite_steps=1)
    trainer = make_trainer(dist, cfg, model, pair_samples(16))
    result = trainer.fit()
    assert result.num_steps == 6 and result.num_skipped_steps == 1
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_on_cpu_is_refused_naming_the_flag(dist, tmp_path):
    cfg = make_config(tmp_path, fp16=True)
    with pytest.raises(ValueError, match="--fp16"):
        make_trainer(dist, cfg, make_model(), pair_samples(4))


def test_tf32_on_cpu_is_ignored_with_a_note(dist, tmp_path):
    cfg = make_config(tmp_path, tf32=True)
    _, notes = build_run(dist, cfg, make_model(), pair_samples(4))
    assert any("tf32" in note.lower() and "ignored" in note for note in notes), notes
    assert build_run(dist, make_config(tmp_path / "b"), make_model(), pair_samples(4))[1] == []


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------

def test_gradient_checkpointing_recomputes_frozen_layers(dist, tmp_path):
    """Frozen decoder layer, trainable embeddings: gradients must flow back through the frozen layer.

    transformers 5 checkpoints the layer's ``forward`` (not ``__call__``), so hooks on the layer itself
    fire once either way; a pre-hook on a child module (its MLP) sees the recomputation.
    """
    updated, calls, losses = {}, {}, {}
    for checkpointing in (False, True):
        model = make_model()
        for name, param in model.named_parameters():
            param.requires_grad_(name == "llm.model.embed_tokens.weight")
        layer = model.llm.model.layers[0]
        counter = []
        layer.mlp.register_forward_pre_hook(lambda module, args, counter=counter: counter.append(1))
        cfg = make_config(tmp_path / str(checkpointing), max_steps=3, gradient_accumulation_steps=2,
                          gradient_checkpointing=checkpointing, logging_steps=1)
        trainer = make_trainer(dist, cfg, model, pair_samples(12))
        assert layer.gradient_checkpointing is checkpointing
        result = trainer.fit()
        assert result.num_steps == 3 and math.isfinite(result.last_loss)
        losses[checkpointing] = [row["loss"] for row in result.rows if "loss" in row]
        assert model.llm.training  # the engine put the (frozen) LLM in train mode
        calls[checkpointing] = len(counter)
        updated[checkpointing] = params_of(model)

    assert calls[False] == 2 * 3  # once per micro-batch, 2 micro-batches per step, 3 steps
    assert calls[True] == 4 * 3  # forward + recomputation in backward, per micro-batch
    assert len(losses[True]) == 3
    assert all(abs(a - b) < 1e-5 for a, b in zip(losses[True], losses[False])), losses
    # Same maths either way, and the trainable embedding really moved.
    assert_params_close(updated[True], updated[False])
    initial = make_model().llm.model.embed_tokens.weight.detach()
    assert float((updated[True]["llm.model.embed_tokens.weight"] - initial).abs().max()) > 1e-3


def test_report_to_tensorboard_writes_events_or_says_it_cannot(tmp_path):
    from vitacore.engine.metrics import TensorBoardLog

    cfg = make_config(tmp_path, report_to="tensorboard")
    notes: list = []
    log = TensorBoardLog.create(cfg.loop.report_to, cfg.checkpoint.output_dir, is_main=True, notes=notes)
    if importlib.util.find_spec("tensorboard") is None:
        assert log.writer is None and "tensorboard" in notes[0] and "pip install tensorboard" in notes[0]
        return
    log.write({"step": 1, "loss": 0.5, "lr": {"a": 1e-3, "b": 1e-4}})
    log.close()
    assert any(name.startswith("events.") for name in os.listdir(tmp_path / "runs")) and not notes


def test_report_to_none_makes_no_writer(tmp_path):
    from vitacore.engine.metrics import TensorBoardLog

    notes: list = []
    cfg = make_config(tmp_path)
    writer = TensorBoardLog.create(cfg.loop.report_to, cfg.checkpoint.output_dir, True, notes).writer
    assert writer is None and not notes


# ---------------------------------------------------------------------------------------------
# --group_by_modality_length
# ---------------------------------------------------------------------------------------------

class WithLengths(list):
    """A list of samples that also exposes VITA's signed ``modality_lengths`` (text-only: negative)."""

    @property
    def modality_lengths(self) -> list[int]:
        return [-len(sample.input_ids) for sample in self]


def test_group_by_modality_length_needs_modality_lengths(dist, tmp_path):
    cfg = make_config(tmp_path, group_by_modality_length=True)
    with pytest.raises(ValueError, match="--group_by_modality_length True needs .*modality_lengths"):
        make_trainer(dist, cfg, make_model(), pair_samples(8))


def test_group_by_modality_length_uses_the_grouped_sampler_for_a_whole_epoch(dist, tmp_path):
    from vitacore.data.grouped_sampler import ModalityLengthGroupedSampler

    cfg = make_config(tmp_path, group_by_modality_length=True, max_steps=-1, num_train_epochs=1.0,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2)
    model = make_model()
    seen = count_training_samples(model)
    train = WithLengths(pair_samples(10, lengths=[4, 12, 6, 10, 8, 4, 12, 6, 10, 8]))
    trainer = make_trainer(dist, cfg, model, train)
    assert isinstance(trainer.sampler, ModalityLengthGroupedSampler)
    trainer.fit()
    assert sum(seen) == 10  # one epoch: every sample once
