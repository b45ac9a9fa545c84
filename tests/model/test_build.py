"""Model construction helpers that need no weights."""

from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

from vitacore.model import zero3_construction

ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1}


def test_zero3_construction_is_active_inside_and_restores_a_live_outer_config():
    outer = HfDeepSpeedConfig(ZERO2)  # e.g. what a live TrainingArguments(deepspeed=...) holds
    assert not is_deepspeed_zero3_enabled()
    with zero3_construction(ZERO3):
        assert is_deepspeed_zero3_enabled()
    assert deepspeed_config() is outer.config and not is_deepspeed_zero3_enabled()
    del outer


def test_no_config_means_no_zero3():
    with zero3_construction(None):
        assert not is_deepspeed_zero3_enabled()
