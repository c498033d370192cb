"""oneDNN-packed copies of the expert weights: the CPU fast path for a few rows per expert.

A plain weight handed to oneDNN is reordered into its blocked layout on every GEMM call, so a
GEMM of a few rows streams the weights at a fraction of what the memory delivers. Packing each
expert's weights once, when the model is patched, removes that reorder, with oneDNN's own
results (bit-identical in bf16 in our checks): see BENCHMARKS.md for what it gains at high skip
ratios on CPU. The price is a second copy of every routed expert's weights, so it is opt-in
(``options=ApplyOptions(execution="packed")``). Serve with an allocator that keeps freed memory
(`modes.evaluation.allocator`): under glibc's defaults other calls' page faults grow dearer
while the copies are resident.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from modes.engine.execute import check_cpu_experts, project_each_expert
from modes.errors import UsageError

__all__ = ["PackedExperts", "pack_weight", "packed_linear", "packing_unsupported"]

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)
BATCH_HINT = 16  # rows per GEMM oneDNN picks the blocked layout for; 1-128 measured alike


class PackedExperts:
    """Each expert's projection weights of one experts module, packed for oneDNN's CPU GEMM.

    Holds copies, so it remembers what it copied: once the module's weights change (loaded or
    updated in place, cast, moved), calls fall back to the module's own weights.
    """

    def __init__(self, experts: nn.Module):
        _check_packable(experts)
        self.dtype = next(experts.parameters()).dtype
        names = ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")
        self.weights = {name: [_pack(experts, weight) for weight in getattr(experts, name)] for name in names}
        self.versions = {name: getattr(experts, name)._version for name in names}  # bumped by in-place writes

    def usable_for(self, experts: nn.Module, hidden: torch.Tensor) -> bool:
        """Whether the packed copies still hold ``experts``' weights for ``hidden``'s dtype on CPU."""
        unchanged = all(getattr(experts, name)._version == version for name, version in self.versions.items())
        on_cpu = hidden.device.type == "cpu" and torch.backends.mkldnn.enabled
        return unchanged and on_cpu and hidden.dtype == self.dtype

    def runs_loop(self, kept: int, num_experts: int) -> bool:
        """Always: with weights packed, the expert loop beats the module's kernel at any skip."""
        return True

    def project_runs(
        self, experts: nn.Module, rows: torch.Tensor, name: str, runs: list[tuple[int, int]]
    ) -> torch.Tensor:
        """``rows`` [N, in] grouped in ``runs`` of (expert, count), each run on its packed weight."""
        return project_each_expert(experts, rows, name, runs, self.linear)

    def linear(self, name: str, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` [n, in] times expert ``expert``'s packed ``name`` weight -> [n, out], no bias."""
        return packed_linear(rows, self.weights[name][expert])

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed copies (the extra memory this costs)."""
        packed = (weight for weights in self.weights.values() for weight in weights)
        return sum(weight.numel() * weight.element_size() for weight in packed)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight [out, in], reordered once into oneDNN's blocked layout."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)


def packed_linear(rows: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``rows`` [n, in] times a weight packed by `pack_weight` -> [n, out] (``F.linear``, no bias)."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")


def _pack(experts: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """One expert's weight, [out, in] or [in, out] as the module stores it, packed as [out, in]."""
    return pack_weight(weight.T if experts.is_transposed else weight)


@functools.cache
def packing_unsupported(dtype: torch.dtype) -> str | None:
    """Why this PyTorch build and CPU cannot pack ``dtype`` weights (None: they can), decided
    by what they report and by packing and multiplying one small weight."""
    if dtype not in PACKABLE_DTYPES:
        return f"execution='packed' supports bfloat16 and float32 experts, not {dtype}"
    if not torch.backends.mkldnn.is_available():
        return "execution='packed' needs PyTorch built with oneDNN (mkldnn)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bf16 support in oneDNN for execution='packed' (it needs AVX-512 or ARM BF16)"
    try:
        packed_linear(torch.ones(1, 16, dtype=dtype), pack_weight(torch.ones(16, 16, dtype=dtype)))
    except (RuntimeError, AttributeError) as error:  # an op this build or CPU lacks
        return f"oneDNN cannot pack {dtype} weights here ({str(error).splitlines()[0]})"
    return None


def _check_packable(experts: nn.Module) -> None:
    """Raise a ValueError naming why ``experts`` cannot be packed, and what to do instead."""
    parameter = check_cpu_experts(experts, "execution='packed'")
    reason = packing_unsupported(parameter.dtype)
    if reason:
        also = ", or use float32" if parameter.dtype == torch.bfloat16 else ""
        raise UsageError(f"{reason}: apply with execution='loop'{also}")
