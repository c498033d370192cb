"""Calibration: the global importance alpha of each MoE layer per modality."""

from modes.calibration.importance import Importance, calibrate

__all__ = ["Importance", "calibrate"]
