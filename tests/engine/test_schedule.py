"""Tests for vitacore.engine.schedule."""

import math

import pytest
import torch

from vitacore.engine.schedule import SCHEDULES, lr_multiplier, warmup_steps_for

TOTAL, WARMUP = 20, 5


def _values(schedule, warmup=WARMUP, total=TOTAL):
    factor = lr_multiplier(schedule, warmup, total)
    return [factor(step) for step in range(total + 1)]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant_with_warmup"])
def test_warmup_ramps_up_monotonically_to_below_one(schedule):
    values = _values(schedule)[:WARMUP]
    assert all(0 < v < 1 for v in values)
    assert all(b > a for a, b in zip(values, values[1:]))
    # the first post-warmup step is the peak
    assert lr_multiplier(schedule, WARMUP, TOTAL)(WARMUP) == pytest.approx(1.0)


def test_cosine_follows_half_cosine_and_ends_at_zero():
    factor = lr_multiplier("cosine", WARMUP, TOTAL)
    for step in range(WARMUP, TOTAL + 1):
        progress = (step - WARMUP) / (TOTAL - WARMUP)
        assert factor(step) == pytest.approx((1 + math.cos(math.pi * progress)) / 2)
    assert factor(TOTAL) == pytest.approx(0.0, abs=1e-12)
    mid = WARMUP + (TOTAL - WARMUP) / 2
    assert factor(mid) == pytest.approx(0.5)
    # never below zero, even past the end
    assert factor(TOTAL + 7) == pytest.approx(0.0, abs=1e-12)


def test_linear_decays_linearly_to_zero():
    factor = lr_multiplier("linear", WARMUP, TOTAL)
    decay = [factor(step) for step in range(WARMUP, TOTAL + 1)]
    diffs = [b - a for a, b in zip(decay, decay[1:])]
    assert all(d == pytest.approx(-1 / (TOTAL - WARMUP)) for d in diffs)
    assert factor(TOTAL) == pytest.approx(0.0, abs=1e-12)
    assert factor(TOTAL + 3) == 0.0


def test_constant_is_one_throughout_without_warmup():
    assert _values("constant") == [1.0] * (TOTAL + 1)


def test_constant_with_warmup_ramps_then_stays_at_one():
    values = _values("constant_with_warmup")
    assert values[WARMUP:] == [1.0] * (TOTAL + 1 - WARMUP)
    assert values[0] < values[WARMUP - 1] < 1.0


def test_zero_warmup_starts_at_peak():
    for schedule in SCHEDULES:
        assert lr_multiplier(schedule, 0, TOTAL)(0) == pytest.approx(1.0), schedule


def test_warmup_steps_for_prefers_explicit_steps():
    assert warmup_steps_for(100, 7, 0.5) == 7
    assert warmup_steps_for(100, 1, 0.0) == 1


@pytest.mark.parametrize("total,ratio,expected", [
    (100, 0.03, 3),   # exact
    (10, 0.25, 3),    # 2.5 rounds up
    (7, 0.1, 1),      # 0.7 rounds up
    (1000, 0.0, 0),   # no warmup
    (40, 0.5, 20),
])
def test_warmup_steps_for_ratio_rounds_up(total, ratio, expected):
    got = warmup_steps_for(total, 0, ratio)
    assert isinstance(got, int)
    assert got == expected


def test_unknown_schedule_names_the_flag():
    with pytest.raises(ValueError) as err:
        lr_multiplier("polynomial", 0, 10)
    message = str(err.value)
    assert "--lr_scheduler_type" in message and "'polynomial'" in message
    for name in SCHEDULES:
        assert name in message


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_per_group_learning_rates_survive_lambdalr(schedule):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    base = [1e-3, 5e-5]
    optimizer = torch.optim.AdamW([{"params": [a], "lr": base[0]}, {"params": [b], "lr": base[1]}])
    factor = lr_multiplier(schedule, 3, 12)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for step in range(12):
        for group, lr in zip(optimizer.param_groups, base):
            assert group["lr"] == pytest.approx(lr * factor(step)), (step, group["lr"])
        (a.sum() + b.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
