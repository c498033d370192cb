"""Methods side by side at matched skip ratios: MoDES, its ablations and baselines.

Every method is calibrated on the calibration samples to each target ratio, then evaluated
on the test samples by the same evaluator, through the same engine (one code path).

- ``modes``: calibrated alphas per modality, two thresholds (GMLG + DMT)
- ``dmt``: uniform alphas, two thresholds (DMT only)
- ``gmlg``: calibrated alphas, one threshold for all modalities (GMLG only)
- ``local``: uniform alphas, one threshold (local thresholding)
- ``k_reduction``: keep the top k' = round(k (1 - target)) experts
- ``naee``: NAEE generalised to top-k, beta(l) = median pi_2/pi_1, scaled by bisection
- ``mc_moe``: NAEE's rule and beta with MC-MoE's top-2% token protection in prefill
- ``diep``: gamma1 = NAEE's median times DiEP's per-layer expert-similarity table, scaled
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import torch

from modes.bundled.benchmark import Sample
from modes.calibration.importance import Importance
from modes.calibration.kl import CalibrationBatch, prepare_batches
from modes.calibration.similarity import expert_similarity
from modes.engine import patch as engine
from modes.evaluation.evaluate import evaluate
from modes.plan import SkipPlan
from modes.search.frontier import search
from modes.search.grid import GridSpec

__all__ = ["METHODS", "calibrate_method", "compare", "skippable_share"]

METHODS = ("modes", "dmt", "gmlg", "local", "naee", "mc_moe", "diep", "k_reduction")


@dataclass
class Setting:
    """One comparison's model and calibration data; what several methods share is computed once."""

    model: Any
    processor: Any
    calibration: Sequence[Sample]
    importance: Importance
    grid_size: int
    batch_size: int
    cache_dir: Path | None = None

    @cached_property
    def batches(self) -> list[CalibrationBatch]:
        return prepare_batches(self.processor, self.calibration, self.batch_size, _device(self.model))

    @cached_property
    def median_top2_ratio(self) -> dict[str, float]:
        """NAEE's beta(l), also MC-MoE's beta and DiEP's gamma1."""
        return _median_top2_ratio(self.model, self.batches)

    @cached_property
    def expert_similarity(self) -> dict[str, list[list[float]]]:
        """DiEP's gamma2 tables."""
        return expert_similarity(self.model, self.processor, self.calibration, batch_size=self.batch_size)


def uniform_importance(importance: Importance) -> Importance:
    """Same layers and modalities, every alpha 1 / layers (s = pi up to a constant)."""
    share = 1.0 / len(importance.alphas)
    alphas = {layer: dict.fromkeys(importance.modalities, share) for layer in importance.alphas}
    return Importance(alphas, alphas, "uniform", importance.model, importance.answer_tokens)


def _searched_plan(
    setting: Setting, importance: Importance, target: float, tied: bool, method: str
) -> SkipPlan:
    scores = {m: max(a[m] for a in importance.alphas.values()) for m in importance.modalities}
    grid = GridSpec.covering(scores if not tied else {"text": max(scores.values())}, size=setting.grid_size)
    result = search(
        setting.model,
        setting.processor,
        setting.calibration,
        importance,
        target,
        grid=grid,
        tied=tied,
        batch_size=setting.batch_size,
        cache=setting.cache_dir / f"{method}.cache.jsonl" if setting.cache_dir else None,
        progress=False,
    )
    result.plan.provenance["compare_method"] = method
    return result.plan


def _k_reduction(setting: Setting, target: float) -> SkipPlan:
    info = setting.importance.model
    keep = max(0, round(info.top_k * (1 - target)))
    return SkipPlan({}, {}, method="k_reduction", parameters={"keep": keep}, model=info, target_ratio=target)


def _naee(setting: Setting, target: float) -> SkipPlan:
    return _scaled_plan(setting, target, "naee", {"beta": setting.median_top2_ratio})


def _mc_moe(setting: Setting, target: float) -> SkipPlan:
    parameters = {"beta": setting.median_top2_ratio, "protect": 0.02}
    return _scaled_plan(setting, target, "mc_moe", parameters)


def _diep(setting: Setting, target: float) -> SkipPlan:
    parameters = {"gamma1": setting.median_top2_ratio, "cka": setting.expert_similarity}
    return _scaled_plan(setting, target, "diep", parameters)


@torch.no_grad()
def _scaled_plan(setting: Setting, target: float, method: str, parameters: dict[str, Any]) -> SkipPlan:
    """The plan of ``method`` whose ``scale`` parameter reaches ``target`` on the calibration data
    (bisection: every scaled rule skips monotonically more as its scale grows)."""
    info = setting.importance.model

    def plan_at(scale: float) -> SkipPlan:
        return SkipPlan({}, {}, method=method, parameters={**parameters, "scale": scale}, model=info)

    @cache  # the final scale was usually measured during the bisection
    def ratio_at(scale: float) -> float:
        return _skip_stats(setting.model, setting.processor, plan_at(scale), setting.batches)["ratio"]

    low, high = 0.0, 1.0
    while ratio_at(high) < target and high < 1e4:
        low, high = high, high * 2
    for _ in range(14):
        middle = (low + high) / 2
        low, high = (middle, high) if ratio_at(middle) < target else (low, middle)
    plan = plan_at(high)
    plan.target_ratio, plan.achieved_ratio = target, ratio_at(high)
    return plan


@torch.no_grad()
def _skip_stats(
    model: Any, processor: Any, plan: SkipPlan, batches: list[CalibrationBatch]
) -> dict[str, Any]:
    """`modes.skip_stats` of ``plan`` over the teacher-forced ``batches``."""
    engine.apply(model, plan, processor.tokenizer.all_special_ids)
    try:
        for batch in batches:
            model(**batch.inputs, use_cache=False)
        return engine.skip_stats(model)
    finally:
        engine.remove(model)


@torch.no_grad()
def _median_top2_ratio(model: Any, batches: list[CalibrationBatch]) -> dict[str, float]:
    """Per-layer median of pi_top2 / pi_top1 over the calibration tokens."""
    ratios: dict[int, list[torch.Tensor]] = {}
    handles = []
    for site in engine.moe_sites(model):

        def record(module, args, layer=site.layer):
            top = args[2].float().topk(2, dim=1).values  # [T, 2]
            ratios.setdefault(layer, []).append(top[:, 1] / top[:, 0].clamp_min(1e-20))

        handles.append(site.module.register_forward_pre_hook(record))
    try:
        for batch in batches:
            model(**batch.inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {str(layer): float(torch.cat(values).median()) for layer, values in sorted(ratios.items())}


@torch.no_grad()
def skippable_share(model: Any, processor: Any, samples: Sequence[Sample], batch_size: int = 32) -> float:
    """Share of routed slots that belong to text/media tokens (special tokens are never skipped).

    On short prompts the chat markup is a large share of the tokens (about a quarter on the
    bundled benchmark), so the skip ratio cannot exceed this share. Paper-style targets (k'
    of k experts) are matched by multiplying them by it.
    """
    info = engine.model_info(model)
    keep_all = SkipPlan({}, {}, method="k_reduction", parameters={"keep": info.top_k}, model=info)
    batches = prepare_batches(processor, samples, batch_size, _device(model))
    stats = _skip_stats(model, processor, keep_all, batches)
    other = stats["per_modality"].get("other", {}).get("total_slots", 0)
    return 1.0 - other / stats["total_slots"]


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


CALIBRATORS: dict[str, Callable[[Setting, float], SkipPlan]] = {
    "modes": lambda s, t: _searched_plan(s, s.importance, t, tied=False, method="modes"),
    "dmt": lambda s, t: _searched_plan(s, uniform_importance(s.importance), t, tied=False, method="dmt"),
    "gmlg": lambda s, t: _searched_plan(s, s.importance, t, tied=True, method="gmlg"),
    "local": lambda s, t: _searched_plan(s, uniform_importance(s.importance), t, tied=True, method="local"),
    "k_reduction": _k_reduction,
    "naee": _naee,
    "mc_moe": _mc_moe,
    "diep": _diep,
}


def calibrate_method(setting: Setting, method: str, target: float) -> SkipPlan:
    if method not in CALIBRATORS:
        raise ValueError(f"unknown method {method!r}; choose from {list(CALIBRATORS)}")
    return CALIBRATORS[method](setting, target)


def compare(
    model: Any,
    processor: Any,
    calibration: Sequence[Sample],
    test: Sequence[Sample],
    importance: Importance,
    targets: Sequence[float],
    methods: Sequence[str] = METHODS,
    grid_size: int = 24,
    batch_size: int = 32,
    of_skippable: bool = True,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Accuracy, relative accuracy and realised ratios of every method at every target.

    Search points are cached per method in ``cache_dir`` (shared across targets, resumable).
    ``of_skippable``: targets are fractions of the skippable slots (k-reduction to k' of k
    experts skips 1 - k'/k of them), converted with `skippable_share` on the calibration data.
    """
    cache = Path(cache_dir) if cache_dir else None
    setting = Setting(model, processor, calibration, importance, grid_size, batch_size, cache)
    share = skippable_share(model, processor, calibration, batch_size) if of_skippable else 1.0
    baseline = evaluate(model, processor, test, batch_size=batch_size, progress=False)
    rows = []
    for nominal in targets:
        target = nominal * share
        for method in methods:
            plan = calibrate_method(setting, method, nominal if method == "k_reduction" else target)
            report = evaluate(model, processor, test, plan=plan, batch_size=batch_size, progress=False)
            row = {
                "method": method,
                "target": nominal,
                "calibration_target": target,
                "ratio": report["skip_ratio"],
                "per_modality": report["per_modality"],
                "accuracy": report["accuracy"],
                "relative_accuracy": 100 * report["accuracy"] / baseline["accuracy"],
                "per_skill": report["per_skill"],
                "plan": plan.to_json(),
            }
            rows.append(row)
            progress(
                f"target {target:.2f} {method:12s} ratio {row['ratio']:.3f} accuracy {row['accuracy']:.4f}"
            )
    return {
        "skippable_share": share,
        "baseline": {"accuracy": baseline["accuracy"], "per_skill": baseline["per_skill"]},
        "rows": rows,
        "mean_relative": {
            m: statistics.mean(r["relative_accuracy"] for r in rows if r["method"] == m) for m in methods
        },
    }
