"""Skipping rules: which of a token's k routed slots to drop at one MoE layer.

A rule sees one layer's `Routing` (combination weights pi before any constant routed-scaling
factor, expert ids, modality codes, and what token-aware baselines need) and returns a boolean
mask. The wrapper never lets any rule skip special tokens or padding (codes OTHER and PAD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from modes.adapters.registry import MODALITIES
from modes.engine.tokens import NUM_CODES
from modes.plan import SkipPlan

__all__ = ["Routing", "SkipRule", "ThresholdRule"]


@dataclass(frozen=True)
class Routing:
    """What one experts call routed, as a rule sees it (T tokens, k slots, H hidden)."""

    pi: torch.Tensor  # [T, k] float, combination weights without the routed-scaling factor
    index: torch.Tensor  # [T, k] long, expert id of each slot
    codes: torch.Tensor  # [T] long, modality code of each token
    hidden: torch.Tensor | None = None  # [T, H], the experts' input
    attention_received: torch.Tensor | None = None  # [T], prefill only, when a rule asked for it
    sequence: torch.Tensor | None = None  # [T] long, the batch row of each token

    @classmethod
    def of(cls, pi: torch.Tensor, codes: torch.Tensor | None = None) -> Routing:
        """Router outputs alone (tests, benchmarks): slots routed to experts 0..k-1, text tokens."""
        index = torch.arange(pi.shape[1], device=pi.device).expand(pi.shape[0], -1)  # [T, k]
        if codes is None:
            codes = torch.zeros(pi.shape[0], dtype=torch.long, device=pi.device)
        return cls(pi, index, codes)


class SkipRule(Protocol):
    def skip_mask(self, routing: Routing) -> torch.Tensor:
        """[T, k] bool, True = skip the slot."""
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

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        pi, codes = routing.pi, routing.codes
        if self.alpha_by_code.device != pi.device:
            self.alpha_by_code = self.alpha_by_code.to(pi.device)
            self.tau_by_code = self.tau_by_code.to(pi.device)
        alpha = self.alpha_by_code[codes].unsqueeze(1)  # [T, 1]
        tau = self.tau_by_code[codes].unsqueeze(1)  # [T, 1]
        return alpha * pi.float() < tau  # [T, k]
