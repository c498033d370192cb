"""Modules that replace a model's experts (or, for dense-router families, its router).

Each keeps the original as ``base_layer`` (PEFT's habit) so `modes.remove` restores it, counts
skipped and total slots per modality into on-device tensors (no host sync), and leaves the
router, shared experts and everything else untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from modes.engine.execute import CpuChoice, choose_runner
from modes.engine.rules import Routing, SkipRule
from modes.engine.tokens import NUM_CODES, CallTokens, TokenContext

__all__ = ["SkippingDenseRouter", "SkippingExperts", "SlotCounter"]


class SlotCounter:
    """Skipped and total (token, routed slot) pairs per statistics bin, kept on device."""

    def __init__(self) -> None:
        self.skipped: torch.Tensor | None = None  # [OTHER + 1] int64
        self.total: torch.Tensor | None = None  # [OTHER + 1] int64

    def add(self, skip: torch.Tensor, tokens: CallTokens) -> None:
        """``skip`` [T, k] bool, never set on padding (which counts nowhere) or special tokens."""
        if self.total is None or self.total.device != skip.device:
            self.reset(skip.device)
        self.total.add_(tokens.counted_per_bin, alpha=skip.shape[1])
        self.skipped.index_add_(0, tokens.bins, skip.sum(dim=1))

    def reset(self, device: torch.device | None = None) -> None:
        device = device or (self.total.device if self.total is not None else torch.device("cpu"))
        self.skipped = torch.zeros(NUM_CODES - 1, dtype=torch.long, device=device)
        self.total = torch.zeros(NUM_CODES - 1, dtype=torch.long, device=device)


class _Skipping(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        layer: int,
        rule: SkipRule,
        context: TokenContext,
        routed_scale: float = 1.0,
        subset: str | None = None,
        renormalize: bool = False,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.layer = layer
        self.rule = rule
        self.context = context
        self.routed_scale = routed_scale
        self.subset = subset
        self.renormalize = renormalize
        self.counter = SlotCounter()

    def decide(
        self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Skip mask [T, k] for tokens ``hidden`` [T, H] routed to ``index`` with ``weights``
        [T, k], and the weights to use."""
        tokens = self.context.tokens_for(self.subset, weights.shape[0])
        routing = Routing(
            pi=weights if self.routed_scale == 1 else weights / self.routed_scale,
            index=index,
            codes=tokens.codes,
            hidden=hidden,
            attention_received=self.context.select(
                self.subset, self.context.attention_received.get(self.layer)
            ),
            sequence=self.context.select(self.subset, self.context.sequence),
        )
        skip = self.rule.skip_mask(routing) & tokens.skippable  # [T, k]; never special tokens, padding
        self.counter.add(skip, tokens)
        if self.renormalize:
            kept = weights.masked_fill(skip, 0)
            scale = weights.sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True).clamp_min(1e-20)
            weights = kept * scale
        return skip, weights


class SkippingExperts(_Skipping):
    """Wraps an experts module called as ``experts(hidden [T, H], index [T, k], weights [T, k])``."""

    def __init__(
        self, *args, eager_accepts_sentinel: bool = True, cpu_choice: CpuChoice | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.eager_accepts_sentinel = eager_accepts_sentinel
        cpu_choice = cpu_choice or CpuChoice(None, "loop")
        self.cpu_path = cpu_choice.path  # the CPU path, if any (packed copies live here)
        self.execution = cpu_choice.description  # for `execution_info`
        self.runner = choose_runner(self.base_layer, eager_accepts_sentinel, self.cpu_path)

    def forward(
        self, hidden_states: torch.Tensor, *routing: torch.Tensor, **named: torch.Tensor
    ) -> torch.Tensor:
        index, weights = _routing_arguments(routing, named)
        skip, weights = self.decide(hidden_states, index, weights)
        return self.runner(self.base_layer, hidden_states, index, weights, skip)


class SkippingDenseRouter(_Skipping):
    """Wraps a router returning dense ``(scores [T, E], logits)`` with zeros off the top-k (Llama 4).

    The family's experts then run every expert on router-scaled inputs, so skipping here zeroes
    the skipped scores: exact, but it saves no compute (transformers computes all experts).
    """

    execution = "every expert computed (a dense router: skipping saves no compute)"

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, logits = self.base_layer(hidden_states)  # [T, E], [T, E]
        weights, index = torch.topk(scores, self.base_layer.top_k, dim=1)  # [T, k]
        skip, weights = self.decide(hidden_states, index, weights)
        scores = torch.zeros_like(scores).scatter_(1, index, weights.masked_fill(skip, 0))
        return scores, logits


def _routing_arguments(
    routing: tuple[torch.Tensor, ...], named: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index, top_k_weights) whichever way the family passes them (GPT-OSS names them)."""
    if len(routing) == 2:
        return routing[0], routing[1]
    index = named.get("top_k_index", named.get("router_indices"))
    weights = named.get("top_k_weights", named.get("routing_weights"))
    if index is None or weights is None:
        raise TypeError("modes: experts module called without (top_k_index, top_k_weights)")
    return index, weights
