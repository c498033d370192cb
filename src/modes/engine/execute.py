"""Run a transformers experts module on the routed slots that survive skipping.

Three ways, chosen by the module's ``config._experts_implementation``:

- ``compacted`` (``grouped_mm``, ``batched_mm`` and any other registered kernel): the kept
  (token, slot) pairs are gathered into a ``k = 1`` call of the module's own implementation,
  so skipped rows are never gathered, multiplied or scattered, and no sentinel row (with its
  uninitialised output) ever reaches a kernel. The kept partial outputs are summed per token
  in fp32, as transformers' reduction does. A call that skips nothing runs the module
  unchanged (no overhead, bit-identical). A `CpuPath` decides which calls run a loop over
  just the experts hit instead (`run_expert_loop`) and how that loop projects: modes' compiled
  kernel (`CompiledExperts`, the default on CPU where a build runs), expert weights packed for
  oneDNN (`PackedExperts`), whatever the implementation, or, without either (`PlainLoop`),
  calls on CPU left with fewer kept rows than experts (decode), on the module's weights.
- ``sentinel`` (``eager``): skipped slots get index ``num_experts``, which the eager loop of
  every supported family skips, and weight 0; the loop's own summation order is kept.
- ``masked``: weights zeroed only, every expert still computed (eager loops that reject the
  sentinel index; no saving).

The choice is made once per experts module, when the model is patched (`choose_runner`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import nn

from modes.errors import UsageError

__all__ = [
    "CpuChoice",
    "CpuPath",
    "ExpertsRunner",
    "PlainLoop",
    "check_cpu_experts",
    "choose_runner",
    "is_experts_module",
    "project_each_expert",
    "run_compacted",
    "run_expert_loop",
    "run_experts",
    "run_masked",
    "run_with_sentinels",
]


def is_experts_module(module: nn.Module) -> bool:
    """Structural check for transformers' experts modules (`use_experts_implementation`), whose
    layout flags (gate, transposed, bias, norm) `run_expert_loop` is written against."""
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "_is_expert_parallel")
        and hasattr(module, "num_experts")
    )


class CpuPath(Protocol):
    """A faster CPU execution of one experts module's projections, made when the model is patched."""

    def usable_for(self, experts: nn.Module, hidden: torch.Tensor) -> bool:
        """Whether it still holds for ``experts`` and inputs like ``hidden`` (device, dtype, weights)."""
        ...

    def runs_loop(self, kept: int, num_experts: int) -> bool:
        """Whether a call keeping ``kept`` rows runs the expert loop (else the module's own kernel)."""
        ...

    def project_runs(
        self, experts: nn.Module, rows: torch.Tensor, name: str, runs: list[tuple[int, int]]
    ) -> torch.Tensor:
        """``rows`` [N, in] grouped in ``runs`` of (expert, count) through projection ``name``
        -> [N, out], no bias."""
        ...


class CpuChoice(NamedTuple):
    """The CPU path that runs one experts module's kept rows (None: the loop or the module's own
    kernel), and a line for `modes.execution_info` saying which and, for a fallback, why."""

    path: CpuPath | None
    description: str


def check_cpu_experts(experts: nn.Module, option: str) -> nn.Parameter:
    """What both CPU paths need: raise a ValueError naming the fix unless ``experts`` is one of
    transformers' experts modules (`is_experts_module`) on CPU; else its first parameter."""
    fix = "apply with execution='loop'"
    if not is_experts_module(experts):
        raise UsageError(
            f"{option} needs experts described by transformers' use_experts_implementation; "
            f"{type(experts).__name__} is not: {fix}"
        )
    parameter = next(experts.parameters())
    if parameter.device.type != "cpu":
        raise UsageError(f"{option} is a CPU option and the experts are on {parameter.device}: {fix}")
    return parameter


class PlainLoop:
    """The expert loop on the module's own weights, for CPU calls left with fewer kept rows than
    experts (decode): grouped kernels visit every expert there, even empty ones, while the loop
    visits only the experts hit."""

    def usable_for(self, experts: nn.Module, hidden: torch.Tensor) -> bool:
        """On CPU, with the weights in place (accelerate's offload keeps them on "meta" outside
        the module's own forward, so the loop could not read them)."""
        return hidden.device.type == "cpu" and experts.down_proj.device == hidden.device

    def runs_loop(self, kept: int, num_experts: int) -> bool:
        return kept <= num_experts

    def project_runs(
        self, experts: nn.Module, rows: torch.Tensor, name: str, runs: list[tuple[int, int]]
    ) -> torch.Tensor:
        return project_each_expert(experts, rows, name, runs)


def run_compacted(
    experts: nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    skip: torch.Tensor,
    cpu_path: CpuPath | None = None,
    fallback: ExpertsRunner | None = None,
) -> torch.Tensor:
    """The kept slots through the module's own kernel as one ``k = 1`` call, or through the
    expert loop where ``cpu_path`` (default `PlainLoop`) takes the call. Where ``cpu_path`` no
    longer holds (weights changed, another device), ``fallback`` runs the call if given."""
    cpu_path = cpu_path or PlainLoop()
    if not cpu_path.usable_for(experts, hidden):
        if fallback is not None:
            return fallback(experts, hidden, index, weights, skip)
        cpu_path = None
    num_tokens, top_k = index.shape
    kept = (~skip).reshape(-1).nonzero().squeeze(1)  # [N] flat slot ids, N = kept slots
    if kept.numel() == num_tokens * top_k:  # nothing skipped: the module itself, no gather
        return experts(hidden, index, weights)
    if not kept.numel():  # every slot skipped
        return torch.zeros_like(hidden)
    if cpu_path is not None and cpu_path.runs_loop(kept.numel(), experts.num_experts):
        return run_expert_loop(experts, hidden, index, weights, kept, cpu_path)
    tokens = kept // top_k  # [N]
    rows = experts(
        hidden[tokens],  # [N, H]
        index.reshape(-1)[kept].unsqueeze(1),  # [N, 1]
        weights.reshape(-1)[kept].unsqueeze(1),  # [N, 1]
    )  # [N, H], already weighted
    return _sum_per_token(rows, tokens, hidden)


def run_expert_loop(
    experts: nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    kept: torch.Tensor,
    cpu_path: CpuPath | None = None,
) -> torch.Tensor:
    """The kept slots ``kept`` [N] (flat ids into [T, k]) through the experts they route to,
    grouped by expert: the same math as transformers' grouped kernel, for any experts module
    described by ``use_experts_implementation`` (layout, bias, gate and norm flags), its
    projections by ``cpu_path`` (default: one expert at a time on the module's weights).

    Each small op counts when rows are few (decode): when every token keeps exactly one slot
    there is nothing to sum, so its weighted row is its output.
    """
    num_tokens = index.shape[0]
    cpu_path = cpu_path or PlainLoop()
    if not kept.numel():  # every slot skipped
        return torch.zeros_like(hidden)
    groups = _group_by_expert(index, kept, few=kept.numel() <= experts.num_experts)
    rows = hidden if groups.in_token_order(num_tokens) else hidden[groups.tokens]  # [N, H]
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    projected = _project_runs(experts, rows, first, groups, cpu_path)  # [N, 2I] or [N, I]
    inner = experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)  # [N, I]
    out_rows = _project_runs(experts, inner, "down_proj", groups, cpu_path)  # [N, H]
    if experts.has_post_expert_norm:
        out_rows = experts.post_expert_norm(out_rows)
    weighted = out_rows * weights.reshape(-1)[groups.slots].unsqueeze(1)  # [N, H]
    if groups.one_per_token(num_tokens):
        weighted = weighted.to(hidden.dtype)
        if rows is hidden:
            return weighted
        return torch.empty_like(hidden).index_copy_(0, groups.tokens, weighted)
    return _sum_per_token(weighted, groups.tokens, hidden)


class _ExpertGroups(NamedTuple):
    """Kept slots ordered by expert: ``slots``, their ``tokens`` and ``row_experts`` [N], ``runs``
    of (expert, rows), and ``token_ids`` on the host when they were grouped there (few rows)."""

    slots: torch.Tensor
    tokens: torch.Tensor
    row_experts: torch.Tensor
    runs: list[tuple[int, int]]
    token_ids: list[int] | None

    def in_token_order(self, num_tokens: int) -> bool:
        return self.token_ids == list(range(num_tokens))

    def one_per_token(self, num_tokens: int) -> bool:
        ids = self.token_ids
        return ids is not None and len(ids) == num_tokens == len(set(ids))


def _group_by_expert(index: torch.Tensor, kept: torch.Tensor, few: bool) -> _ExpertGroups:
    """Group the kept slots [N] by expert, stably: for few rows (decode) on the host, from one
    read of the slot and expert ids, cheaper than a chain of small tensor ops; for many rows
    (prefill) with tensor ops, cheaper than Python over thousands of ids."""
    return _group_on_host(index, kept) if few else _group_with_tensor_ops(index, kept)


def _group_with_tensor_ops(index: torch.Tensor, kept: torch.Tensor) -> _ExpertGroups:
    experts_of_slots, order = torch.sort(index.reshape(-1)[kept], stable=True)  # [N], [N]
    slots = kept[order]  # [N], grouped by expert
    hit, counts = torch.unique_consecutive(experts_of_slots, return_counts=True)  # [X], [X]
    runs = list(zip(hit.tolist(), counts.tolist(), strict=True))
    return _ExpertGroups(slots, slots // index.shape[1], experts_of_slots, runs, None)


def _group_on_host(index: torch.Tensor, kept: torch.Tensor) -> _ExpertGroups:
    top_k = index.shape[1]
    slot_ids = kept.tolist()
    expert_of_slot = index.reshape(-1)[kept].tolist()
    order = sorted(range(len(slot_ids)), key=expert_of_slot.__getitem__)  # stable, by expert
    slot_ids = [slot_ids[i] for i in order]
    expert_ids = [expert_of_slot[i] for i in order]
    token_ids = [slot // top_k for slot in slot_ids]
    runs = [(expert, len(list(run))) for expert, run in itertools.groupby(expert_ids)]
    slots, tokens, row_experts = torch.tensor(
        [slot_ids, token_ids, expert_ids], dtype=torch.long, device=kept.device
    )  # [N] each
    return _ExpertGroups(slots, tokens, row_experts, runs, token_ids)


def _sum_per_token(rows: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Weighted expert outputs ``rows`` [N, H] of tokens ``tokens`` [N] summed per token in
    fp32, as transformers' reduction does, into ``hidden``'s shape [T, H] and dtype; a [T, H]
    accumulator, not [T * k, H], so memory traffic follows the kept rows."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    return out.index_add_(0, tokens, rows.float()).to(hidden.dtype)


def _project_runs(
    experts: nn.Module, rows: torch.Tensor, name: str, groups: _ExpertGroups, cpu_path: CpuPath
) -> torch.Tensor:
    """``rows`` [N, in], grouped by expert, through their experts' projection ``name`` -> [N, out]."""
    out = cpu_path.project_runs(experts, rows, name, groups.runs)
    return out + getattr(experts, f"{name}_bias")[groups.row_experts] if experts.has_bias else out


def project_each_expert(
    experts: nn.Module,
    rows: torch.Tensor,
    name: str,
    runs: list[tuple[int, int]],
    linear: Callable[[str, int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``rows`` [N, in], grouped in ``runs`` of (expert, count), each run through its expert's
    projection ``name`` -> [N, out], no bias: by ``linear(name, expert, rows)`` when given (packed
    weights), else on the module's weights. Only the GEMMs go expert by expert: the gate,
    activation and norm then run once over all rows, as in transformers' grouped kernel, not
    once per expert (hundreds of small ops per prefill call). A single bf16 row through weights
    stored [out, in] takes ATen's GEMV (`_gemv`), packed weights or not: faster than oneDNN's
    one-row GEMM (BENCHMARKS.md)."""
    outputs, start = [], 0
    single_rows_to_gemv = rows.dtype == torch.bfloat16 and not experts.is_transposed
    for expert, count in runs:
        run_rows = rows[start : start + count]  # [count, in]
        if count == 1 and single_rows_to_gemv:
            outputs.append(_gemv(experts, run_rows, name, expert))
        else:
            outputs.append(_project(experts, run_rows, name, expert, linear))
        start += count
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _project(
    experts: nn.Module,
    rows: torch.Tensor,
    name: str,
    expert: int,
    linear: Callable[[str, int, torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    if linear is not None:
        return linear(name, expert, rows)
    weight = getattr(experts, name)[expert]
    return rows @ weight if experts.is_transposed else torch.nn.functional.linear(rows, weight)


def _gemv(experts: nn.Module, row: torch.Tensor, name: str, expert: int) -> torch.Tensor:
    """One row [1, in] times expert ``expert``'s [out, in] weight ``name`` -> [1, out]."""
    return torch.mv(getattr(experts, name)[expert], row[0]).unsqueeze(0)


def run_with_sentinels(
    experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    return experts(hidden, index.masked_fill(skip, experts.num_experts), weights.masked_fill(skip, 0))


def run_masked(
    experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    return experts(hidden, index, weights.masked_fill(skip, 0))


class ExpertsRunner(Protocol):
    def __call__(
        self,
        experts: nn.Module,
        hidden: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
        skip: torch.Tensor,
    ) -> torch.Tensor:
        """``hidden`` [T, H], ``index``/``weights``/``skip`` [T, k] -> [T, H] without skipped slots."""
        ...


def choose_runner(
    experts: nn.Module, eager_accepts_sentinel: bool = True, cpu_path: CpuPath | None = None
) -> ExpertsRunner:
    """How calls of ``experts`` run skipped slots, from its implementation and the CPU path asked
    for: the one place the execution strategy is decided (once, when the model is patched; apply
    again after `set_experts_implementation`)."""
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", "eager")
    if implementation in (None, "eager"):
        own: ExpertsRunner = run_with_sentinels if eager_accepts_sentinel else run_masked
    else:
        own = functools.partial(run_compacted, cpu_path=PlainLoop())
    return own if cpu_path is None else functools.partial(run_compacted, cpu_path=cpu_path, fallback=own)


def run_experts(
    experts: nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    skip: torch.Tensor,
    eager_accepts_sentinel: bool = True,
    cpu_path: CpuPath | None = None,
) -> torch.Tensor:
    """One call the way `choose_runner` would run it: ``hidden`` [T, H], ``index``/``weights``/
    ``skip`` [T, k] -> [T, H] without skipped slots."""
    return choose_runner(experts, eager_accepts_sentinel, cpu_path)(experts, hidden, index, weights, skip)
