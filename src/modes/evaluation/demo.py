"""The whole pipeline on one model: calibrate, search each target, evaluate with and without each plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modes.calibration.calibration_set import CalibrationSet
from modes.calibration.importance import Importance, calibrate
from modes.data.sample import Sample
from modes.defaults import COMPARE_GRID_SIZE, DEFAULT_GAMMAS
from modes.evaluation.evaluate import evaluate
from modes.ratios import SkipRatios, TargetOf
from modes.thresholds.frontier import SearchConfig, SearchResult, search

__all__ = ["DemoResult", "demo"]


@dataclass
class DemoResult:
    importance: Importance
    searches: dict[float, SearchResult]  # by target
    baseline: dict[str, Any]  # `evaluate` report of the unskipped model
    reports: dict[float, dict[str, Any]]  # `evaluate` report of each target's plan
    target_of: TargetOf

    def summary(self) -> dict[str, Any]:
        """JSON-ready: accuracy, both skip ratios and thresholds per target."""
        plans = []
        for target, result in self.searches.items():
            report = self.reports[target]
            tested = SkipRatios.from_stats(report["skip_stats"])
            plans.append(
                {
                    "target": target,
                    "target_of": self.target_of.value,
                    "thresholds": result.plan.thresholds,
                    "gamma": result.plan.provenance["tempered_gamma"],
                    "calibration_ratio": result.best.ratios.of(self.target_of),
                    "calibration_ratio_of_all_slots": result.best.ratios.all,
                    "test_ratio": tested.of(self.target_of),
                    "test_ratio_of_all_slots": tested.all,
                    "test_per_modality": report["per_modality"],
                    "accuracy": report["accuracy"],
                    "accuracy_se": report["accuracy_se"],
                    "per_skill": report["per_skill"],
                    "relative_accuracy": 100 * report["accuracy"] / self.baseline["accuracy"],
                }
            )
        baseline = {k: self.baseline[k] for k in ("accuracy", "accuracy_se", "per_skill", "samples")}
        return {"baseline": baseline, "plans": plans}


def demo(
    model: Any,
    processor: Any,
    calibration: Sequence[Sample],
    test: Sequence[Sample],
    targets: Sequence[float],
    grid_size: int = COMPARE_GRID_SIZE,
    batch_size: int = 32,
    target_of: TargetOf | str = TargetOf.SKIPPABLE,
    cache: str | Path | None = None,
    progress: bool = True,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
) -> DemoResult:
    """Calibrate on ``calibration``, search every target on grids covering every score (the
    targets share the search points through one ``cache``, and every step the calibration set),
    evaluate on ``test``."""
    calibration_set = CalibrationSet.build(model, processor, calibration, batch_size)
    importance = calibrate(model, processor, calibration_set, progress=progress)
    config = SearchConfig(grid=grid_size, gammas=tuple(gammas), target_of=target_of, batch_size=batch_size)
    searches = {
        target: search(
            model, processor, calibration_set, importance, target, config, cache=cache, progress=progress
        )
        for target in targets
    }
    baseline = evaluate(model, processor, test, batch_size=batch_size, progress=progress)
    reports = {
        target: evaluate(model, processor, test, plan=result.plan, batch_size=batch_size, progress=progress)
        for target, result in searches.items()
    }
    return DemoResult(importance, searches, baseline, reports, config.target_of)
