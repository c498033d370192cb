"""DiEP's per-layer table: how similar every two experts' outputs are on calibration tokens.

For each MoE layer, the experts' inputs are recorded on calibration data (padding excluded),
a seeded subsample of them is run through every expert with weight 1 (one ``k = 1`` call of the
module's own kernel per expert), and linear CKA is taken between every two experts' outputs.
gamma2(l, a, b) = CKA(a, b) / mean CKA over the layer's distinct pairs, so 1 is "as similar as
usual", above 1 "more alike than usual" (skipping b when a is kept loses less).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modes import engine
from modes.adapters.registry import UnsupportedModelError, spec_for
from modes.calibration.kl import CalibrationBatch

__all__ = ["expert_outputs", "expert_similarity", "linear_cka"]


def linear_cka(outputs: torch.Tensor) -> torch.Tensor:
    """Linear CKA between every two of E output matrices: ``outputs`` [E, N, H] -> [E, E]."""
    centered = outputs.float() - outputs.float().mean(dim=1, keepdim=True)  # [E, N, H]
    grams = centered @ centered.transpose(1, 2)  # [E, N, N]
    flat = grams.flatten(1)  # [E, N * N]
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return flat @ flat.T  # [E, E]


@torch.no_grad()
def expert_outputs(experts: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert's unweighted output on the same tokens: ``hidden`` [N, H] -> [E, N, H]."""
    ones = hidden.new_ones(hidden.shape[0], 1)  # [N, 1]
    return torch.stack(
        [
            experts(hidden, torch.full_like(ones, expert, dtype=torch.long), ones)
            for expert in range(experts.num_experts)
        ]
    )


@torch.no_grad()
def expert_similarity(
    model: Any, batches: Sequence[CalibrationBatch], tokens_per_layer: int = 256, seed: int = 0
) -> dict[str, list[list[float]]]:
    """DiEP's gamma2 table of every MoE layer: {layer: [E x E]}, CKA over the layer mean."""
    if spec_for(model.config.model_type).dense_router:
        raise UnsupportedModelError(
            f"{model.config.model_type}: DiEP's similarity table needs an experts module called "
            "with (hidden, top_k_index, top_k_weights); this family computes every expert densely"
        )
    inputs = _record_expert_inputs(model, batches)
    generator = torch.Generator().manual_seed(seed)
    tables = {}
    for site in engine.moe_sites(model):
        hidden = torch.cat(inputs[site.name])  # [T, H]
        chosen = torch.randperm(hidden.shape[0], generator=generator)[:tokens_per_layer]
        cka = linear_cka(expert_outputs(site.module, hidden[chosen.to(hidden.device)]))  # [E, E]
        pairs = ~torch.eye(cka.shape[0], dtype=torch.bool, device=cka.device)
        tables[str(site.layer)] = (cka / cka[pairs].mean().clamp_min(1e-20)).cpu().tolist()
    return tables


def _record_expert_inputs(model: Any, batches: Sequence[CalibrationBatch]) -> dict[str, list[torch.Tensor]]:
    """Experts-module inputs of non-padding tokens, per MoE site, over ``batches``."""
    inputs: dict[str, list[torch.Tensor]] = {}
    current: dict[str, torch.Tensor] = {}
    handles = []
    for site in engine.moe_sites(model):

        def record(module, args, name=site.name):
            hidden, valid = args[0], current["valid"]  # [T, H], [B * L]
            kept = hidden[valid] if valid.numel() == hidden.shape[0] else hidden  # subsets: all
            inputs.setdefault(name, []).append(kept.detach())

        handles.append(site.module.register_forward_pre_hook(record))
    try:
        for batch in batches:
            current["valid"] = batch.inputs["attention_mask"].reshape(-1).bool()
            model(**batch.inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs
