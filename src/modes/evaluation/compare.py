"""Methods side by side at matched skip ratios: MoDES, its ablations and baselines.

Every method is calibrated on the calibration samples to each target ratio, then evaluated
on the test samples by the same evaluator, through the same engine (one code path).

- ``modes``: calibrated alphas per modality, two thresholds (GMLG + DMT), modes' calibration
- ``modes_release``: the release's calibration semantics for the alphas and for the search's
  loss f (MoDES as published, reproduced exactly)
- ``modes_release_alphas``: the release's alphas, searched with modes' loss positions
- ``modes_tempered``: alphas^gamma, gamma in {0, .25, .5, .75, 1} chosen by calibration KL
- ``modes_partial``: alphas from partial knockout (the target's share of each token's
  lowest-weight slots skipped at the measured layer, not all of them)
- ``dmt``: uniform alphas, two thresholds (DMT only)
- ``gmlg``: calibrated alphas, one threshold for all modalities (GMLG only)
- ``local``: uniform alphas, one threshold (local thresholding)
- ``k_reduction``: keep the top k' = round(k (1 - target)) experts
- ``naee``: NAEE generalised to top-k, beta(l) = median pi_2/pi_1, scaled by bisection
- ``mc_moe``: NAEE's rule and beta with MC-MoE's top-2% token protection in prefill
- ``diep``: gamma1 = NAEE's median times DiEP's per-layer expert-similarity table, scaled
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tqdm import tqdm

from modes.calibration.baselines import median_top2_ratio, scaled_to_target
from modes.calibration.calibration_set import CalibrationSet
from modes.calibration.importance import Importance, calibrate
from modes.calibration.similarity import expert_similarity
from modes.data.sample import Sample
from modes.defaults import COMPARE_GRID_SIZE, DEFAULT_GAMMAS
from modes.errors import UsageError
from modes.evaluation.evaluate import evaluate
from modes.evaluation.fidelity import fidelity
from modes.plan import SkipPlan
from modes.policies import DiepConfig, KReductionConfig, McMoeConfig, NaeeConfig, PolicyConfig
from modes.ratios import SkipRatios, TargetOf
from modes.thresholds.frontier import SearchConfig, search

__all__ = ["METHODS", "calibrate_method", "compare"]

METHODS = (
    "modes",
    "modes_release",
    "modes_release_alphas",
    "modes_tempered",
    "modes_partial",
    "dmt",
    "gmlg",
    "local",
    "naee",
    "mc_moe",
    "diep",
    "k_reduction",
)


@dataclass
class Setting:
    """One comparison's model and calibration data; what several methods share is computed once:
    the calibration sets (each reference forward runs once per process), the release's alphas,
    the baselines' statistics."""

    model: Any
    processor: Any
    calibration: CalibrationSet  # modes' KL positions
    importance: Importance
    config: SearchConfig  # grid size and target_of; each method sets gammas and tied
    cache: Path | None = None  # one file for every search of the comparison (keyed lines)

    @cached_property
    def release_calibration(self) -> CalibrationSet:
        """The same samples at the release's KL positions."""
        return self.calibration.with_semantics(self.model, self.processor, "release")

    @cached_property
    def median_top2_ratio(self) -> dict[int, float]:
        """NAEE's beta(l), also MC-MoE's beta and DiEP's gamma1."""
        return median_top2_ratio(self.model, self.calibration)

    @cached_property
    def expert_similarity(self) -> dict[str, list[list[float]]]:
        """DiEP's gamma2 tables."""
        return expert_similarity(self.model, self.calibration.batches)

    @cached_property
    def release_importance(self) -> Importance:
        """Alphas with the release's calibration semantics."""
        return self.calibrate(self.release_calibration, semantics="release")

    def calibrate(self, calibration: CalibrationSet | None = None, **options: Any) -> Importance:
        calibration = calibration or self.calibration
        return calibrate(
            self.model, self.processor, calibration, mode=self.importance.mode, progress=False, **options
        )


def _searched_plan(
    setting: Setting, importance: Importance, target: float, tied: bool, gammas: Sequence[float] = (1.0,)
) -> SkipPlan:
    calibration = setting.release_calibration if importance.semantics == "release" else setting.calibration
    config = setting.config.with_options(tied=tied, gammas=gammas)
    result = search(
        setting.model,
        setting.processor,
        calibration,
        importance,
        target,
        config,
        cache=setting.cache,
        progress=False,
    )
    return result.plan


def _partial(setting: Setting, target: float) -> SkipPlan:
    """Alphas measured by skipping the target's share of each token's slots at each layer."""
    importance = setting.calibrate(knockout=min(1.0, max(target, 1 / setting.importance.model.top_k)))
    return _searched_plan(setting, importance, target, tied=False)


def _k_reduction(setting: Setting, target: float) -> SkipPlan:
    """k' = round(k (1 - target)): exactly the target of the skippable slots where k' is whole."""
    info = setting.importance.model
    policy = KReductionConfig.for_ratio(info.top_k, target)
    return SkipPlan(policy=policy, model=info, target_ratio=target, target_of=TargetOf.SKIPPABLE)


def _scaled(setting: Setting, target: float, config_at: Callable[[float], PolicyConfig]) -> SkipPlan:
    info, target_of = setting.importance.model, setting.config.target_of
    return scaled_to_target(
        setting.model, setting.processor, setting.calibration, config_at, target, info, target_of
    )


def _naee(setting: Setting, target: float) -> SkipPlan:
    return _scaled(setting, target, lambda scale: NaeeConfig(setting.median_top2_ratio, scale))


def _mc_moe(setting: Setting, target: float) -> SkipPlan:
    return _scaled(setting, target, lambda scale: McMoeConfig(setting.median_top2_ratio, scale, protect=0.02))


def _diep(setting: Setting, target: float) -> SkipPlan:
    tables = setting.expert_similarity
    return _scaled(setting, target, lambda scale: DiepConfig(setting.median_top2_ratio, tables, scale))


CALIBRATORS: dict[str, Callable[[Setting, float], SkipPlan]] = {
    "modes": lambda s, t: _searched_plan(s, s.importance, t, tied=False),
    "modes_release": lambda s, t: _searched_plan(s, s.release_importance, t, tied=False),
    "modes_release_alphas": lambda s, t: _searched_plan(
        s, dataclasses.replace(s.release_importance, semantics="modes"), t, tied=False
    ),
    "modes_tempered": lambda s, t: _searched_plan(s, s.importance, t, tied=False, gammas=DEFAULT_GAMMAS),
    "modes_partial": _partial,
    "dmt": lambda s, t: _searched_plan(s, s.importance.tempered(0.0), t, tied=False),
    "gmlg": lambda s, t: _searched_plan(s, s.importance, t, tied=True),
    "local": lambda s, t: _searched_plan(s, s.importance.tempered(0.0), t, tied=True),
    "k_reduction": _k_reduction,
    "naee": _naee,
    "mc_moe": _mc_moe,
    "diep": _diep,
}


def calibrate_method(setting: Setting, method: str, target: float) -> SkipPlan:
    if method not in CALIBRATORS:
        raise UsageError(f"unknown method {method!r}; choose from {list(CALIBRATORS)}")
    plan = CALIBRATORS[method](setting, target)
    plan.provenance["compare_method"] = method
    return plan


def _row(
    setting: Setting, test: Sequence[Sample], method: str, target: float, baseline: float
) -> dict[str, Any]:
    """``method`` calibrated to ``target`` on the calibration samples, evaluated on ``test``."""
    model, processor, batch_size = setting.model, setting.processor, setting.calibration.batch_size
    plan = calibrate_method(setting, method, target)
    report = evaluate(model, processor, test, plan=plan, batch_size=batch_size, progress=False)
    # one measure for every method: modes' answer-token KL on the calibration samples
    kl = fidelity(model, processor, setting.calibration, plan, progress=False)["mean_kl"]
    ratios = SkipRatios.from_stats(report["skip_stats"])
    target_of = setting.config.target_of
    return {
        "method": method,
        "target": target,
        "target_of": target_of.value,
        "ratio": ratios.of(target_of),
        **ratios.to_json(),
        "per_modality": report["per_modality"],
        "accuracy": report["accuracy"],
        "accuracy_se": report["accuracy_se"],
        "calibration_kl": kl,
        "relative_accuracy": 100 * report["accuracy"] / baseline,
        "per_skill": report["per_skill"],
        "plan": plan.to_json(),
    }


def compare(
    model: Any,
    processor: Any,
    calibration: Sequence[Sample],
    test: Sequence[Sample],
    importance: Importance | None,
    targets: Sequence[float],
    methods: Sequence[str] = METHODS,
    grid_size: int = COMPARE_GRID_SIZE,
    batch_size: int = 32,
    target_of: TargetOf | str = TargetOf.SKIPPABLE,
    cache: str | Path | None = None,
    progress: bool = True,
    alpha_mode: str = "per_modality",
) -> dict[str, Any]:
    """Accuracy (with its binomial standard error), relative accuracy, realised ratios and the
    calibration KL (answer-token KL on ``calibration``, the same measure for every method) of
    every method at every target, each method calibrated on ``calibration`` and evaluated on
    ``test``. Targets are shares of the skippable slots (like k' of k experts) unless
    ``target_of="all"``. Search points go to ``cache`` (one file; searches with the same alphas
    share points, across targets and methods; a rerun resumes). ``importance`` None calibrates
    here (``alpha_mode``), on the same calibration set every method then reuses: each reference
    forward of the calibration samples runs once per process (once more for the release's
    positions, when a release method is compared)."""
    unknown = sorted(set(methods) - set(CALIBRATORS))
    if unknown:
        raise UsageError(f"unknown methods {unknown}; choose from {list(CALIBRATORS)}")
    calibration_set = CalibrationSet.build(model, processor, calibration, batch_size)
    if importance is None:
        importance = calibrate(model, processor, calibration_set, mode=alpha_mode, progress=progress)
    config = SearchConfig(grid=grid_size, target_of=target_of, batch_size=batch_size)
    cache = Path(cache) if cache else None
    setting = Setting(model, processor, calibration_set, importance, config, cache)
    baseline = evaluate(model, processor, test, batch_size=batch_size, progress=False)
    rows = []
    bar = tqdm(total=len(targets) * len(methods), desc="compare", unit="method", disable=not progress)
    for target in targets:
        for method in methods:
            bar.set_postfix(target=target, method=method)
            rows.append(_row(setting, test, method, target, baseline["accuracy"]))
            bar.update(1)
            bar.write(f"target {target:.2f} {method:15s} ratio {rows[-1]['ratio']:.3f} "
                      f"accuracy {rows[-1]['accuracy']:.4f}")  # fmt: skip
    bar.close()
    return {
        "target_of": config.target_of.value,
        "baseline": {k: baseline[k] for k in ("accuracy", "accuracy_se", "per_skill", "samples")},
        "rows": rows,
        "mean_relative": {
            m: statistics.mean(r["relative_accuracy"] for r in rows if r["method"] == m) for m in methods
        },
    }
