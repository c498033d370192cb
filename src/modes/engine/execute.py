"""Run a transformers experts module on the routed slots that survive skipping.

Three ways, chosen by the module's ``config._experts_implementation``:

- ``compacted`` (``grouped_mm``, ``batched_mm`` and any other registered kernel): the kept
  (token, slot) pairs are gathered into a ``k = 1`` call of the module's own implementation,
  so skipped rows are never gathered, multiplied or scattered, and no sentinel row (with its
  uninitialised output) ever reaches a kernel. The kept partial outputs are summed per token
  in fp32, as transformers' reduction does. A call that skips nothing runs the module
  unchanged (no overhead, bit-identical). On CPU, a call left with fewer kept rows than
  experts (decode) runs a loop over the experts hit instead (`run_expert_loop`), which sends
  a single bf16 row through ATen's GEMV rather than oneDNN.
- ``sentinel`` (``eager``): skipped slots get index ``num_experts``, which the eager loop of
  every supported family skips, and weight 0; the loop's own summation order is kept.
- ``masked``: weights zeroed only, every expert still computed (eager loops that reject the
  sentinel index; no saving).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["run_compacted", "run_expert_loop", "run_experts", "run_masked", "run_with_sentinels"]


def run_compacted(
    experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    num_tokens, top_k = index.shape
    kept = (~skip).reshape(-1).nonzero().squeeze(1)  # [N] flat slot ids, N = kept slots
    if kept.numel() == num_tokens * top_k:  # nothing skipped: the module itself, no gather
        return experts(hidden, index, weights)
    if not kept.numel():  # every slot skipped
        return torch.zeros_like(hidden)
    if _loop_is_cheaper(experts, kept.numel()):
        return run_expert_loop(experts, hidden, index, weights, kept)
    tokens = kept // top_k  # [N]
    rows = experts(
        hidden[tokens],  # [N, H]
        index.reshape(-1)[kept].unsqueeze(1),  # [N, 1]
        weights.reshape(-1)[kept].unsqueeze(1),  # [N, 1]
    )  # [N, H], already weighted
    return _sum_per_token(rows, tokens, hidden)


def _loop_is_cheaper(experts: nn.Module, kept: int) -> bool:
    """On CPU, when skipping left fewer rows than experts (decode): grouped kernels there
    visit every expert, even empty ones (about 10 us each), while the loop visits only the
    experts hit, with fewer small ops per expert than the families' eager loops."""
    structured = hasattr(experts, "has_gate")  # described by transformers' use_experts_implementation
    on_cpu = next(experts.parameters()).device.type == "cpu"
    return structured and on_cpu and kept <= experts.num_experts


def run_expert_loop(
    experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """The kept slots ``kept`` [N] (flat ids into [T, k]) through the experts they route to, one
    expert at a time: the same math as transformers' grouped kernel, for any experts module
    described by ``use_experts_implementation`` (layout, bias, gate and norm flags).

    Meant for few rows (decode), where each small op counts: rows are grouped by expert on
    the host from one read of the slot and expert ids, and when every token keeps exactly one
    slot there is nothing to sum, so its weighted row is its output.
    """
    num_tokens, top_k = index.shape
    if not kept.numel():  # every slot skipped
        return torch.zeros_like(hidden)
    slot_ids = kept.tolist()
    expert_of_slot = index.reshape(-1)[kept].tolist()
    order = sorted(range(len(slot_ids)), key=expert_of_slot.__getitem__)  # stable, by expert
    slot_ids = [slot_ids[i] for i in order]
    token_ids = [slot // top_k for slot in slot_ids]
    slots = torch.tensor(slot_ids, dtype=torch.long, device=kept.device)  # [N], grouped by expert
    tokens = torch.tensor(token_ids, dtype=torch.long, device=kept.device)  # [N]
    rows = hidden if token_ids == list(range(num_tokens)) else hidden[tokens]  # [N, H]
    outputs, start = [], 0
    for expert, group in itertools.groupby(expert_of_slot[i] for i in order):
        count = len(list(group))
        with _fastest_cpu_kernel(experts, rows.dtype, count):
            outputs.append(_expert_mlp(experts, expert, rows[start : start + count]))
        start += count
    out_rows = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [N, H]
    weighted = out_rows * weights.reshape(-1)[slots].unsqueeze(1)  # [N, H]
    if len(token_ids) == num_tokens == len(set(token_ids)):  # one kept slot per token
        weighted = weighted.to(hidden.dtype)
        return weighted if rows is hidden else torch.empty_like(hidden).index_copy_(0, tokens, weighted)
    return _sum_per_token(weighted, tokens, hidden)


@contextlib.contextmanager
def _fastest_cpu_kernel(experts: nn.Module, dtype: torch.dtype, rows: int) -> Iterator[None]:
    """One bf16 row through an expert stored [out, in]: ATen's own bf16 GEMV (row . weight
    rows) streams the weights near memory bandwidth, about twice as fast as oneDNN's M = 1 GEMM,
    which matmul picks while oneDNN is enabled (measured in BENCHMARKS.md). Two or more rows,
    and weights stored [in, out] (ATen's path is 8x slower there), stay with oneDNN. The switch
    is process-wide for the expert's duration: a bf16 matmul of another thread in that window
    takes ATen's path too (same result up to rounding)."""
    onednn_in_use = torch.backends.mkldnn.enabled and not torch.backends.flags_frozen()
    if dtype != torch.bfloat16 or rows != 1 or experts.is_transposed or not onednn_in_use:
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


def _sum_per_token(rows: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Weighted expert outputs ``rows`` [N, H] of tokens ``tokens`` [N] summed per token in
    fp32, as transformers' reduction does, into ``hidden``'s shape [T, H] and dtype; a [T, H]
    accumulator, not [T * k, H], so memory traffic follows the kept rows."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, tokens, rows.float()).to(hidden.dtype)


def _expert_mlp(experts: nn.Module, expert: int, rows: torch.Tensor) -> torch.Tensor:
    """One expert on ``rows`` [n, H] -> [n, H], unweighted."""
    if experts.has_gate:
        up = _project(experts, rows, experts.gate_up_proj[expert], "gate_up_proj_bias", expert)
        up = experts._apply_gate(up)
    else:
        up = experts.act_fn(_project(experts, rows, experts.up_proj[expert], "up_proj_bias", expert))
    down = _project(experts, up, experts.down_proj[expert], "down_proj_bias", expert)
    return experts.post_expert_norm(down) if experts.has_post_expert_norm else down


def _project(
    experts: nn.Module, rows: torch.Tensor, weight: torch.Tensor, bias: str, expert: int
) -> torch.Tensor:
    out = rows @ weight if experts.is_transposed else torch.nn.functional.linear(rows, weight)
    return out + getattr(experts, bias)[expert] if experts.has_bias else out


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
