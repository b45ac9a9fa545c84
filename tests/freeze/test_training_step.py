"""The policy and the per-unit LRs hold in a real DeepSpeed training run (one process, CPU)."""

import pytest
import torch
from tiny_models import TINY, build_tiny_vita

from vitacore.checkpoint import CheckpointConfig, Checkpointer
from vitacore.config import parse_args
from vitacore.constants import AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vitacore.data.audio import audio_token_length
from vitacore.data.dataset import Collator, Sample
from vitacore.engine import Trainer, resolve_deepspeed_config
from vitacore.freeze import build_report, param_groups_for_run, policy_from_config, unit_learning_rates
from vitacore.model import prepare_for_training
from vitacore.model.multimodal import UNIT_PREFIXES
from vitacore.recipes.specs import loop_config, optim_config
from vitacore.recipes.stages import resolve_stage


def multimodal_samples(count: int) -> list[Sample]:
    """Rows with an image, an audio clip, and text only, so every encoder path runs."""
    generator = torch.Generator().manual_seed(3)
    samples = []
    for i in range(count):
        text = torch.randint(3, TINY["vocab_size"], (8,), generator=generator).tolist()
        kind = i % 3
        media = [IMAGE_TOKEN_INDEX] if kind == 0 else [AUDIO_TOKEN_INDEX] if kind == 1 else []
        ids = text[:2] + media + text[2:]
        labels = [IGNORE_INDEX] * (2 + len(media) + 3) + text[5:]
        images = [torch.randn(3, TINY["image_size"], TINY["image_size"], generator=generator)] if kind == 0 else []
        audios = [torch.randn(40, TINY["mel"], generator=generator)] if kind == 1 else []
        samples.append(Sample(f"s{i}", ids, labels, images, audios,
                              [audio_token_length(40)] if kind == 1 else [], "lang"))
    return samples


def configure(tmp_path, argv):
    cfg = parse_args(argv + ["--output_dir", str(tmp_path), "--logging_steps", "1", "--max_grad_norm", "0"])
    _, cfg = resolve_stage(cfg, embedded_default=False)
    return cfg


def run(dist, cfg, model):
    t = cfg.training
    loop, optim = loop_config(cfg), optim_config(cfg)
    policy = policy_from_config(cfg)
    policy.apply(model, UNIT_PREFIXES)
    groups = param_groups_for_run(model, UNIT_PREFIXES, optim)
    ds_config, _ = resolve_deepspeed_config(t.deepspeed, loop=loop, optim=optim, world_size=dist.world_size,
                                            hidden_size=TINY["llm_hidden"], bf16=t.bf16, fp16=t.fp16)
    # The run-time switches a stage run sets (the stage presets turn gradient checkpointing on).
    prepare_for_training(model, t.gradient_checkpointing, t.tf32, dist.world_size, dist.device)
    checkpointer = Checkpointer(CheckpointConfig(t.output_dir, t.save_total_limit, t.resume_from_checkpoint), dist)
    trainer = Trainer(model, groups, multimodal_samples(6), Collator(pad_token_id=0), dist, loop=loop, optim=optim,
                      deepspeed_config=ds_config, checkpointer=checkpointer)
    return policy, groups, trainer


def test_exactly_the_policys_parameters_change(dist, tmp_path):
    cfg = configure(tmp_path, ["--stage", "1", "--tune_audio_mlp_adapter", "True", "--max_steps", "1",
                               "--per_device_train_batch_size", "6", "--gradient_accumulation_steps", "1",
                               "--learning_rate", "1e-2", "--warmup_ratio", "0"])
    model = build_tiny_vita(seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy, _, trainer = run(dist, cfg, model)
    assert set(policy.trained_units()) == {"mm_projector", "audio_adapter"}
    trainer.fit()
    after = dict(trainer.engine.module.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable == {n for n in before if n.startswith(("mm_projector.", "audio_adapter."))}
    assert changed == trainable


def test_stage3_learning_rates_reach_the_optimizer(dist, tmp_path):
    cfg = configure(tmp_path, ["--stage", "3", "--learning_rate", "2e-5", "--mm_projector_lr", "2e-6",
                               "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "1",
                               "--max_steps", "3", "--per_device_train_batch_size", "2",
                               "--gradient_accumulation_steps", "1"])
    model = build_tiny_vita(seed=5)
    policy, groups, trainer = run(dist, cfg, model)
    report = build_report(model, UNIT_PREFIXES, policy, groups)
    by_unit = {}
    for group in report["param_groups"]:
        for unit in group["units"]:
            by_unit.setdefault(unit, set()).add(group["lr"])
    assert by_unit == {"llm": {2e-5}, "mm_projector": {2e-6}, "vision_tower": {2e-6}}

    seen = []
    trainer.engine.optimizer.register_step_post_hook(
        lambda optimizer, *a: seen.append({g["name"]: g["lr"] for g in optimizer.param_groups}))
    trainer.fit()
    after_warmup = seen[-1]  # the LR used by the last optimizer step, well past the 1 warm-up step
    for name, lr in after_warmup.items():
        unit = name.split(".")[0]
        assert lr == pytest.approx(2e-5 if unit == "llm" else 2e-6, rel=1e-9), (name, lr)
    assert {n.split(".")[0] for n in after_warmup} == {"llm", "mm_projector", "vision_tower"}


def test_vision_tower_lr_and_unit_lr_override(dist, tmp_path):
    rates = unit_learning_rates(1e-3, mm_projector_lr=1e-4, vision_tower_lr=5e-5, unit_lr={"llm": 2e-4})
    assert rates["llm"] == 2e-4 and rates["mm_projector"] == 1e-4 and rates["vision_tower"] == 5e-5
    assert rates["audio_adapter"] == 1e-3
    assert unit_learning_rates(1e-3, mm_projector_lr=1e-4)["vision_tower"] == 1e-4  # defaults to projector LR
    assert unit_learning_rates(1e-3, 1e-4, unit_lr={"vision_tower": 7e-6})["vision_tower"] == 7e-6
