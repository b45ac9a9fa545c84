"""The engine: DeepSpeed set-up and the training loop."""

from vitacore.engine.distributed import DistInfo, init_distributed
from vitacore.engine.ds_config import builtin_config, complete_config, resolve_deepspeed_config, zero_stage
from vitacore.engine.loop import NonFiniteLossError, Trainer, TrainResult
from vitacore.engine.schedule import lr_multiplier

__all__ = [
    "DistInfo", "NonFiniteLossError", "Trainer", "TrainResult", "builtin_config",
    "complete_config", "init_distributed", "lr_multiplier", "resolve_deepspeed_config", "zero_stage",
]
