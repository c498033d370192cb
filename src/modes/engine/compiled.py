"""modes' compiled CPU kernel as an experts module's projections: few rows per expert, no copy.

Where skipping leaves each expert a few rows (decode, and prefill at high skip ratios), the
expert loop's projections run as one call of `modes.engine.kernels.grouped_rows_linear` per
projection, over every expert hit, on the module's own weights; beyond the row counts it was
measured at, the module's own grouped kernel runs them. Opt-in
(``options=ApplyOptions(execution="compiled")``): the kernel is compiled for the CPU at first use.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from modes.engine.execute import check_cpu_experts
from modes.engine.kernels import KernelUnavailableError, grouped_rows_linear, kernel_dtypes

__all__ = ["MAX_ROWS_PER_EXPERT", "CompiledExperts"]

# Kept rows per expert (on average) up to which the kernel runs a call, else the module's own
# kernel does: the largest count measured, where it still beat transformers' grouped call in
# both dtypes (benchmarks/moe_block.py, 2048 tokens at r = 0.25 on the Qwen3-VL-30B shape).
MAX_ROWS_PER_EXPERT = 96


class CompiledExperts:
    """modes' CPU kernel bound to one experts module (weights stored [out, in], bf16 or fp32)."""

    def __init__(self, experts: nn.Module):
        _check_compilable(experts)
        self.dtype = next(experts.parameters()).dtype

    def usable_for(self, experts: nn.Module, hidden: torch.Tensor) -> bool:
        """Whether ``hidden`` and the module's weights are still what the kernel runs on."""
        weights = [getattr(experts, name) for name in _projections(experts)]
        same = all(w.dtype == self.dtype and w.device.type == "cpu" and w.is_contiguous() for w in weights)
        return same and hidden.device.type == "cpu" and hidden.dtype == self.dtype

    def runs_loop(self, kept: int, num_experts: int) -> bool:
        """Few rows per expert: the kernel's regime (else the module's grouped kernel runs)."""
        return kept <= MAX_ROWS_PER_EXPERT * num_experts

    def project_runs(
        self, experts: nn.Module, rows: torch.Tensor, name: str, runs: list[tuple[int, int]]
    ) -> torch.Tensor:
        """``rows`` [N, in] grouped in ``runs`` of (expert, count) -> [N, out], one kernel call."""
        hit, counts = zip(*runs, strict=True)
        starts = torch.tensor((0, *itertools.accumulate(counts)), dtype=torch.long)  # [R + 1]
        return grouped_rows_linear(rows.contiguous(), getattr(experts, name), starts, torch.tensor(hit))


def _check_compilable(experts: nn.Module) -> None:
    """Raise a ValueError naming why ``experts`` cannot run on the kernel, and what to do instead."""
    fix = "apply with execution='default'"
    parameter = check_cpu_experts(experts, "execution='compiled'")
    if experts.is_transposed:  # a broadcast-FMA variant for [in, out] measured slower than packed
        raise ValueError(
            f"cpu_kernel needs expert weights stored [out, in]; {type(experts).__name__} stores them "
            f"[in, out]: use execution='packed', or {fix}"
        )
    try:
        dtypes = kernel_dtypes()
    except KernelUnavailableError as error:
        raise ValueError(f"{error}: {fix}") from error
    if parameter.dtype not in dtypes:
        names = " and ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"execution='compiled' runs {names} on this CPU, not {parameter.dtype}: {fix}")
    if not all(getattr(experts, name).is_contiguous() for name in _projections(experts)):
        raise ValueError(f"execution='compiled' needs contiguous expert weights: {fix}")


def _projections(experts: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")
