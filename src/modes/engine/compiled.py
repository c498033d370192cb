"""modes' compiled CPU kernel as an experts module's projections: few rows per expert, no copy.

Where skipping leaves each expert a few rows (decode, and prefill at high skip ratios), the
expert loop's projections run as one call of modes' kernel per projection, over every expert
hit, on the module's own weights; beyond the row counts it was measured at, the module's own
grouped kernel runs them. The default on CPU where it runs (``ApplyOptions(execution="auto")``):
the kernel is compiled for this CPU's instruction set at first use (`modes.engine.kernels`).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from modes.engine.execute import check_cpu_experts
from modes.engine.kernels import KERNEL_DTYPES, KernelBuildError, KernelUnavailableError, load_kernel
from modes.errors import UsageError

__all__ = ["MAX_ROWS_PER_EXPERT", "CompiledExperts", "KernelBuildError", "compiled_unfit"]

# Kept rows per expert (on average) up to which the kernel runs a call, else the module's own
# kernel does: the largest count measured, where it still beat transformers' grouped call in
# both dtypes (benchmarks/moe_block.py, 2048 tokens at r = 0.25 on the Qwen3-VL-30B shape).
MAX_ROWS_PER_EXPERT = 96


class CompiledExperts:
    """modes' CPU kernel bound to one experts module (weights stored [out, in], fp32, bf16 or fp16)."""

    def __init__(self, experts: nn.Module):
        try:
            unfit = compiled_unfit(experts)
        except KernelBuildError as error:
            unfit = str(error)
        if unfit is not None:
            raise UsageError(f"execution='compiled' cannot run here: {unfit}; apply with execution='loop'")
        self.kernel = load_kernel()
        self.dtype = next(experts.parameters()).dtype
        self.description = f"compiled ({self.kernel.isa.name})"

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
        weight = getattr(experts, name)  # [E, out, in]
        return self.kernel.grouped_rows_linear(rows.contiguous(), weight, starts, torch.tensor(hit))


def compiled_unfit(experts: nn.Module) -> str | None:
    """Why ``experts`` cannot run on the kernel here (None: it can). Raises `KernelBuildError`
    when this CPU could run it but the build failed (no compiler, no ninja)."""
    try:
        parameter = check_cpu_experts(experts, "the compiled kernel")
    except ValueError as error:
        return str(error).partition(":")[0]
    if experts.is_transposed:  # a broadcast-FMA variant for [in, out] measured slower than packed
        return f"{type(experts).__name__} stores expert weights [in, out] and the kernel reads [out, in]"
    if parameter.dtype not in KERNEL_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
        return f"the kernel runs {names}, not {parameter.dtype}"
    if not all(getattr(experts, name).is_contiguous() for name in _projections(experts)):
        return "the expert weights are not contiguous"
    try:
        load_kernel()
    except KernelBuildError:
        raise
    except KernelUnavailableError as error:  # no build runs on this CPU
        return str(error)
    return None


def _projections(experts: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")
