"""The engine's learning-rate schedules equal transformers' ``get_scheduler`` step for step, with the HF
Trainer's warm-up arithmetic, and every param group keeps its own base LR."""

import json
import math

import pytest
import torch

import vitacore
from vitacore.engine.schedule import SCHEDULES, build_scheduler, warmup_steps_for

TOTAL_STEPS, WARMUP_RATIO = 100, 0.07
BASE_LRS = {"body": 1e-3, "head": 2.5e-4}
# Arguments the schedules take beyond warm-up and length (two of them need some).
KWARGS = {"cosine_with_restarts": {"num_cycles": 3}, "polynomial": {"power": 2.0, "lr_end": 1e-7},
          "cosine_with_min_lr": {"min_lr_rate": 0.1}, "warmup_stable_decay": {"num_decay_steps": 30}}


class TwoPart(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def forward(self, features, labels):
        return {"loss": torch.nn.functional.mse_loss(self.head(torch.tanh(self.body(features))), labels)}


def collate(items):
    return {"features": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}


def hf_learning_rates(schedule, warmup_steps):
    """What transformers' get_scheduler gives each group after each of the run's optimizer steps."""
    from transformers import get_scheduler

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in BASE_LRS]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, BASE_LRS.values())])
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=TOTAL_STEPS,
                              scheduler_specific_kwargs=KWARGS.get(schedule, {}))
    rates = []
    for _ in range(TOTAL_STEPS):
        optimizer.step()
        scheduler.step()
        rates.append(dict(zip(BASE_LRS, scheduler.get_last_lr())))
    return rates


def test_warmup_steps_follow_the_hf_trainer():
    from transformers import TrainingArguments

    for ratio in (0.0, 0.03, 0.07, 0.5):  # transformers 5 takes a ratio as a warmup_steps below 1
        args = TrainingArguments(output_dir="unused", warmup_steps=ratio, report_to=[])
        assert warmup_steps_for(TOTAL_STEPS, 0, ratio) == args.get_warmup_steps(TOTAL_STEPS), ratio
    assert warmup_steps_for(TOTAL_STEPS, 4, 0.5) == 4  # --warmup_steps wins


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_trainer_learning_rates_equal_get_scheduler(schedule, dist, tmp_path):
    torch.manual_seed(0)
    model = TwoPart()
    groups = [{"params": list(getattr(model, name).parameters()), "lr": lr, "weight_decay": 0.0, "name": name}
              for name, lr in BASE_LRS.items()]
    data = [(torch.randn(4), torch.randn(1)) for _ in range(64)]
    loop = vitacore.LoopConfig(max_steps=TOTAL_STEPS, per_device_train_batch_size=4, logging_steps=1,
                               save_strategy="no", plot_loss=False)
    optim = vitacore.OptimConfig(learning_rate=BASE_LRS["body"], lr_scheduler_type=schedule,
                                 warmup_ratio=WARMUP_RATIO, lr_scheduler_kwargs=KWARGS.get(schedule))
    ds_config, _ = vitacore.resolve_deepspeed_config(None, loop=loop, optim=optim, world_size=1, hidden_size=4)
    checkpointer = vitacore.Checkpointer(vitacore.CheckpointConfig(str(tmp_path)), dist)
    vitacore.Trainer(model, groups, data, collate, dist, loop=loop, optim=optim, deepspeed_config=ds_config,
                     checkpointer=checkpointer).fit()
    with open(tmp_path / "metrics.jsonl") as fh:
        logged = [row["lr"] for row in map(json.loads, fh) if "loss" in row]
    expected = hf_learning_rates(schedule, math.ceil(WARMUP_RATIO * TOTAL_STEPS))
    assert len(logged) == TOTAL_STEPS
    for step, (got, want) in enumerate(zip(logged, expected), start=1):
        got = got if isinstance(got, dict) else dict.fromkeys(BASE_LRS, got)
        for name in BASE_LRS:
            assert abs(got[name] - want[name]) <= 1e-12, (schedule, step, name, got[name], want[name])
        if want["body"] > 0:  # the groups keep their ratio at every step
            assert got["head"] / got["body"] == pytest.approx(BASE_LRS["head"] / BASE_LRS["body"], rel=1e-9)
    assert len({round(v["body"], 15) for v in expected}) > 1 or schedule == "constant"  # the schedule moves


def test_a_schedule_without_its_arguments_is_refused_naming_the_flags():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="--lr_scheduler_kwargs"):
        build_scheduler(optimizer, "cosine_with_min_lr", 5, 100, None)
    with pytest.raises(ValueError, match="--lr_scheduler_type 'nope'"):
        build_scheduler(optimizer, "nope", 5, 100)


def test_flags_reach_the_schedule(tmp_path):
    config = vitacore.parse_args(["--lr_scheduler_type", "polynomial", "--lr_scheduler_kwargs", '{"power": 3.0}',
                                  "--output_dir", str(tmp_path)])
    from vitacore.recipes.specs import optim_config

    optim = optim_config(config)
    assert optim.lr_scheduler_type == "polynomial" and optim.lr_scheduler_kwargs == {"power": 3.0}
    with pytest.raises(vitacore.ConfigError, match="--lr_scheduler_kwargs"):
        vitacore.parse_args(["--lr_scheduler_kwargs", "power=3"])
