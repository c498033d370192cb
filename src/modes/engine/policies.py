"""Baseline skipping policies that share the MoDES engine (algorithm.md section 5).

Each policy is a `SkipRule` built from a plan's ``method`` and ``parameters``; all skip only
among a token's k routed slots, and the wrapper never lets any of them skip special tokens.

- ``k_reduction``: keep the top k' slots (``{"keep": k'}``); ratio exactly 1 - k'/k.
- ``naee``: NAEE generalised to top-k as the MoDES paper re-implemented it: with the token's
  weights sorted pi_1 >= ... >= pi_k, skip ranks i..k for the smallest i >= 2 whose tail sum
  is below beta(l) times the total. ``{"beta": {layer: median pi_2 / pi_1}, "scale": s}``,
  s found by bisection to reach a target ratio (the paper used a genetic search).
- ``mc_moe``: the NAEE rule, except that in prefill the top ``protect`` fraction (2%) of each
  sequence's tokens by importance ||x||_1 * attention received / queries that see the token
  keep every slot. Same parameters as NAEE plus ``protect``.
- ``diep``: rank i >= 2 is skipped when pi_i < gamma1(l) * s * gamma2(l, e_1, e_i) * pi_1, with
  gamma1 the NAEE median and gamma2 the CKA similarity of the top-1 expert's and expert e_i's
  outputs over the layer's mean pairwise CKA (``{"gamma1": {layer: g}, "cka": {layer: [[E x E]]},
  "scale": s}``). DiEP states the rule for the top-2 expert; comparing every lower rank with
  the top-1 the same way is our reading for top-k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from modes.engine.rule import Routing, SkipRule, ThresholdRule
from modes.engine.tokens import PAD
from modes.plan import PlanError, SkipPlan

__all__ = [
    "DiepRule",
    "KReduction",
    "McMoeRule",
    "NaeeRule",
    "parameter_experts",
    "parameter_layers",
    "protected_tokens",
    "rule_for",
    "validate_parameters",
]


def _ranks(pi: torch.Tensor) -> torch.Tensor:
    """0-based rank of each slot by weight, largest first ([T, k]); routers need not sort."""
    return pi.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


class KReduction:
    def __init__(self, keep: int):
        self.keep = keep

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        return _ranks(routing.pi) >= self.keep  # [T, k]


class NaeeRule:
    def __init__(self, beta: float):
        self.beta = beta

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        ordered, order = routing.pi.float().sort(dim=1, descending=True)  # [T, k]
        tail = ordered.flip(1).cumsum(1).flip(1)  # [T, k] sum of ranks r..k
        total = tail[:, :1]  # [T, 1]
        skip_sorted = tail < self.beta * total
        skip_sorted[:, 0] = False  # the top-1 expert is always kept (i >= 2)
        return torch.zeros_like(skip_sorted).scatter_(1, order, skip_sorted)


def protected_tokens(routing: Routing, fraction: float) -> torch.Tensor:
    """[T] bool: each sequence's top ``fraction`` of tokens (at least one) by MC-MoE importance.

    Importance = ||x||_1 * attention received (see `modes.engine.attention`); padding never
    counts. Without attention scores (decode steps) nothing is protected.
    """
    received, hidden, sequence = routing.attention_received, routing.hidden, routing.sequence
    if received is None or hidden is None or sequence is None:
        return torch.zeros_like(routing.codes, dtype=torch.bool)
    valid = routing.codes != PAD  # [T]
    importance = hidden.float().abs().sum(dim=1) * received.float()  # [T]
    importance = importance.masked_fill(~valid, float("-inf"))
    by_importance = importance.argsort(descending=True, stable=True)  # [T]
    order = by_importance[sequence[by_importance].argsort(stable=True)]  # grouped by sequence
    sizes = torch.bincount(sequence, minlength=int(sequence.max()) + 1)  # [B]
    starts = sizes.cumsum(0) - sizes  # [B]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[sequence[order]]
    valid_per_sequence = torch.bincount(sequence, weights=valid.float(), minlength=sizes.numel())  # [B]
    quota = (valid_per_sequence * fraction).ceil().clamp_min(1)  # [B]
    return valid & (rank < quota[sequence])


class McMoeRule(NaeeRule):
    """NAEE with MC-MoE's token protection (prefill only)."""

    needs_attention = True

    def __init__(self, beta: float, protect: float = 0.02):
        super().__init__(beta)
        self.protect = protect

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        skip = super().skip_mask(routing)  # [T, k]
        return skip & ~protected_tokens(routing, self.protect).unsqueeze(1)


class DiepRule:
    def __init__(self, gamma1: float, gamma2: torch.Tensor):
        self.gamma1 = gamma1
        self.gamma2 = gamma2  # [E, E]

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        if self.gamma2.device != routing.pi.device:
            self.gamma2 = self.gamma2.to(routing.pi.device)
        pi = routing.pi.float()
        top = pi.argmax(dim=1, keepdim=True)  # [T, 1] slot of the top-1 expert
        top_expert = routing.index.gather(1, top)  # [T, 1]
        top_weight = pi.gather(1, top)  # [T, 1]
        gamma2 = self.gamma2[top_expert, routing.index]  # [T, k]
        skip = pi < self.gamma1 * gamma2 * top_weight  # [T, k]
        return skip.scatter(1, top, False)


def _layer_value(parameters: dict[str, Any], name: str, layer: int) -> float:
    return float(parameters[name][str(layer)]) * float(parameters.get("scale", 1.0))


_FACTORIES: dict[str, Callable[[SkipPlan, int], SkipRule]] = {
    "modes": ThresholdRule.from_plan,
    "k_reduction": lambda plan, layer: KReduction(int(plan.parameters["keep"])),
    "naee": lambda plan, layer: NaeeRule(_layer_value(plan.parameters, "beta", layer)),
    "mc_moe": lambda plan, layer: McMoeRule(
        _layer_value(plan.parameters, "beta", layer), float(plan.parameters.get("protect", 0.02))
    ),
    "diep": lambda plan, layer: DiepRule(
        _layer_value(plan.parameters, "gamma1", layer),
        torch.tensor(plan.parameters["cka"][str(layer)], dtype=torch.float32),
    ),
}
_LAYER_TABLES = {"naee": "beta", "mc_moe": "beta", "diep": "gamma1"}


def rule_for(plan: SkipPlan, layer: int) -> SkipRule:
    return _FACTORIES[plan.method](plan, layer)


def _check_layer_table(method: str, parameters: dict[str, Any], name: str) -> None:
    table = parameters.get(name)
    if not isinstance(table, dict) or not table:
        raise PlanError(f"{method} needs {name!r}: {{layer: value}}")
    values = [*table.values(), parameters.get("scale", 1.0)]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
        raise PlanError(f"{method} {name} and scale must be finite and >= 0, got {values}")


def _check_cka(parameters: dict[str, Any]) -> None:
    cka, layers = parameters.get("cka"), set(parameters["gamma1"])
    if not isinstance(cka, dict) or set(cka) != layers:
        raise PlanError(f"diep needs 'cka': one [E x E] table for each of the layers {sorted(layers)}")
    for layer, table in cka.items():
        tensor = torch.tensor(table, dtype=torch.float32)
        if tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1] or not bool(torch.isfinite(tensor).all()):
            raise PlanError(f"diep cka table of layer {layer} must be a finite square matrix")


def validate_parameters(method: str, parameters: dict[str, Any]) -> None:
    if method not in _FACTORIES:
        raise PlanError(f"unknown method {method!r}; known: {sorted(_FACTORIES)}")
    if method == "k_reduction":
        keep = parameters.get("keep")
        if not isinstance(keep, int) or keep < 0:
            raise PlanError(f"k_reduction needs an integer 'keep' >= 0, got {keep!r}")
    if method in _LAYER_TABLES:
        _check_layer_table(method, parameters, _LAYER_TABLES[method])
    if method == "mc_moe":
        protect = parameters.get("protect", 0.02)
        if not isinstance(protect, (int, float)) or not 0 <= protect <= 1:
            raise PlanError(f"mc_moe 'protect' must be a fraction in [0, 1], got {protect!r}")
    if method == "diep":
        _check_cka(parameters)


def parameter_experts(method: str, parameters: dict[str, Any]) -> set[int]:
    """Expert counts a policy's per-expert tables assume (empty: none)."""
    if method == "diep":
        return {len(table) for table in parameters["cka"].values()}
    return set()


def parameter_layers(method: str, parameters: dict[str, Any]) -> set[int] | None:
    """Layers a policy's parameters name (None: the policy is layer-independent)."""
    if method in _LAYER_TABLES:
        return {int(layer) for layer in parameters[_LAYER_TABLES[method]]}
    return None
