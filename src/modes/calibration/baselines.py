"""Calibrating the baselines (algorithm.md section 5) to a target skip ratio on calibration data.

NAEE's beta(l) (also MC-MoE's) and DiEP's gamma1 are the per-layer median of pi_top2 / pi_top1;
each of these rules skips monotonically more as its ``scale`` grows, so a bisection on the
scale reaches the target ratio (the papers used a genetic search). k-reduction needs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from modes import engine
from modes.calibration.kl import CalibrationBatch
from modes.engine import ModelInfo
from modes.parallel import ranks
from modes.plan import SkipPlan
from modes.policies import PolicyConfig

__all__ = ["median_top2_ratio", "scaled_to_target", "skip_stats_on"]

BISECTION_STEPS = 14


@torch.no_grad()
def skip_stats_on(
    model: Any, processor: Any, plan: SkipPlan, batches: list[CalibrationBatch]
) -> dict[str, Any]:
    """`modes.skip_stats` of ``plan`` over the teacher-forced ``batches``."""
    with engine.applied(model, plan, processor=processor):
        for batch in batches:
            model(**batch.inputs, use_cache=False)
        return engine.skip_stats(model)


@torch.no_grad()
def median_top2_ratio(model: Any, batches: list[CalibrationBatch]) -> dict[int, float]:
    """Per-layer median of pi_top2 / pi_top1 over the calibration tokens."""
    ratios: dict[int, list[torch.Tensor]] = {}
    handles = []
    for site in engine.moe_sites(model):

        def record(module, args, layer=site.layer):
            top = args[2].float().topk(2, dim=1).values  # [T, 2]
            ratios.setdefault(layer, []).append(top[:, 1] / top[:, 0].clamp_min(1e-20))

        handles.append(site.module.register_forward_pre_hook(record))
    group = ranks()

    def my_ratios() -> dict[int, dict[int, torch.Tensor]]:
        per_batch = {}
        try:
            for index, batch in group.share(batches):
                ratios.clear()
                model(**batch.inputs, use_cache=False)
                per_batch[index] = {layer: torch.cat(values) for layer, values in ratios.items()}
        finally:
            for handle in handles:
                handle.remove()
        return per_batch

    every = list(group.gather(my_ratios).values())  # the median of every rank's tokens
    return {layer: float(torch.cat([batch[layer] for batch in every]).median()) for layer in sorted(every[0])}


def scaled_to_target(
    model: Any,
    processor: Any,
    batches: list[CalibrationBatch],
    config_at: Callable[[float], PolicyConfig],
    target: float,
    info: ModelInfo,
    ratio_key: str = "skippable_ratio",
) -> SkipPlan:
    """The plan of ``config_at(scale)`` whose scale reaches ``target`` on ``batches`` (bisection:
    the smallest scale found that reaches it); ``ratio_key`` names the `modes.skip_stats` ratio
    the target is a value of (``"skippable_ratio"`` or ``"ratio"``, of all slots)."""

    def plan_at(scale: float) -> SkipPlan:
        return SkipPlan(policy=config_at(scale), model=info)

    @cache  # the final scale was usually measured during the bisection
    def ratio_at(scale: float) -> float:
        return skip_stats_on(model, processor, plan_at(scale), batches)[ratio_key]

    low, high = 0.0, 1.0
    while ratio_at(high) < target and high < 1e4:
        low, high = high, high * 2
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio_at(middle) < target else (low, middle)
    plan = plan_at(high)
    plan.target_ratio, plan.achieved_ratio = target, ratio_at(high)
    plan.target_of = "skippable" if ratio_key == "skippable_ratio" else "all"
    return plan
