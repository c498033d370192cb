"""`ApplyOptions`: how a patched model runs what a plan keeps, and which tokens it never skips."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, get_args

from torch import nn

from modes.engine.compiled import CompiledExperts, KernelBuildError, compiled_unfit
from modes.engine.execute import CpuChoice
from modes.engine.packed import PackedExperts
from modes.errors import UsageError

__all__ = ["EXECUTIONS", "ApplyOptions", "CpuChoice", "Execution", "execution_of"]

Execution = Literal["auto", "loop", "packed", "compiled"]
EXECUTIONS: tuple[str, ...] = get_args(Execution)
_CPU_PATHS = {"packed": PackedExperts, "compiled": CompiledExperts}
_warned_build = False


@dataclass(frozen=True)
class ApplyOptions:
    """Options of `modes.apply` / `modes.applied`.

    ``execution``: ``"auto"`` (default) runs the kept rows on modes' compiled CPU kernel where
    this CPU, a compiler and the module allow it (AVX2, AVX-512, AVX-512 BF16, NEON or SVE256; weights
    stored [out, in]), else as ``"loop"`` does; ``"loop"`` runs them on the model's own experts
    kernel, with a loop over the experts hit for decode-sized calls on CPU; ``"compiled"``
    insists on the kernel (an error says why where it cannot run); ``"packed"`` (CPU, bf16 or
    fp32) keeps a oneDNN-packed copy of every routed expert's weights (a second copy in memory;
    `PackedExperts`). `modes.execution_info(model)` says what each layer runs.
    ``special_token_ids``: never skipped; None uses the plan's (those it was searched with),
    else the config's media start/end ids only.
    """

    execution: Execution = "auto"
    special_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.execution not in EXECUTIONS:
            raise UsageError(f"execution must be one of {list(EXECUTIONS)}, not {self.execution!r}")
        if self.special_token_ids is not None:
            object.__setattr__(self, "special_token_ids", tuple(int(i) for i in self.special_token_ids))

    def cpu_choice(self, experts: nn.Module) -> CpuChoice:
        """The CPU path ``execution`` asks for, bound to ``experts`` (ValueError if an explicit
        one cannot run; ``"auto"`` falls back instead)."""
        if self.execution in _CPU_PATHS:
            path = _CPU_PATHS[self.execution](experts)
            return CpuChoice(path, getattr(path, "description", self.execution))
        if self.execution == "auto":
            return _auto(experts)
        return CpuChoice(None, _loop_description(experts))


def _auto(experts: nn.Module) -> CpuChoice:
    """The compiled kernel where it runs, else the loop, with the reason."""
    try:
        unfit = compiled_unfit(experts)
    except KernelBuildError as error:
        _warn_build_failed_once(error)
        unfit = str(error)
    if unfit is None:
        path = CompiledExperts(experts)
        return CpuChoice(path, path.description)
    return CpuChoice(None, f"{_loop_description(experts)}; not compiled: {unfit}")


def _loop_description(experts: nn.Module) -> str:
    device = next(experts.parameters()).device
    return "loop" if device.type == "cpu" else f"the module's own kernel ({device.type})"


def _warn_build_failed_once(error: Exception) -> None:
    global _warned_build
    if not _warned_build:
        _warned_build = True
        warnings.warn(
            f"{error}; skipped experts run on the slower loop path instead. Install a C++ compiler "
            "(g++ or clang) and ninja to get it, or apply with execution='loop' to choose that path.",
            RuntimeWarning,
            stacklevel=4,
        )


def execution_of(pack_weights: bool, cpu_kernel: bool | None) -> Execution:
    """The execution named by the CLI's and lmms-eval's CPU flags: ``cpu_kernel`` None (auto),
    True (insist on the compiled kernel) or False (the loop); ``pack_weights`` packed copies."""
    if pack_weights and cpu_kernel:
        raise UsageError("pack_weights and cpu_kernel are two ways to run the same rows: choose one")
    if pack_weights:
        return "packed"
    return {None: "auto", True: "compiled", False: "loop"}[cpu_kernel]
