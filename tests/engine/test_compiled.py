"""modes' compiled CPU kernel computes what transformers' own kernels compute, for every layout it
takes, in both dtypes, on few rows and many, and refuses what it cannot run with the fix named."""

from __future__ import annotations

import pytest
import torch

from experts_layouts import LAYOUTS, TOLERANCE, build_experts, keep_first_slot_of_most_tokens, routing
from modes.engine import compiled, kernels
from modes.engine.compiled import CompiledExperts
from modes.engine.execute import run_experts
from modes.engine.kernels import cpu_supports

pytestmark = pytest.mark.skipif(not cpu_supports(torch.float32), reason="modes' CPU kernel needs AVX-512")
DTYPES = [
    torch.float32,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not cpu_supports(torch.bfloat16), reason="needs AVX-512 BF16"),
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])  # each tile height, and several tiles
@pytest.mark.parametrize(("inner", "outer"), [(64, 32), (37, 6), (16, 1), (33, 129)])  # K and O tails
def test_kernel_equals_each_runs_linear(dtype, rows, inner, outer):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(5, outer, inner, generator=generator).to(dtype)  # [E, O, K]
    experts = torch.tensor([3, 0, 4])  # runs in any expert order
    counts = [rows, max(rows - 1, 1), rows + 2]
    x = torch.randn(sum(counts), inner, generator=generator).to(dtype)  # [N, K]
    starts = torch.tensor([0, counts[0], counts[0] + counts[1], sum(counts)])
    got = kernels.grouped_rows_linear(x, weight, starts, experts)
    expected = torch.cat(
        [x[starts[r] : starts[r + 1]].float() @ weight[e].float().T for r, e in enumerate(experts.tolist())]
    )
    assert got.dtype == dtype and got.shape == (sum(counts), outer)
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[dtype])


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows handed to the compiled kernel, one entry per call."""
    calls: list[int] = []
    kernel = compiled.grouped_rows_linear
    monkeypatch.setattr(
        compiled, "grouped_rows_linear", lambda rows, *a: calls.append(len(rows)) or kernel(rows, *a)
    )
    return calls


def test_few_rows_per_expert_run_on_the_kernel_and_many_on_the_module(monkeypatch):
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    path = CompiledExperts(experts)
    calls = count_kernel_calls(monkeypatch)
    few = compiled.MAX_ROWS_PER_EXPERT * experts.num_experts  # one slot kept per token
    hidden, index, weights = routing(experts, tokens=few)
    skip = torch.zeros_like(index, dtype=torch.bool)
    skip[:, 1] = True
    run_experts(experts, hidden, index, weights, skip, cpu_path=path)
    assert calls == [few, few]  # both projections, one call each
    calls.clear()
    hidden, index, weights = routing(experts, tokens=few + 1)
    skip = torch.zeros_like(index, dtype=torch.bool)
    skip[:, 1] = True
    run_experts(experts, hidden, index, weights, skip, cpu_path=path)
    assert calls == []  # more rows than the kernel's regime: the module's grouped kernel


def test_a_call_that_skips_nothing_runs_the_module_itself(monkeypatch):
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    calls = count_kernel_calls(monkeypatch)
    hidden, index, weights = routing(experts, tokens=3)
    skip = torch.zeros_like(index, dtype=torch.bool)
    got = run_experts(experts, hidden, index, weights, skip, cpu_path=CompiledExperts(experts))
    assert torch.equal(got, experts(hidden, index, weights)) and calls == []


def test_weights_changed_in_place_are_what_the_kernel_reads():
    """No copy: unlike packed weights, nothing can go stale."""
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    path = CompiledExperts(experts)
    hidden, index, weights = routing(experts, tokens=3)
    skip = keep_first_slot_of_most_tokens(index)
    with torch.no_grad():
        experts.down_proj.mul_(2)
    expected = experts(hidden, index, weights.masked_fill(skip, 0))
    torch.testing.assert_close(run_experts(experts, hidden, index, weights, skip, cpu_path=path), expected)


def test_a_cast_module_falls_back_to_its_own_kernel(monkeypatch):
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    path = CompiledExperts(experts)
    experts.half()
    calls = count_kernel_calls(monkeypatch)
    hidden, index, weights = routing(experts, tokens=3)
    skip = keep_first_slot_of_most_tokens(index)
    got = run_experts(experts, hidden.half(), index, weights.half(), skip, cpu_path=path)
    assert got.dtype == torch.float16 and calls == []


@pytest.mark.parametrize(
    ("layout", "dtype", "message"),
    [
        (
            LAYOUTS[0],
            torch.float16,
            r"runs float32.* on this CPU, not torch\.float16: apply with execution='default'",
        ),
        (
            LAYOUTS[1],
            torch.float32,
            r"stores them \[in, out\]: use execution='packed', or apply with execution='default'",
        ),
    ],
    ids=["fp16", "transposed"],
)
def test_what_the_kernel_cannot_run_is_refused_with_the_fix(layout, dtype, message):
    experts = build_experts(*layout, "grouped_mm").to(dtype)
    with pytest.raises(ValueError, match=message):
        CompiledExperts(experts)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(experts=torch.tensor([0, 5, 1])), "expert out of range"),
        (dict(starts=torch.tensor([0, 2, 1, 4])), "run starts must not decrease"),
        (dict(starts=torch.tensor([0, 1, 2, 3])), "runs must cover the rows"),
    ],
    ids=["expert", "order", "cover"],
)
def test_malformed_runs_are_refused_before_any_read(change, message):
    """A bad expert id or run boundary would read out of bounds: the kernel checks them first."""
    call = dict(rows=torch.randn(4, 8), weight=torch.randn(5, 4, 8), starts=torch.tensor([0, 1, 2, 4]))
    call.update(experts=torch.tensor([0, 1, 2]))
    call.update(change)
    with pytest.raises(RuntimeError, match=message):
        kernels.grouped_rows_linear(call["rows"], call["weight"], call["starts"], call["experts"])


def test_an_unbuildable_kernel_is_refused_with_its_reason(monkeypatch):
    monkeypatch.setattr(kernels, "_built", {"error": RuntimeError("no C++ compiler")})
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    with pytest.raises(ValueError, match=r"unavailable: no C\+\+ compiler: apply with execution='default'"):
        CompiledExperts(experts)
