"""Tests for vitacore.engine.ds_config: built-in config and filling "auto" values.

tests/engine/test_ds_config_hf.py compares the filling with transformers' own HfTrainerDeepSpeedConfig.
"""

import copy
import json

import pytest
from vita_deepspeed import vita_zero3

from vitacore.engine import LoopConfig, OptimConfig
from vitacore.engine.ds_config import builtin_config, complete_config, load_user_config

HIDDEN = 64


_LOOP_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps")
_PRECISION_FIELDS = ("bf16", "fp16")


def _training(**overrides):
    """The run's settings as complete_config takes them: {loop, optim, bf16, fp16}."""
    values = dict(bf16=True, fp16=False, per_device_train_batch_size=4, gradient_accumulation_steps=3,
                  learning_rate=2e-4, weight_decay=0.01, max_grad_norm=0.5, adam_beta1=0.8, adam_beta2=0.95,
                  adam_epsilon=1e-6)
    values.update(overrides)
    loop = {k: values.pop(k) for k in _LOOP_FIELDS}
    precision = {k: values.pop(k) for k in _PRECISION_FIELDS}
    return dict(loop=LoopConfig(**loop), optim=OptimConfig(**values), **precision)


def _complete(raw, training=None, world_size=2, total_steps=100, warmup_steps=10):
    return complete_config(raw, **(training or _training()), world_size=world_size, hidden_size=HIDDEN,
                           total_steps=total_steps, warmup_steps=warmup_steps, source="--deepspeed zero3.json")


def _autos(obj, path=""):
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _autos(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _autos(v, f"{path}[{i}]")]
    return [path] if obj == "auto" else []


@pytest.mark.parametrize("world_size,stage", [(1, 0), (2, 2), (8, 2)])
def test_builtin_config_stage(world_size, stage):
    cfg = builtin_config(world_size)
    assert cfg["zero_optimization"]["stage"] == stage


def test_zero3_autos_are_all_filled():
    cfg = _complete(vita_zero3(), world_size=2)
    assert _autos(cfg) == []
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 2 * 4 * 3
    assert cfg["bf16"]["enabled"] is True
    assert cfg["fp16"]["enabled"] is False
    assert cfg["gradient_clipping"] == 0  # VITA's zero3.json has none: no clipping, as in VITA's runs
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == HIDDEN * HIDDEN
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)
    assert zero["stage3_param_persistence_threshold"] == 10 * HIDDEN
    # explicit values are kept as written
    assert zero["stage3_max_live_parameters"] == 1e9
    assert cfg["fp16"]["initial_scale_power"] == 16


def test_fp16_flag_enables_fp16_section():
    cfg = _complete(vita_zero3(), training=_training(bf16=False, fp16=True))
    assert cfg["fp16"]["enabled"] is True and cfg["bf16"]["enabled"] is False


@pytest.mark.parametrize("world_size,micro,accum", [(1, 1, 1), (4, 2, 8), (3, 5, 2)])
def test_train_batch_size_is_world_times_micro_times_accum(world_size, micro, accum):
    training = _training(per_device_train_batch_size=micro, gradient_accumulation_steps=accum)
    cfg = _complete(vita_zero3(), training=training, world_size=world_size)
    assert cfg["train_batch_size"] == world_size * micro * accum


def test_input_dict_is_not_mutated():
    raw = vita_zero3()
    raw["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    raw["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}
    before = copy.deepcopy(raw)
    cfg = _complete(raw)
    assert raw == before
    assert cfg is not raw and cfg["zero_optimization"] is not raw["zero_optimization"]


def test_consistent_explicit_values_are_accepted():
    raw = vita_zero3()
    raw.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=3, train_batch_size=24,
               gradient_clipping=0.5)
    raw["bf16"]["enabled"] = True
    cfg = _complete(raw, world_size=2)
    assert cfg["train_batch_size"] == 24


@pytest.mark.parametrize("mutate,key,flag", [
    (lambda c: c.update(train_micro_batch_size_per_gpu=16), "train_micro_batch_size_per_gpu",
     "--per_device_train_batch_size"),
    (lambda c: c.update(gradient_accumulation_steps=1), "gradient_accumulation_steps", "--gradient_accumulation_steps"),
    (lambda c: c.update(train_batch_size=64), "train_batch_size", "--per_device_train_batch_size"),
    (lambda c: c.update(gradient_clipping=1.0), "gradient_clipping", "--max_grad_norm"),
    (lambda c: c["bf16"].update(enabled=False), "enabled", "--bf16"),
    (lambda c: c["fp16"].update(enabled=True), "enabled", "--fp16"),
    (lambda c: c.update(optimizer={"type": "AdamW", "params": {"lr": 1e-3}}), "lr", "--learning_rate"),
    (lambda c: c.update(optimizer={"type": "AdamW", "params": {"weight_decay": 0.0}}), "weight_decay",
     "--weight_decay"),
])
def test_contradicting_explicit_value_names_key_and_flag(mutate, key, flag):
    raw = vita_zero3()
    mutate(raw)
    with pytest.raises(ValueError) as err:
        _complete(raw)
    message = str(err.value)
    assert key in message
    assert flag in message
    assert "zero3.json" in message


def test_optimizer_and_scheduler_autos_are_filled():
    raw = vita_zero3()
    raw["optimizer"] = {"type": "AdamW",
                        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    raw["scheduler"] = {"type": "WarmupDecayLR",
                        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                   "warmup_num_steps": "auto", "total_num_steps": "auto"}}
    cfg = _complete(raw, total_steps=250, warmup_steps=12)
    assert _autos(cfg) == []
    assert cfg["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.01}
    assert cfg["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 2e-4,
                                          "warmup_num_steps": 12, "total_num_steps": 250}


def test_scheduler_warmup_is_at_least_one_step():
    raw = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}
    cfg = _complete(raw, warmup_steps=0)
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 1


def test_explicit_scheduler_values_are_kept_when_they_agree_and_refused_when_not():
    raw = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 20, "warmup_max_lr": 2e-4}}}
    assert _complete(raw, warmup_steps=20)["scheduler"]["params"] == {"warmup_num_steps": 20, "warmup_max_lr": 2e-4}
    raw["scheduler"]["params"].update(warmup_num_steps=7, warmup_max_lr=3e-3)
    with pytest.raises(ValueError) as err:
        _complete(raw, warmup_steps=20)
    assert "warmup_num_steps=7" in str(err.value) and "warmup_max_lr=0.003" in str(err.value)
    assert "--learning_rate" in str(err.value) and "--warmup_steps" in str(err.value)


def test_missing_keys_stay_missing_except_batch_keys_and_clipping():
    raw = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
           "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}
    cfg = _complete(raw)
    assert cfg["gradient_clipping"] == 0  # not --max_grad_norm, and not DeepSpeed's own default of 1.0
    assert cfg["optimizer"]["params"] == {"lr": 2e-4}  # betas / eps / weight_decay: DeepSpeed's defaults
    # The batch keys are vitacore's exception: filled even when missing (the loop owns the boundary).
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 3)


@pytest.mark.parametrize("bf16,fp16,sections", [
    (True, False, {"bf16": {"enabled": True}, "fp16": {"enabled": False}}),
    (False, True, {"bf16": {"enabled": False}, "fp16": {"enabled": True, "auto_cast": True}}),
    (False, False, {"bf16": {"enabled": False}, "fp16": {"enabled": False}}),
])
def test_missing_precision_sections_as_accelerate_sets_them(bf16, fp16, sections):
    cfg = _complete({"zero_optimization": {"stage": 2}}, training=_training(bf16=bf16, fp16=fp16))
    assert {k: cfg[k] for k in ("bf16", "fp16")} == sections


def test_every_contradiction_is_reported_at_once():
    raw = vita_zero3()
    raw.update(gradient_clipping=2.0, optimizer={"type": "AdamW", "params": {"lr": 1.0, "eps": 0.1}})
    with pytest.raises(ValueError) as err:
        _complete(raw)
    for text in ("gradient_clipping=2.0", "--max_grad_norm", "optimizer.params.lr=1.0", "optimizer.params.eps=0.1",
                 "--adam_epsilon", '"auto"'):
        assert text in str(err.value)


def test_builtin_config_completes_without_zero3_keys():
    cfg = complete_config(builtin_config(1), **_training(bf16=False), world_size=1, hidden_size=HIDDEN,
                          total_steps=10, warmup_steps=0)
    assert cfg["zero_optimization"] == {"stage": 0}
    assert cfg["gradient_clipping"] == 0.5  # --max_grad_norm, as the HF Trainer clips without DeepSpeed
    assert cfg["train_batch_size"] == 4 * 3
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert "optimizer" not in cfg and "scheduler" not in cfg


def test_load_user_config_round_trip_and_errors(tmp_path):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(vita_zero3()))
    assert load_user_config(str(path)) == vita_zero3()
    with pytest.raises(FileNotFoundError, match="--deepspeed"):
        load_user_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{\n "zero_optimization": {"stage": 3,}\n}')
    with pytest.raises(ValueError) as err:
        load_user_config(str(bad))
    assert "--deepspeed" in str(err.value) and "bad.json" in str(err.value) and "line 2" in str(err.value)


def test_completed_zero3_config_parses_in_deepspeed():
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    cfg = _complete(vita_zero3(), world_size=1)
    parsed = ds_config.DeepSpeedConfig(cfg)  # also checks batch = world x micro x accum
    assert parsed.train_batch_size == 12
    assert parsed.train_micro_batch_size_per_gpu == 4
    assert parsed.gradient_accumulation_steps == 3
    assert parsed.zero_optimization_stage == 3
    assert parsed.zero_config.reduce_bucket_size == HIDDEN * HIDDEN
