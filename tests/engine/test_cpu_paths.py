"""Each CPU path (packed weights, compiled kernel) computes what transformers' grouped kernel
computes, for every layout it takes, in both dtypes, on few rows (decode) and many."""

from __future__ import annotations

import pytest
import torch

from experts_layouts import (
    LAYOUTS,
    TOLERANCE,
    build_experts,
    keep_first_slot_of_most_tokens,
    routing,
    skip_unless_packing,
)
from modes.engine import kernels
from modes.engine.compiled import CompiledExperts
from modes.engine.execute import run_experts
from modes.engine.kernels import cpu_supports
from modes.engine.packed import PackedExperts

TRANSPOSED = ("gpt_oss", "aria_text")  # weights stored [in, out]: the compiled kernel refuses them
CASES = [
    pytest.param(path, layout, dtype, id=f"{path}-{layout[0]}-{str(dtype).removeprefix('torch.')}")
    for path in ("packed", "compiled")
    for layout in LAYOUTS
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    if (path == "compiled" and layout[0] not in TRANSPOSED)  # test_compiled.py checks that refusal
    or (path == "packed" and dtype != torch.float16)  # oneDNN packs bf16 and fp32
]


def cpu_path(name: str, experts: torch.nn.Module, dtype: torch.dtype):
    if name == "packed":
        skip_unless_packing(dtype)
        return PackedExperts(experts)
    if not cpu_supports(dtype):
        pytest.skip(f"no modes CPU kernel build runs on this CPU ({kernels._no_isa_reason(None)})")
    return CompiledExperts(experts)


@pytest.mark.parametrize("tokens", [3, 40])  # fewer kept rows than experts (decode), and more
@pytest.mark.parametrize(("path", "layout", "dtype"), CASES)
def test_cpu_paths_give_the_grouped_kernels_result(path, layout, dtype, tokens):
    experts = build_experts(*layout, "grouped_mm").to(dtype)
    hidden, index, weights = routing(experts, tokens=tokens)
    hidden, weights = hidden.to(dtype), weights.to(dtype)
    skip = keep_first_slot_of_most_tokens(index)
    expected = experts(hidden, index, weights.masked_fill(skip, 0))
    got = run_experts(experts, hidden, index, weights, skip, cpu_path=cpu_path(path, experts, dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    assert torch.equal(got[0], torch.zeros_like(got[0]))
