"""How closely a skipping model follows the unskipped one on teacher-forced answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from modes.bundled.benchmark import Sample
from modes.calibration.kl import answer_logprobs, prepare_batches
from modes.engine import patch as engine
from modes.plan import SkipPlan

__all__ = ["fidelity"]


@torch.no_grad()
def fidelity(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    plan: SkipPlan,
    batch_size: int = 32,
    special_token_ids: Sequence[int] | None = None,
    pack_weights: bool = False,
    cpu_kernel: bool = False,
) -> dict[str, float]:
    """Mean KL(p_orig || p_skip) and top-1 agreement over the answer tokens of ``samples``, the
    plan applied with ``pack_weights`` or ``cpu_kernel`` (see `modes.apply`)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    device = next(model.parameters()).device
    batches = prepare_batches(processor, samples, batch_size, device)
    references = [answer_logprobs(model, batch) for batch in batches]
    special = special_token_ids or tokenizer.all_special_ids
    engine.apply(model, plan, special, pack_weights=pack_weights, cpu_kernel=cpu_kernel)
    try:
        kl_sum, agree, tokens = 0.0, 0, 0
        for batch, reference in zip(batches, references, strict=True):
            skipped = answer_logprobs(model, batch)  # [A, V]
            kl_sum += float(torch.nn.functional.kl_div(skipped, reference, log_target=True, reduction="sum"))
            agree += int((skipped.argmax(-1) == reference.argmax(-1)).sum())
            tokens += reference.shape[0]
    finally:
        engine.remove(model)
    return {"mean_kl": kl_sum / tokens, "top1_agreement": agree / tokens, "answer_tokens": tokens}
