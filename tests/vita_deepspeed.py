"""VITA-1.5's DeepSpeed files, as data: ``script/deepspeed/zero3.json`` (the ``--deepspeed`` of every stage
script) and ``zero2.json``, verbatim. Neither has a ``gradient_clipping`` key, so VITA's runs do not clip."""

import copy

_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
    },
}
_ZERO2 = {
    **{key: value for key, value in _ZERO3.items() if key != "zero_optimization"},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "reduce_bucket_size": "auto"},
}


def vita_zero3() -> dict:
    """A fresh copy of VITA's zero3.json."""
    return copy.deepcopy(_ZERO3)


def vita_zero2() -> dict:
    """A fresh copy of VITA's zero2.json."""
    return copy.deepcopy(_ZERO2)
