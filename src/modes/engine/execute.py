"""Run a transformers experts module on the routed slots that survive skipping.

Three ways, chosen by the module's ``config._experts_implementation``:

- ``compacted`` (``grouped_mm``, ``batched_mm`` and any other registered kernel): the kept
  (token, slot) pairs are gathered into a ``k = 1`` call of the module's own implementation,
  so skipped rows are never gathered, multiplied or scattered, and no sentinel row (with its
  uninitialised output) ever reaches a kernel. The k partial outputs are summed in slot order,
  as transformers does. A call that skips nothing runs the module unchanged (no overhead,
  bit-identical). On CPU, a call left with fewer kept rows than experts (decode) runs the
  family's eager loop instead, which visits only the experts hit.
- ``sentinel`` (``eager``): skipped slots get index ``num_experts``, which the eager loop of
  every supported family skips, and weight 0; the loop's own summation order is kept.
- ``masked``: weights zeroed only, every expert still computed (eager loops that reject the
  sentinel index; no saving).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["run_compacted", "run_experts", "run_masked", "run_with_sentinels"]


def run_compacted(
    experts: nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    skip: torch.Tensor,
    eager_accepts_sentinel: bool = True,
) -> torch.Tensor:
    num_tokens, top_k = index.shape
    skipped = int(skip.sum())  # the one host sync of a call (free on CPU)
    if skipped == 0:  # the module itself: no gather, bit-identical
        return experts(hidden, index, weights)
    eager = _eager_loop_if_cheaper(experts, num_tokens * top_k - skipped)
    if eager is not None and eager_accepts_sentinel:  # the loop passes over sentinel slots
        return eager(experts, hidden, *_with_sentinels(experts, index, weights, skip))
    kept = (~skip).reshape(-1).nonzero().squeeze(1)  # [N] flat slot ids, N = kept slots
    out = hidden.new_zeros(num_tokens * top_k, hidden.shape[-1])  # [T * k, H]
    if kept.numel():
        forward = eager or type(experts).__call__
        rows = forward(
            experts,
            hidden[kept // top_k],  # [N, H]
            index.reshape(-1)[kept].unsqueeze(1),  # [N, 1]
            weights.reshape(-1)[kept].unsqueeze(1),  # [N, 1]
        )  # [N, H], already weighted
        out.index_copy_(0, kept, rows.to(out.dtype))
    return out.view(num_tokens, top_k, -1).sum(dim=1)  # [T, H]


def _eager_loop_if_cheaper(experts: nn.Module, kept: int):
    """The family's eager loop when skipping left fewer rows than experts on CPU, else None.

    Grouped kernels on CPU visit every expert, even empty ones (a fixed cost of about 10 us
    each), while the eager loop visits only the experts hit; after skipping, few rows usually
    hit few experts.
    """
    eager = getattr(type(experts).forward, "__wrapped__", None)  # use_experts_implementation keeps it
    on_cpu = next(experts.parameters()).device.type == "cpu"
    return eager if eager is not None and on_cpu and kept <= experts.num_experts else None


def _with_sentinels(
    experts: nn.Module, index: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Skipped slots routed to the sentinel expert ``num_experts`` with weight 0."""
    return index.masked_fill(skip, experts.num_experts), weights.masked_fill(skip, 0)


def run_with_sentinels(
    experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    return experts(hidden, *_with_sentinels(experts, index, weights, skip))


def run_masked(
    experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    return experts(hidden, index, weights.masked_fill(skip, 0))


def run_experts(
    experts: nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    skip: torch.Tensor,
    eager_accepts_sentinel: bool = True,
) -> torch.Tensor:
    """``hidden`` [T, H], ``index``/``weights``/``skip`` [T, k] -> [T, H] without skipped slots."""
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", "eager")
    if implementation in (None, "eager"):
        runner = run_with_sentinels if eager_accepts_sentinel else run_masked
        return runner(experts, hidden, index, weights, skip)
    return run_compacted(experts, hidden, index, weights, skip, eager_accepts_sentinel)
