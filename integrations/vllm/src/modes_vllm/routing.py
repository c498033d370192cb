"""The MoDES skipping rule for inference engines: plain torch, no transformers, no host syncs.

An engine that routes tokens itself (vLLM, SGLang) keeps its own MoE kernels and asks this
module, per MoE layer, which of each token's top-k slots to drop: `RoutingTables` holds a
plan's alphas and thresholds as small tensors and the token ids that decide each token's
modality; `route` turns one layer's routing (router logits, or top-k weights and expert ids)
into kept weights and expert ids, with -1 (and weight 0) where a slot is skipped (`route_coded`
takes the tokens' modality codes instead, computed once per forward). Every step
is a fixed-shape tensor op on the routing's device, so it can sit inside a CUDA graph.

The rule and the token codes are those of `modes.apply` (checked against it in the tests):
slot i of token x at layer l is skipped iff alpha_m(l) * pi_i < tau_m, m the token's modality;
media placeholder ids are visual (or audio), special ids are never skipped, and decode tokens
(``decode`` mask) are text.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MODALITIES", "RoutingTables", "route", "route_coded"]

MODALITIES = ("text", "visual", "audio")  # the order of `modes.adapters.registry.MODALITIES`
OTHER = len(MODALITIES)  # special tokens: never skipped
NEVER = float("-inf")  # a threshold no score falls below


@dataclass(frozen=True)
class RoutingTables:
    """A MoDES plan as tensors: ``alpha`` [L, C] per MoE layer row and modality code, ``tau`` [C]
    (-inf for codes never skipped), and the token ids that mark media and special tokens."""

    layers: dict[int, int]  # MoE layer index -> row of ``alpha``
    alpha: torch.Tensor  # [L, C]
    tau: torch.Tensor  # [C]
    media_ids: dict[str, torch.Tensor]  # modality -> ids [n]
    special_ids: torch.Tensor  # [s]

    @classmethod
    def from_plan(
        cls,
        plan: dict[str, Any],
        media_ids: dict[str, Iterable[int]],
        special_ids: Iterable[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> RoutingTables:
        """From a plan file's JSON (format 1 or 2, MoDES policy). ``special_ids`` default to the
        ids the plan was searched with; ``media_ids`` come from the model's config (e.g.
        ``{"visual": [config.image_token_id, config.video_token_id]}``)."""
        policy = plan.get("policy") or {"name": plan.get("method", "modes"), **plan}
        if policy.get("name") != "modes":
            raise ValueError(f"route() runs MoDES plans; this plan's policy is {policy.get('name')!r}")
        importance = {int(layer): alphas for layer, alphas in policy["importance"].items()}
        thresholds = policy["thresholds"]
        layers = {layer: row for row, layer in enumerate(sorted(importance))}
        alpha = torch.zeros(len(layers), OTHER + 1)
        tau = torch.full((OTHER + 1,), NEVER)
        for code, modality in enumerate(MODALITIES):
            if modality in thresholds:
                tau[code] = float(thresholds[modality])
                for layer, row in layers.items():
                    alpha[row, code] = float(importance[layer][modality])
        special = plan.get("special_token_ids") if special_ids is None else special_ids
        media = {m: torch.tensor(sorted(set(ids)), dtype=torch.long) for m, ids in media_ids.items()}
        media_all = {i for ids in media.values() for i in ids.tolist()}
        special_tensor = torch.tensor(sorted(set(special or ()) - media_all), dtype=torch.long)
        return cls(layers, alpha, tau, media, special_tensor).to(device)

    def to(self, device: torch.device | str) -> RoutingTables:
        return RoutingTables(
            self.layers,
            self.alpha.to(device),
            self.tau.to(device),
            {m: ids.to(device) for m, ids in self.media_ids.items()},
            self.special_ids.to(device),
        )

    def token_codes(self, token_ids: torch.Tensor, decode: torch.Tensor | None = None) -> torch.Tensor:
        """[T] modality code of each token of ``token_ids`` [T]; ``decode`` [T] bool marks
        generated tokens (text, whatever their id)."""
        codes = torch.zeros_like(token_ids)  # text
        for modality, ids in self.media_ids.items():
            codes = torch.where(torch.isin(token_ids, ids), MODALITIES.index(modality), codes)
        codes = torch.where(torch.isin(token_ids, self.special_ids), OTHER, codes)
        if decode is not None:
            codes = torch.where(decode, 0, codes)
        return codes


def route(
    tables: RoutingTables,
    layer: int,
    token_ids: torch.Tensor,
    *,
    router_logits: torch.Tensor | None = None,
    top_k: int | None = None,
    normalize: bool = True,
    weights: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
    routed_scale: float = 1.0,
    decode: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept weights [T, k] (0 where skipped) and expert ids [T, k] (-1 where skipped) of MoE
    layer ``layer`` for tokens ``token_ids`` [T].

    Routing comes as ``router_logits`` [T, E] (softmax, top ``top_k``, renormalised when
    ``normalize``, as Qwen3-MoE-style routers do) or as the engine's own top-k ``weights`` and
    ``expert_ids`` [T, k]; ``routed_scale`` is a constant factor already in the weights (the
    rule compares pi = weight / routed_scale).
    """
    if router_logits is not None:
        if top_k is None:
            raise ValueError("route() with router_logits needs top_k")
        probabilities = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
        weights, expert_ids = torch.topk(probabilities, top_k, dim=-1)  # [T, k] each
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights is None or expert_ids is None:
        raise ValueError("route() needs router_logits and top_k, or weights and expert_ids")
    codes = tables.token_codes(token_ids, decode)  # [T]
    return route_coded(tables, layer, codes, weights, expert_ids, routed_scale)


def route_coded(
    tables: RoutingTables,
    layer: int,
    codes: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    routed_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`route` for tokens whose modality codes [T] (`RoutingTables.token_codes`) are known: an
    engine computes them once per forward instead of once per MoE layer."""
    alpha = tables.alpha[tables.layers[layer]][codes].unsqueeze(1)  # [T, 1]
    tau = tables.tau[codes].unsqueeze(1)  # [T, 1]
    skip = alpha * (weights.float() / routed_scale) < tau  # [T, k]
    return weights.masked_fill(skip, 0), expert_ids.masked_fill(skip, -1)
