"""How closely a skipping model follows the unskipped one on teacher-forced answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from modes import engine
from modes.calibration.kl import answer_logprobs, prepare_batches
from modes.data.sample import Sample
from modes.engine import ApplyOptions
from modes.plan import SkipPlan

__all__ = ["fidelity"]


@torch.no_grad()
def fidelity(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    plan: SkipPlan,
    batch_size: int = 32,
    options: ApplyOptions | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Mean KL(p_orig || p_skip) and top-1 agreement over the answer tokens of ``samples``, the
    plan applied with ``options`` (`modes.ApplyOptions`)."""
    device = next(model.parameters()).device
    batches = prepare_batches(processor, samples, batch_size, device)
    references = [answer_logprobs(model, batch) for batch in batches]
    with engine.applied(model, plan, options, processor=processor):
        kl_sum, agree, tokens = 0.0, 0, 0
        pairs = tqdm(
            zip(batches, references, strict=True),
            total=len(batches),
            desc="fidelity",
            unit="batch",
            disable=not progress,
        )
        for batch, reference in pairs:
            skipped = answer_logprobs(model, batch)  # [A, V]
            kl_sum += float(torch.nn.functional.kl_div(skipped, reference, log_target=True, reduction="sum"))
            agree += int((skipped.argmax(-1) == reference.argmax(-1)).sum())
            tokens += reference.shape[0]
    return {"mean_kl": kl_sum / tokens, "top1_agreement": agree / tokens, "answer_tokens": tokens}
