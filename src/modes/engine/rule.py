"""Skipping rules: which of a token's k routed slots to drop at one MoE layer.

A rule sees the combination weights pi (before any constant routed-scaling factor) and the
modality code of each token, and returns a boolean mask. Codes OTHER and PAD are never skipped.
"""

from __future__ import annotations

from typing import Protocol

import torch

from modes.adapters.registry import MODALITIES
from modes.engine.tokens import NUM_CODES
from modes.plan import SkipPlan

__all__ = ["SkipRule", "ThresholdRule"]


class SkipRule(Protocol):
    def skip_mask(self, pi: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``pi`` [T, k] float, ``codes`` [T] long -> [T, k] bool, True = skip the slot."""
        ...


class ThresholdRule:
    """MoDES (GMLG + DMT): skip slot i of token x iff alpha_m(l) * pi_i < tau_m."""

    def __init__(self, alpha: dict[str, float], tau: dict[str, float]):
        never = float("-inf")  # s >= 0 > -inf: the slot is kept
        alpha_by_code = torch.zeros(NUM_CODES, dtype=torch.float32)
        tau_by_code = torch.full((NUM_CODES,), never, dtype=torch.float32)
        for code, modality in enumerate(MODALITIES):
            if modality in tau:
                alpha_by_code[code] = alpha[modality]
                tau_by_code[code] = tau[modality]
        self.alpha_by_code = alpha_by_code  # [C]
        self.tau_by_code = tau_by_code  # [C]

    @classmethod
    def from_plan(cls, plan: SkipPlan, layer: int) -> ThresholdRule:
        return cls(plan.importance[layer], plan.thresholds)

    def skip_mask(self, pi: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.alpha_by_code.device != pi.device:
            self.alpha_by_code = self.alpha_by_code.to(pi.device)
            self.tau_by_code = self.tau_by_code.to(pi.device)
        alpha = self.alpha_by_code[codes].unsqueeze(1)  # [T, 1]
        tau = self.tau_by_code[codes].unsqueeze(1)  # [T, 1]
        return alpha * pi.float() < tau  # [T, k]
