"""`ApplyOptions`: how a patched model runs what a plan keeps, and which tokens it never skips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import nn

from modes.engine.compiled import CompiledExperts
from modes.engine.execute import CpuPath
from modes.engine.packed import PackedExperts

__all__ = ["EXECUTIONS", "ApplyOptions", "Execution", "execution_of"]

Execution = Literal["default", "packed", "compiled"]
EXECUTIONS: tuple[str, ...] = get_args(Execution)
_CPU_PATHS = {"packed": PackedExperts, "compiled": CompiledExperts}


@dataclass(frozen=True)
class ApplyOptions:
    """Options of `modes.apply` / `modes.applied`.

    ``execution``: ``"default"`` runs the kept slots on the model's own experts kernel (with a
    loop over the experts hit for decode-sized calls on CPU); ``"packed"`` (CPU, bf16 or fp32)
    keeps a oneDNN-packed copy of every routed expert's weights (a second copy in memory;
    `PackedExperts`); ``"compiled"`` (CPU with AVX-512, weights stored [out, in]) runs them on
    modes' compiled kernel on the module's own weights (`CompiledExperts`, built at first use).
    ``special_token_ids``: never skipped; None uses the plan's (those it was searched with),
    else the config's media start/end ids only.
    """

    execution: Execution = "default"
    special_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {list(EXECUTIONS)}, not {self.execution!r}")
        if self.special_token_ids is not None:
            object.__setattr__(self, "special_token_ids", tuple(int(i) for i in self.special_token_ids))

    def cpu_path(self, experts: nn.Module) -> CpuPath | None:
        """The CPU path ``execution`` asks for, bound to ``experts`` (ValueError if it cannot run)."""
        return _CPU_PATHS[self.execution](experts) if self.execution in _CPU_PATHS else None


def execution_of(pack_weights: bool, cpu_kernel: bool) -> Execution:
    """The execution named by the two opt-in CPU flags (``--pack-weights``, ``--cpu-kernel``)."""
    if pack_weights and cpu_kernel:
        raise ValueError("pack_weights and cpu_kernel are two ways to run the same rows: choose one")
    return "packed" if pack_weights else "compiled" if cpu_kernel else "default"
