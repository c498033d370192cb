"""Hand-made MoDES plans for the bundled model's tests: every MoE layer equally important."""

from __future__ import annotations

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
