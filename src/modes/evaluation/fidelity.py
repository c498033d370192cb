"""How closely a skipping model follows the unskipped one on teacher-forced answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modes.calibration.calibration_set import CalibrationSet, measure
from modes.data.sample import Sample
from modes.engine import ApplyOptions
from modes.plan import SkipPlan

__all__ = ["fidelity"]


def fidelity(
    model: Any,
    processor: Any,
    samples: Sequence[Sample] | CalibrationSet,
    plan: SkipPlan,
    batch_size: int = 32,
    options: ApplyOptions | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Mean KL(p_orig || p_skip) and top-1 agreement over the answer tokens of ``samples`` (or of
    a `CalibrationSet`, whose reference log-probs are reused), the plan applied with ``options``
    (`modes.ApplyOptions`)."""
    calibration = CalibrationSet.of(model, processor, samples, batch_size)
    measured = measure(
        model,
        calibration,
        plan,
        options=options,
        processor=processor,
        progress="fidelity" if progress else None,
    )
    return {
        "mean_kl": measured.mean_kl,
        "top1_agreement": measured.top1_agreement,
        "answer_tokens": measured.answer_tokens,
    }
