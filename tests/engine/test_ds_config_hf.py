"""vitacore's DeepSpeed config filling against transformers' own ``HfTrainerDeepSpeedConfig``, on the same input.

The HF side is run as the HF Trainer runs it: ``trainer_config_process(args)`` (TrainingArguments),
accelerate's ``DeepSpeedPlugin(...).set_mixed_precision`` (the Accelerator), then
``trainer_config_finalize(args, model, num_training_steps)`` (``deepspeed_init``). Every key the HF
side ends with must have the same value in vitacore's config. vitacore may add only:

- ``steps_per_print`` (quiet logs);
- MISSING batch keys (``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
  ``train_batch_size``): vitacore fills them from the flags because its loop must agree with DeepSpeed's
  accumulation boundary, where HF leaves them out and accelerate sets ``gradient_accumulation_steps`` to 1;
- a MISSING ``gradient_clipping``, as 0: HF leaves it to DeepSpeed's default, 0 (no clipping) when VITA
  trained but 1.0 in recent DeepSpeed (deepspeedai/DeepSpeed#8068); the explicit 0 keeps VITA's behaviour.

The last tests train with VITA's files: without ``gradient_clipping`` DeepSpeed does not clip, and the
logged ``grad_norm`` is still the (finite) pre-step norm.
"""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from test_loop import (
    HIDDEN,
    PAD,
    make_config,
    make_model,
    make_trainer,
    pair_samples,
    param_groups,
    params_of,
    read_metrics,
    reference_step,
)
from vita_deepspeed import vita_zero2, vita_zero3

from vitacore.checkpoint import Checkpointer
from vitacore.data.dataset import Collator
from vitacore.engine import LoopConfig, OptimConfig, Trainer, resolve_deepspeed_config
from vitacore.engine.ds_config import complete_config

# VITA's script/deepspeed/zero3.json and zero2.json, verbatim (note: no gradient_clipping).
VITA_ZERO3, VITA_ZERO2 = vita_zero3(), vita_zero2()
AUTO_OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
AUTO_SCHEDULER = {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_min_lr": "auto",
                                                      "warmup_max_lr": "auto", "warmup_num_steps": "auto"}}
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
RUN = dict(world_size=2, micro=4, accum=3, max_grad_norm=0.5, lr=2e-4, beta1=0.8, beta2=0.95, eps=1e-6, decay=0.01,
           hidden=64, total_steps=100, warmup_steps=10)


def with_(base: dict, **top) -> dict:
    raw = copy.deepcopy(base)
    raw.update(copy.deepcopy(top))
    return raw


def hf_complete(raw: dict, bf16: bool, fp16: bool) -> dict:
    """What the HF Trainer (with accelerate) makes of ``raw`` for the run ``RUN``."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = SimpleNamespace(
        world_size=RUN["world_size"], per_device_train_batch_size=RUN["micro"],
        gradient_accumulation_steps=RUN["accum"], max_grad_norm=RUN["max_grad_norm"], learning_rate=RUN["lr"],
        adam_beta1=RUN["beta1"], adam_beta2=RUN["beta2"], adam_epsilon=RUN["eps"], weight_decay=RUN["decay"],
        save_on_each_node=False, fp16=fp16, fp16_full_eval=False, bf16=bf16, bf16_full_eval=False,
        get_warmup_steps=lambda num_training_steps: RUN["warmup_steps"])
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=RUN["hidden"]))
    hf = HfTrainerDeepSpeedConfig(copy.deepcopy(raw))  # a global weakref: unset below, or from_pretrained sees it
    try:
        hf.trainer_config_process(args)
        DeepSpeedPlugin(hf_ds_config=hf).set_mixed_precision("bf16" if bf16 else "fp16" if fp16 else "no")
        hf.trainer_config_finalize(args, model, RUN["total_steps"])
        return copy.deepcopy(hf.config)
    finally:
        unset_hf_deepspeed_config()


def vitacore_complete(raw: dict, bf16: bool, fp16: bool) -> dict:
    loop = LoopConfig(per_device_train_batch_size=RUN["micro"], gradient_accumulation_steps=RUN["accum"])
    optim = OptimConfig(learning_rate=RUN["lr"], weight_decay=RUN["decay"], adam_beta1=RUN["beta1"],
                        adam_beta2=RUN["beta2"], adam_epsilon=RUN["eps"], max_grad_norm=RUN["max_grad_norm"])
    return complete_config(raw, loop=loop, optim=optim, bf16=bf16, fp16=fp16, world_size=RUN["world_size"],
                           hidden_size=RUN["hidden"], total_steps=RUN["total_steps"],
                           warmup_steps=RUN["warmup_steps"], source="--deepspeed ds.json")


def leaves(obj, path=()):
    if isinstance(obj, dict):
        return {p: v for k, sub in obj.items() for p, v in leaves(sub, path + (k,)).items()}
    return {path: obj}


def assert_agrees_with_hf(raw: dict, bf16: bool = True, fp16: bool = False) -> tuple[dict, dict]:
    hf, ours = hf_complete(raw, bf16, fp16), vitacore_complete(raw, bf16, fp16)
    hf_leaves, our_leaves = leaves(hf), leaves(ours)
    for path, value in hf_leaves.items():
        if path == ("steps_per_print",):
            continue  # accelerate's inf; vitacore's 10**9
        if path in {(k,) for k in BATCH_KEYS} and path[0] not in raw:
            continue  # the batch-key exception (module docstring)
        assert path in our_leaves and our_leaves[path] == value, (path, our_leaves.get(path), value)
    extra = set(our_leaves) - set(hf_leaves)
    allowed = {("steps_per_print",)} | {(k,) for k in BATCH_KEYS if k not in raw}
    if "gradient_clipping" not in raw:
        assert ours["gradient_clipping"] == 0.0
        allowed.add(("gradient_clipping",))
    assert extra <= allowed, extra
    return hf, ours


@pytest.mark.parametrize("bf16,fp16", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("name,raw", [("zero3", VITA_ZERO3), ("zero2", VITA_ZERO2)])
def test_vita_files_are_filled_as_the_hf_trainer_fills_them(name, raw, bf16, fp16):
    hf, ours = assert_agrees_with_hf(raw, bf16, fp16)
    assert "gradient_clipping" not in hf and ours["gradient_clipping"] == 0  # VITA's runs do not clip
    assert ours["bf16"]["enabled"] is bf16 and ours["fp16"]["enabled"] is fp16
    assert ours["zero_optimization"]["reduce_bucket_size"] == RUN["hidden"] ** 2


def test_explicit_gradient_clipping_agreeing_with_the_flag_is_kept():
    hf, ours = assert_agrees_with_hf(with_(VITA_ZERO3, gradient_clipping=RUN["max_grad_norm"]))
    assert ours["gradient_clipping"] == hf["gradient_clipping"] == RUN["max_grad_norm"]


def test_auto_gradient_clipping_optimizer_and_scheduler_are_filled_from_the_flags():
    raw = with_(VITA_ZERO3, gradient_clipping="auto", optimizer=AUTO_OPTIMIZER, scheduler=AUTO_SCHEDULER)
    _, ours = assert_agrees_with_hf(raw)
    assert ours["gradient_clipping"] == RUN["max_grad_norm"]
    assert ours["optimizer"]["params"]["betas"] == [RUN["beta1"], RUN["beta2"]]
    assert ours["scheduler"]["params"]["warmup_num_steps"] == RUN["warmup_steps"]


def test_missing_sections_and_keys_as_hf_and_accelerate_leave_them():
    raw = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    hf, ours = assert_agrees_with_hf(raw, bf16=False, fp16=True)
    assert ours["fp16"] == {"enabled": True, "auto_cast": True} and ours["bf16"] == {"enabled": False}
    assert ours["gradient_clipping"] == 0 and ours["optimizer"]["params"] == {"lr": RUN["lr"]}
    # The batch-key exception, visible: accelerate would train with DeepSpeed's accumulation at 1.
    assert hf["gradient_accumulation_steps"] == 1 and ours["gradient_accumulation_steps"] == RUN["accum"]


@pytest.mark.parametrize("raw,key", [
    (with_(VITA_ZERO3, gradient_clipping=1.0), "gradient_clipping"),
    (with_(VITA_ZERO3, optimizer={"type": "AdamW", "params": {"lr": 1e-3}}), "optimizer.params.lr"),
    (with_(VITA_ZERO3, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 7}}), "warmup_num_steps"),
    (with_(VITA_ZERO3, bf16={"enabled": False}), "bf16.enabled"),
])
def test_a_contradicting_explicit_value_is_refused_by_both(raw, key):
    with pytest.raises(ValueError, match="mismatch"):
        hf_complete(raw, bf16=True, fp16=False)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        vitacore_complete(raw, bf16=True, fp16=False)


def test_a_file_without_gradient_clipping_is_noted(tmp_path):
    path = tmp_path / "zero3.json"
    loop, optim = LoopConfig(), OptimConfig(max_grad_norm=0.3)
    for raw, noted in ((VITA_ZERO3, True), (with_(VITA_ZERO3, gradient_clipping="auto"), False)):
        path.write_text(json.dumps(raw))
        cfg, notes = resolve_deepspeed_config(str(path), loop=loop, optim=optim, world_size=1, hidden_size=HIDDEN)
        note = [n for n in notes if "gradient_clipping" in n]
        assert bool(note) is noted and cfg["gradient_clipping"] == (0.0 if noted else 0.3)
        if noted:
            assert "not clipped" in note[0] and '"gradient_clipping": "auto"' in note[0]
            assert "--max_grad_norm" in note[0]
    _, notes = resolve_deepspeed_config(None, loop=loop, optim=optim, world_size=1, hidden_size=HIDDEN)
    assert not [n for n in notes if "gradient_clipping" in n]


# ---- runs: no clipping, and a finite grad_norm ------------------------------------------------------------

def gathered(model) -> dict:
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return params_of(model)


@pytest.mark.parametrize("name,raw", [("zero3", VITA_ZERO3), ("zero2", VITA_ZERO2)])
def test_a_run_with_a_vita_file_does_not_clip(dist, tmp_path, name, raw):
    """A tiny --max_grad_norm that would bite hard; VITA's file has no gradient_clipping, so nothing clips."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    samples, clip, lr, eps = pair_samples(8, 10, seed=4), 0.05, 0.05, 1.0  # eps 1: the update scales with the grad
    cfg = make_config(tmp_path, max_steps=1, per_device_train_batch_size=8, max_grad_norm=clip, learning_rate=lr,
                      adam_epsilon=eps)
    model = make_model()
    fresh = copy.deepcopy(model)
    ds_config, _ = resolve_deepspeed_config(str(path), loop=cfg.loop, optim=cfg.optim, world_size=dist.world_size,
                                            hidden_size=HIDDEN)
    trainer = Trainer(model, param_groups(model, lr), samples, Collator(PAD), dist, loop=cfg.loop, optim=cfg.optim,
                      deepspeed_config=ds_config, checkpointer=Checkpointer(cfg.checkpoint, dist))
    assert trainer.engine.zero_optimization_stage() == raw["zero_optimization"]["stage"]
    assert trainer.engine.gradient_clipping() == 0
    trainer.fit()
    row = read_metrics(tmp_path)[0]
    ref_loss, ref_norm, unclipped = reference_step(fresh, samples, lr=lr, eps=eps)
    assert ref_norm > 10 * clip
    assert math.isfinite(row["grad_norm"]) and row["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    after = gathered(model)
    for key, value in unclipped.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-5)


def test_builtin_config_without_clipping_logs_a_finite_grad_norm(dist, tmp_path):
    samples = pair_samples(8, 10, seed=4)
    cfg = make_config(tmp_path, max_steps=1, per_device_train_batch_size=8, max_grad_norm=0.0)
    trainer = make_trainer(dist, cfg, make_model(), samples)
    assert trainer.engine.gradient_clipping() == 0 and trainer.ds_config["gradient_clipping"] == 0
    _, ref_norm, _ = reference_step(make_model(), samples, lr=cfg.optim.learning_rate, eps=cfg.optim.adam_epsilon)
    assert trainer.fit().rows[0]["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
