"""Which parameters train: units, policies and the trainable-parameter report."""

from vitacore.freeze.policy import MODES, FreezePolicy, unit_summary
from vitacore.freeze.report import build_report, format_report
from vitacore.freeze.units import UNITS, assign_units

__all__ = ["FreezePolicy", "MODES", "UNITS", "assign_units", "build_report", "format_report", "unit_summary"]
