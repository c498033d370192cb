"""Skipping rules: which of a token's k routed slots to drop at one MoE layer.

MoDES's threshold rule and the baselines' rules (algorithm.md sections 2 and 5); the typed
configs in `modes.policies` build them, one per MoE layer.

A rule sees one layer's `Routing` (combination weights pi before any constant routed-scaling
factor, expert ids, modality codes, and what token-aware baselines need) and returns a boolean
mask. The wrapper never lets any rule skip special tokens or padding (codes OTHER and PAD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from modes.adapters.registry import MODALITIES
from modes.engine.tokens import NUM_CODES, PAD

__all__ = [
    "DiepRule",
    "KReduction",
    "McMoeRule",
    "NaeeRule",
    "Routing",
    "SkipRule",
    "ThresholdRule",
    "protected_tokens",
]


@dataclass(frozen=True)
class Routing:
    """What one experts call routed, as a rule sees it (T tokens, k slots, H hidden)."""

    pi: torch.Tensor  # [T, k] float, combination weights without the routed-scaling factor
    index: torch.Tensor  # [T, k] long, expert id of each slot
    codes: torch.Tensor  # [T] long, modality code of each token
    hidden: torch.Tensor | None = None  # [T, H], the experts' input
    attention_received: torch.Tensor | None = None  # [T], prefill only, when a rule asked for it
    sequence: torch.Tensor | None = None  # [T] long, the batch row of each token

    @classmethod
    def of(cls, pi: torch.Tensor, codes: torch.Tensor | None = None) -> Routing:
        """Router outputs alone (tests, benchmarks): slots routed to experts 0..k-1, text tokens."""
        index = torch.arange(pi.shape[1], device=pi.device).expand(pi.shape[0], -1)  # [T, k]
        if codes is None:
            codes = torch.zeros(pi.shape[0], dtype=torch.long, device=pi.device)
        return cls(pi, index, codes)


class SkipRule(Protocol):
    def skip_mask(self, routing: Routing) -> torch.Tensor:
        """[T, k] bool, True = skip the slot."""
        ...


class ThresholdRule:
    """MoDES (GMLG + DMT): skip slot i of token x iff alpha_m(l) * pi_i < tau_m."""

    def __init__(self, alpha: dict[str, float], tau: dict[str, float]):
        never = float("-inf")  # s >= 0 > -inf: the slot is kept
        alpha_by_code = torch.zeros(NUM_CODES, dtype=torch.float32)
        tau_by_code = torch.full((NUM_CODES,), never, dtype=torch.float32)
        for code, modality in enumerate(MODALITIES):
            if modality in tau:
                alpha_by_code[code] = alpha[modality]
                tau_by_code[code] = tau[modality]
        self.alpha_by_code = alpha_by_code  # [C]
        self.tau_by_code = tau_by_code  # [C]

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        pi, codes = routing.pi, routing.codes
        if self.alpha_by_code.device != pi.device:
            self.alpha_by_code = self.alpha_by_code.to(pi.device)
            self.tau_by_code = self.tau_by_code.to(pi.device)
        alpha = self.alpha_by_code[codes].unsqueeze(1)  # [T, 1]
        tau = self.tau_by_code[codes].unsqueeze(1)  # [T, 1]
        return alpha * pi.float() < tau  # [T, k]


def _ranks(pi: torch.Tensor) -> torch.Tensor:
    """0-based rank of each slot by weight, largest first ([T, k]); routers need not sort."""
    return pi.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


class KReduction:
    """Keep the top ``keep`` slots by weight."""

    def __init__(self, keep: int):
        self.keep = keep

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        return _ranks(routing.pi) >= self.keep  # [T, k]


class NaeeRule:
    """NAEE generalised to top-k: skip ranks i..k for the smallest i >= 2 whose tail sum of
    weights is below ``beta`` times the total."""

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
    """DiEP: skip rank i >= 2 when pi_i < gamma1 * gamma2(top-1 expert, e_i) * pi_top1."""

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
