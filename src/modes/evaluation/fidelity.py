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
from modes.loading import input_device
from modes.parallel import ranks
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
    group = ranks()
    mine = group.share(prepare_batches(processor, samples, batch_size, input_device(model)))
    references = {index: answer_logprobs(model, batch) for index, batch in mine}

    def my_batches() -> dict[int, tuple[float, int, int]]:
        results = {}
        with engine.applied(model, plan, options, processor=processor):
            for index, batch in tqdm(
                mine, desc="fidelity", unit="batch", disable=not (progress and group.is_main)
            ):
                skipped, reference = answer_logprobs(model, batch), references[index]  # [A, V] each
                kl = float(torch.nn.functional.kl_div(skipped, reference, log_target=True, reduction="sum"))
                agree = int((skipped.argmax(-1) == reference.argmax(-1)).sum())
                results[index] = (kl, agree, reference.shape[0])
        return results

    kl_sum, agree, tokens = 0.0, 0, 0
    for batch_kl, batch_agree, batch_tokens in group.gather(my_batches).values():  # global batch order
        kl_sum, agree, tokens = kl_sum + batch_kl, agree + batch_agree, tokens + batch_tokens
    return {"mean_kl": kl_sum / tokens, "top1_agreement": agree / tokens, "answer_tokens": tokens}
