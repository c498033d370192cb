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
from functools import cached_property
from pathlib import Path
from typing import Any

from modes.calibration.baselines import median_top2_ratio, scaled_to_target
from modes.calibration.importance import Importance
from modes.calibration.kl import CalibrationBatch, prepare_batches
from modes.calibration.similarity import expert_similarity
from modes.data.sample import Sample
from modes.evaluation.evaluate import evaluate
from modes.plan import SkipPlan
from modes.policies import DiepConfig, KReductionConfig, McMoeConfig, NaeeConfig, PolicyConfig
from modes.search.frontier import TargetOf, search
from modes.search.grid import GridSpec

__all__ = ["METHODS", "calibrate_method", "compare"]

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
    target_of: TargetOf = "skippable"
    cache_dir: Path | None = None

    @cached_property
    def batches(self) -> list[CalibrationBatch]:
        return prepare_batches(
            self.processor, self.calibration, self.batch_size, next(self.model.parameters()).device
        )

    @cached_property
    def median_top2_ratio(self) -> dict[int, float]:
        """NAEE's beta(l), also MC-MoE's beta and DiEP's gamma1."""
        return median_top2_ratio(self.model, self.batches)

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
    scores = importance.max_alphas()
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
        target_of=setting.target_of,
    )
    result.plan.provenance["compare_method"] = method
    return result.plan


def _k_reduction(setting: Setting, target: float) -> SkipPlan:
    """k' = round(k (1 - target)): exactly the target of the skippable slots where k' is whole."""
    info = setting.importance.model
    policy = KReductionConfig.for_ratio(info.top_k, target)
    return SkipPlan(policy=policy, model=info, target_ratio=target, target_of="skippable")


def _scaled(setting: Setting, target: float, config_at: Callable[[float], PolicyConfig]) -> SkipPlan:
    info = setting.importance.model
    key = "skippable_ratio" if setting.target_of == "skippable" else "ratio"
    return scaled_to_target(setting.model, setting.processor, setting.batches, config_at, target, info, key)


def _naee(setting: Setting, target: float) -> SkipPlan:
    return _scaled(setting, target, lambda scale: NaeeConfig(setting.median_top2_ratio, scale))


def _mc_moe(setting: Setting, target: float) -> SkipPlan:
    return _scaled(setting, target, lambda scale: McMoeConfig(setting.median_top2_ratio, scale, protect=0.02))


def _diep(setting: Setting, target: float) -> SkipPlan:
    tables = setting.expert_similarity
    return _scaled(setting, target, lambda scale: DiepConfig(setting.median_top2_ratio, tables, scale))


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
    target_of: TargetOf = "skippable",
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Accuracy (with its binomial standard error), relative accuracy and realised ratios of
    every method at every target, each method calibrated on ``calibration`` and evaluated on
    ``test``. Targets are shares of the skippable slots (like k' of k experts) unless
    ``target_of="all"``. Search points are cached per method in ``cache_dir`` (shared across
    targets, resumable)."""
    unknown = sorted(set(methods) - set(CALIBRATORS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(CALIBRATORS)}")
    cache = Path(cache_dir) if cache_dir else None
    setting = Setting(model, processor, calibration, importance, grid_size, batch_size, target_of, cache)
    baseline = evaluate(model, processor, test, batch_size=batch_size, progress=False)
    rows = []
    for target in targets:
        for method in methods:
            plan = calibrate_method(setting, method, target)
            report = evaluate(model, processor, test, plan=plan, batch_size=batch_size, progress=False)
            row = {
                "method": method,
                "target": target,
                "target_of": target_of,
                "ratio": report["skippable_ratio" if target_of == "skippable" else "skip_ratio"],
                "ratio_of_all_slots": report["skip_ratio"],
                "ratio_of_skippable_slots": report["skippable_ratio"],
                "per_modality": report["per_modality"],
                "accuracy": report["accuracy"],
                "accuracy_se": report["accuracy_se"],
                "relative_accuracy": 100 * report["accuracy"] / baseline["accuracy"],
                "per_skill": report["per_skill"],
                "plan": plan.to_json(),
            }
            rows.append(row)
            progress(
                f"target {target:.2f} {method:12s} ratio {row['ratio']:.3f} accuracy {row['accuracy']:.4f}"
            )
    return {
        "target_of": target_of,
        "baseline": {k: baseline[k] for k in ("accuracy", "accuracy_se", "per_skill", "samples")},
        "rows": rows,
        "mean_relative": {
            m: statistics.mean(r["relative_accuracy"] for r in rows if r["method"] == m) for m in methods
        },
    }
