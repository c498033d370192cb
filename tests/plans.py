"""Hand-made MoDES plans for the bundled model's tests (also imported by the vLLM plugin's
reference script, integrations/vllm/tests/reference.py)."""

from __future__ import annotations

import random
from collections.abc import Iterable

import modes


def uniform_plan(
    model, tau: float, special_token_ids: Iterable[int] | None = None, modalities=("text", "visual")
) -> modes.SkipPlan:
    """alpha = 1 / layers for every layer and modality, one threshold ``tau`` for each."""
    info = modes.model_info(model)
    share = 1 / len(info.moe_layers)
    return modes.SkipPlan(
        {layer: dict.fromkeys(modalities, share) for layer in info.moe_layers},
        dict.fromkeys(modalities, tau),
        model=info,
        special_token_ids=special_token_ids,
    )


def random_plan(model, processor, seed: int) -> modes.SkipPlan:
    """Alphas and thresholds drawn at random for text and visual tokens (skip ratios far from
    the searched plans')."""
    rng = random.Random(seed)
    info = modes.model_info(model)
    importance = {layer: {m: rng.uniform(0.02, 0.4) for m in ("text", "visual")} for layer in info.moe_layers}
    thresholds = {m: rng.uniform(0.005, 0.03) for m in ("text", "visual")}
    return modes.SkipPlan(
        importance, thresholds, model=info, special_token_ids=processor.tokenizer.all_special_ids
    )
