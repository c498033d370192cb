"""Calibrating the baselines (algorithm.md section 5) to a target skip ratio on calibration data.

NAEE's beta(l) (also MC-MoE's) and DiEP's gamma1 are the per-layer median of pi_top2 / pi_top1;
each of these rules skips monotonically more as its ``scale`` grows, so a bisection on the
scale reaches the target ratio (the papers used a genetic search). k-reduction needs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch

from modes import engine
from modes.adapters.registry import UnsupportedModelError
from modes.calibration.calibration_set import CalibrationSet, measure
from modes.engine import ModelInfo
from modes.engine.rules import Routing
from modes.plan import SkipPlan
from modes.policies import PolicyConfig
from modes.ratios import TargetOf

__all__ = ["median_top2_ratio", "scaled_to_target"]

BISECTION_STEPS = 14


class _TopTwoRatios:
    """A rule that skips nothing and keeps pi_top2 / pi_top1 of every token its layer routes."""

    def __init__(self) -> None:
        self.ratios: list[torch.Tensor] = []

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        top = routing.pi.float().topk(2, dim=1).values  # [T, 2]
        self.ratios.append(top[:, 1] / top[:, 0].clamp_min(1e-20))  # [T]
        return torch.zeros_like(routing.pi, dtype=torch.bool)


@dataclass
class _RecordingPlan:
    """An engine plan of `_TopTwoRatios` rules: the engine hands each layer's routing over
    however the family calls its experts (positional, named, or a dense router)."""

    rules: dict[int, _TopTwoRatios] = field(default_factory=dict)
    special_token_ids: tuple[int, ...] = ()
    renormalize: bool = False

    def rule(self, layer: int) -> _TopTwoRatios:
        return self.rules.setdefault(layer, _TopTwoRatios())

    def check_fits(self, info: ModelInfo) -> None:
        """Built for the model at hand."""


@torch.no_grad()
def median_top2_ratio(model: Any, calibration: CalibrationSet) -> dict[int, float]:
    """Per-layer median of pi_top2 / pi_top1 over the calibration tokens."""
    info = engine.model_info(model)
    if info.top_k < 2:
        raise UnsupportedModelError(
            f"{model.config.model_type} routes each token to {info.top_k} expert: NAEE, MC-MoE and DiEP "
            "compare its two largest routing weights, so they need top-k >= 2 (k_reduction and modes work)"
        )
    plan = _RecordingPlan()
    group = calibration.group

    def my_ratios() -> dict[int, dict[int, torch.Tensor]]:
        per_batch = {}
        with engine.applied(model, plan):
            for index, batch in calibration.mine:
                for rule in plan.rules.values():
                    rule.ratios.clear()
                model(**batch.inputs, use_cache=False)
                per_batch[index] = {layer: torch.cat(rule.ratios).cpu() for layer, rule in plan.rules.items()}
        return per_batch

    every = list(group.gather(my_ratios).values())  # the median of every rank's tokens
    return {layer: float(torch.cat([batch[layer] for batch in every]).median()) for layer in sorted(every[0])}


def scaled_to_target(
    model: Any,
    processor: Any,
    calibration: CalibrationSet,
    config_at: Callable[[float], PolicyConfig],
    target: float,
    info: ModelInfo,
    target_of: TargetOf = TargetOf.SKIPPABLE,
) -> SkipPlan:
    """The plan of ``config_at(scale)`` whose scale reaches ``target`` (a share of the
    ``target_of`` slots) on ``calibration`` (bisection: the smallest scale found that reaches it)."""

    def plan_at(scale: float) -> SkipPlan:
        return SkipPlan(policy=config_at(scale), model=info)

    @cache  # the final scale was usually measured during the bisection
    def ratio_at(scale: float) -> float:
        measured = measure(model, calibration, plan_at(scale), processor=processor, kl=False)
        return measured.ratios.of(target_of)

    low, high = 0.0, 1.0
    while ratio_at(high) < target and high < 1e4:
        low, high = high, high * 2
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio_at(middle) < target else (low, middle)
    plan = plan_at(high)
    plan.target_ratio, plan.achieved_ratio, plan.target_of = target, ratio_at(high), TargetOf.parse(target_of)
    return plan
