"""Run a transformers experts module on the routed slots that survive skipping.

Three ways, chosen by the module's ``config._experts_implementation``:

- ``compacted`` (``grouped_mm``, ``batched_mm`` and any other registered kernel): the kept
  (token, slot) pairs are gathered into a ``k = 1`` call of the module's own implementation,
  so skipped rows are never gathered, multiplied or scattered, and no sentinel row (with its
  uninitialised output) ever reaches a kernel. The k partial outputs are summed in slot order,
  as transformers does. A call that skips nothing runs the module unchanged (no overhead,
  bit-identical).
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
    experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    num_tokens, top_k = index.shape
    kept = (~skip).reshape(-1).nonzero().squeeze(1)  # [N] flat slot ids, N = kept slots
    if kept.numel() == num_tokens * top_k:  # nothing skipped: the module itself, no gather
        return experts(hidden, index, weights)
    out = hidden.new_zeros(num_tokens * top_k, hidden.shape[-1])  # [T * k, H]
    if kept.numel():
        forward = _few_rows_forward(experts, kept.numel())
        rows = forward(
            experts,
            hidden[kept // top_k],  # [N, H]
            index.reshape(-1)[kept].unsqueeze(1),  # [N, 1]
            weights.reshape(-1)[kept].unsqueeze(1),  # [N, 1]
        )  # [N, H], already weighted
        out.index_copy_(0, kept, rows.to(out.dtype))
    return out.view(num_tokens, top_k, -1).sum(dim=1)  # [T, H]


def _few_rows_forward(experts: nn.Module, kept: int):
    """The module's own kernel, or its eager loop when skipping left fewer rows than experts.

    Grouped kernels on CPU visit every expert, even empty ones (a fixed cost of about 10 us
    each), while the eager loop visits only the experts hit; after skipping, few rows usually
    hit few experts.
    """
    eager = getattr(type(experts).forward, "__wrapped__", None)  # use_experts_implementation keeps it
    on_cpu = next(experts.parameters()).device.type == "cpu"
    if eager is not None and on_cpu and kept <= experts.num_experts:
        return eager
    return type(experts).__call__


def run_with_sentinels(
    experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    return experts(hidden, index.masked_fill(skip, experts.num_experts), weights.masked_fill(skip, 0))


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
    return run_compacted(experts, hidden, index, weights, skip)
