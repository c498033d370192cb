"""Calibration: the calibration set shared by every step, and the global importance alpha of
each MoE layer per modality."""

from modes.calibration.calibration_set import CalibrationSet, PlanMeasurement, measure
from modes.calibration.importance import Importance, calibrate

__all__ = ["CalibrationSet", "Importance", "PlanMeasurement", "calibrate", "measure"]
