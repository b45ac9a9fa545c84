"""Which parameters train: units, policies, VITA flag translation, param groups, the report.

Importable and testable without DeepSpeed, a GPU or model weights.
"""

from vitacore.freeze.param_groups import (
    build_param_groups,
    no_decay_names,
    param_groups_for_run,
    parse_unit_lr,
    unit_learning_rates,
)
from vitacore.freeze.policy import LORA_BIAS, LORA_MARKER, MODES, FreezePolicy, unit_summary
from vitacore.freeze.report import build_report, format_report
from vitacore.freeze.units import UNITS, assign_units
from vitacore.freeze.vita_flags import policy_from_config, policy_from_flags

__all__ = [
    "LORA_BIAS", "LORA_MARKER", "MODES", "UNITS", "FreezePolicy", "assign_units", "build_param_groups", "build_report",
    "format_report", "no_decay_names", "param_groups_for_run", "parse_unit_lr", "policy_from_config",
    "policy_from_flags", "unit_learning_rates", "unit_summary",
]
