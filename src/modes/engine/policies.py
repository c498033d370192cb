"""Baseline skipping policies that share the MoDES engine (algorithm.md section 5).

Each policy is a `SkipRule` built from a plan's ``method`` and ``parameters``; all skip only
among a token's k routed slots, and the wrapper never lets any of them skip special tokens.

- ``k_reduction``: keep the top k' slots (``{"keep": k'}``); ratio exactly 1 - k'/k.
- ``naee``: NAEE generalised to top-k as the MoDES paper re-implemented it: with the token's
  weights sorted pi_1 >= ... >= pi_k, skip ranks i..k for the smallest i >= 2 whose tail sum
  is below beta(l) times the total. ``{"beta": {layer: median pi_2 / pi_1}, "scale": s}``,
  s found by bisection to reach a target ratio (the paper used a genetic search).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from modes.engine.rule import SkipRule, ThresholdRule
from modes.plan import PlanError, SkipPlan

__all__ = ["KReduction", "NaeeRule", "parameter_layers", "rule_for", "validate_parameters"]


def _ranks(pi: torch.Tensor) -> torch.Tensor:
    """0-based rank of each slot by weight, largest first ([T, k]); routers need not sort."""
    return pi.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


class KReduction:
    def __init__(self, keep: int):
        self.keep = keep

    def skip_mask(self, pi: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return _ranks(pi) >= self.keep  # [T, k]


class NaeeRule:
    def __init__(self, beta: float):
        self.beta = beta

    def skip_mask(self, pi: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        ordered, order = pi.float().sort(dim=1, descending=True)  # [T, k]
        tail = ordered.flip(1).cumsum(1).flip(1)  # [T, k] sum of ranks r..k
        total = tail[:, :1]  # [T, 1]
        skip_sorted = tail < self.beta * total
        skip_sorted[:, 0] = False  # the top-1 expert is always kept (i >= 2)
        return torch.zeros_like(skip_sorted).scatter_(1, order, skip_sorted)


def _naee_beta(parameters: dict[str, Any], layer: int) -> float:
    return float(parameters["beta"][str(layer)]) * float(parameters.get("scale", 1.0))


_FACTORIES: dict[str, Callable[[SkipPlan, int], SkipRule]] = {
    "modes": ThresholdRule.from_plan,
    "k_reduction": lambda plan, layer: KReduction(int(plan.parameters["keep"])),
    "naee": lambda plan, layer: NaeeRule(_naee_beta(plan.parameters, layer)),
}


def rule_for(plan: SkipPlan, layer: int) -> SkipRule:
    return _FACTORIES[plan.method](plan, layer)


def validate_parameters(method: str, parameters: dict[str, Any]) -> None:
    if method not in _FACTORIES:
        raise PlanError(f"unknown method {method!r}; known: {sorted(_FACTORIES)}")
    if method == "k_reduction":
        keep = parameters.get("keep")
        if not isinstance(keep, int) or keep < 0:
            raise PlanError(f"k_reduction needs an integer 'keep' >= 0, got {keep!r}")
    if method == "naee":
        beta = parameters.get("beta")
        if not isinstance(beta, dict) or not beta:
            raise PlanError("naee needs 'beta': {layer: value}")
        values = [*beta.values(), parameters.get("scale", 1.0)]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            raise PlanError(f"naee beta and scale must be finite and >= 0, got {values}")


def parameter_layers(method: str, parameters: dict[str, Any]) -> set[int] | None:
    """Layers a policy's parameters name (None: the policy is layer-independent)."""
    if method == "naee":
        return {int(layer) for layer in parameters["beta"]}
    return None
