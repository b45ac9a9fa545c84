"""The engine: distributed set-up, DeepSpeed configuration, and the Trainer (fit -> train_step -> evaluate)."""

from vitacore.engine.config import LoopConfig, OptimConfig
from vitacore.engine.distributed import DistInfo, init_distributed
from vitacore.engine.ds_config import builtin_config, complete_config, resolve_deepspeed_config, zero_stage
from vitacore.engine.schedule import SCHEDULES, build_scheduler, warmup_steps_for
from vitacore.engine.trainer import NonFiniteLossError, StepOutcome, Trainer, TrainResult

__all__ = [
    "DistInfo", "LoopConfig", "NonFiniteLossError", "OptimConfig", "StepOutcome", "Trainer", "TrainResult",
    "SCHEDULES", "build_scheduler", "builtin_config", "complete_config", "init_distributed",
    "resolve_deepspeed_config", "warmup_steps_for", "zero_stage",
]
