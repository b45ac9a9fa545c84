"""``--optim`` as the HF Trainer reads it: ``adamw_torch`` is ``torch.optim.AdamW``, ``adamw_torch_fused`` the
same with ``fused=True`` (torch 2.4+ has the fused kernel on CPU too); every other name is refused.

Each accepted value trains one real step with DeepSpeed (ZeRO-0 built in, and ZeRO-3 through VITA's
``zero3.json``) and lands where a plain-PyTorch AdamW step lands.
"""

import json

import pytest
import torch
from test_ds_config_hf import VITA_ZERO3, gathered
from test_loop import HIDDEN, PAD, make_config, make_model, make_trainer, pair_samples, param_groups, reference_step

import vitacore.engine.optimizer as optimizer_module
from vitacore.checkpoint import Checkpointer
from vitacore.config import ConfigError, parse_args
from vitacore.data.dataset import Collator
from vitacore.engine import OptimConfig, Trainer, resolve_deepspeed_config
from vitacore.recipes.specs import optim_config

ACCEPTED = {"adamw_torch": False, "adamw_torch_fused": True}  # --optim -> fused
REFUSED = ["adamw", "adafactor", "sgd", "adamw_bnb_8bit", "paged_adamw_8bit", "adamw_apex_fused", "adamw_torch_xla",
           "adamw_torch_npu_fused", "lion_32bit", "rmsprop"]


def torch_optimizer(trainer: Trainer) -> torch.optim.Optimizer:
    """The torch optimizer inside the engine (ZeRO wraps it; ZeRO-0 in fp32 uses it as is)."""
    optimizer = trainer.engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def build(dist, tmp_path, optim, deepspeed=None, **fields):
    """A one-step run: 8 samples in one micro-batch, eps 1 (the update scales with the gradient), no clipping."""
    cfg = make_config(tmp_path, max_steps=1, per_device_train_batch_size=8, learning_rate=0.05, adam_epsilon=1.0,
                      max_grad_norm=0.0, optim=optim, **fields)
    model, samples = make_model(), pair_samples(8, 10, seed=5)
    if deepspeed is None:
        return make_trainer(dist, cfg, model, samples), samples
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(deepspeed))
    ds_config, _ = resolve_deepspeed_config(str(path), loop=cfg.loop, optim=cfg.optim, world_size=dist.world_size,
                                            hidden_size=HIDDEN)
    trainer = Trainer(model, param_groups(model, 0.05), samples, Collator(PAD), dist, loop=cfg.loop, optim=cfg.optim,
                      deepspeed_config=ds_config, checkpointer=Checkpointer(cfg.checkpoint, dist))
    return trainer, samples


@pytest.mark.parametrize("zero", ["builtin-zero0", "vita-zero3"])
@pytest.mark.parametrize("optim", sorted(ACCEPTED))
def test_each_accepted_optim_builds_its_adamw_and_trains_a_step(dist, tmp_path, optim, zero):
    trainer, samples = build(dist, tmp_path, optim, deepspeed=VITA_ZERO3 if zero == "vita-zero3" else None)
    inner = torch_optimizer(trainer)
    assert type(inner) is torch.optim.AdamW
    assert inner.defaults["fused"] is (True if ACCEPTED[optim] else None)
    assert all(group["fused"] is inner.defaults["fused"] for group in inner.param_groups)
    assert inner.defaults["eps"] == 1.0 and inner.defaults["betas"] == (0.9, 0.999)

    result = trainer.fit()
    assert result.num_steps == 1
    _, ref_norm, expected = reference_step(make_model(), samples, lr=0.05, eps=1.0)
    assert result.rows[0]["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    after = gathered(trainer.model)
    for name, value in expected.items():  # the fused kernel and the for-each one agree to float rounding
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert all(state["step"] == 1 for state in inner.state.values())


def test_fused_is_refused_on_a_device_without_the_kernel(dist, tmp_path, monkeypatch):
    monkeypatch.setattr(optimizer_module, "_fused_adamw_devices", lambda: ["cuda", "xpu"])
    with pytest.raises(ValueError) as err:
        build(dist, tmp_path, "adamw_torch_fused")
    message = str(err.value)
    assert "--optim adamw_torch_fused" in message and "cuda, xpu" in message and "cpu" in message
    assert "--optim adamw_torch" in message


def test_cpu_has_the_fused_adamw_kernel():
    assert "cpu" in optimizer_module._fused_adamw_devices()


@pytest.mark.parametrize("name", REFUSED)
def test_other_optimizers_are_refused_naming_the_flag_and_the_choices(name):
    for raise_it, error in ((lambda: OptimConfig(optim=name), ValueError),
                            (lambda: parse_args(["--optim", name]), ConfigError)):
        with pytest.raises(error) as err:
            raise_it()
        message = str(err.value)
        assert f"--optim {name!r}" in message and "adamw_torch " in message and "adamw_torch_fused" in message


@pytest.mark.parametrize("optim", sorted(ACCEPTED))
def test_the_flag_reaches_the_engine_config(optim):
    assert optim_config(parse_args(["--optim", optim])).optim == optim
    assert OptimConfig().optim == "adamw_torch"  # the HF Trainer's default


def test_a_deepspeed_optimizer_block_wins_over_optim_with_a_note(dist, tmp_path):
    block = {"type": "AdamW", "params": {"lr": "auto", "eps": "auto", "torch_adam": True}}
    trainer, _ = build(dist, tmp_path, "adamw_torch_fused", deepspeed={"zero_optimization": {"stage": 0},
                                                                       "optimizer": block})
    assert [n for n in trainer.notes if "--optim adamw_torch_fused is not used" in n and "AdamW" in n]
