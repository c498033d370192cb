"""Packed expert weights compute what transformers' own kernels compute, for every layout
``use_experts_implementation`` describes, in both dtypes, on few rows (decode) and many."""

from __future__ import annotations

import pytest
import torch

from experts_layouts import (
    SMALL,
    TOLERANCE,
    build_experts,
    keep_first_slot_of_most_tokens,
    record_projections,
    routing,
    skip_unless_packing,
)
from modes.engine.execute import run_experts
from modes.engine.packed import PackedExperts


@pytest.fixture(autouse=True)
def _packing(request):
    """Every test here packs fp32 weights except the refusal checks."""
    if "refused" not in request.node.name:
        skip_unless_packing(torch.float32)


def test_a_call_that_skips_nothing_runs_the_module_itself():
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    hidden, index, weights = routing(experts, tokens=40)
    skip = torch.zeros_like(index, dtype=torch.bool)
    got = run_experts(experts, hidden, index, weights, skip, cpu_path=PackedExperts(experts))
    assert torch.equal(got, experts(hidden, index, weights))


def test_eager_modules_use_the_packed_weights_too():
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "eager")
    hidden, index, weights = routing(experts, tokens=40)
    skip = keep_first_slot_of_most_tokens(index)
    packed = PackedExperts(experts)
    calls = []
    linear = packed.linear
    packed.linear = lambda *args: calls.append(args[:2]) or linear(*args)
    got = run_experts(experts, hidden, index, weights, skip, cpu_path=packed)
    expected = experts(hidden, index, weights.masked_fill(skip, 0))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert {name for name, _ in calls} == {"gate_up_proj", "down_proj"}


def _cast_to_bf16(experts: torch.nn.Module) -> None:
    experts.to(torch.bfloat16)


def _reload_reordered(experts: torch.nn.Module) -> None:
    experts.load_state_dict({name: tensor.flip(0) for name, tensor in experts.state_dict().items()})


@pytest.mark.parametrize("change", [_cast_to_bf16, _reload_reordered], ids=["cast", "reloaded"])
def test_weights_changed_after_packing_fall_back_to_the_module(change):
    """A model cast, or loaded in place, after `apply` no longer matches its packed copy."""
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    packed = PackedExperts(experts)
    assert packed.usable_for(experts, routing(experts)[0])
    change(experts)
    dtype = experts.down_proj.dtype
    hidden, index, weights = routing(experts, tokens=40)
    hidden, weights = hidden.to(dtype), weights.to(dtype)
    assert not packed.usable_for(experts, hidden)
    skip = keep_first_slot_of_most_tokens(index)
    got = run_experts(experts, hidden, index, weights, skip, cpu_path=packed)
    expected = experts(hidden, index, weights.masked_fill(skip, 0))
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


def test_single_bf16_rows_still_take_atens_gemv(monkeypatch):
    """Packed or not, one bf16 row through [out, in] weights takes ATen's GEMV."""
    skip_unless_packing(torch.bfloat16)
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm").to(torch.bfloat16)
    packed = PackedExperts(experts)
    seen = record_projections(monkeypatch)
    hidden = torch.randn(3, SMALL["hidden_size"]).bfloat16()
    index = torch.tensor([[0, 3], [2, 4], [2, 5]])
    skip = torch.tensor([[False, True]] * 3)  # expert 0 keeps one row, expert 2 two
    run_experts(experts, hidden, index, torch.rand(3, 2).bfloat16(), skip, cpu_path=packed)
    one_row, two_rows = (False, False), (True, True)  # (oneDNN on, packed weights)
    assert seen == [one_row, two_rows] * 2  # gate-up projections, then down
    assert torch.backends.mkldnn.enabled


def test_packing_anything_but_structured_cpu_experts_in_bf16_or_fp32_is_refused():
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    with pytest.raises(ValueError, match=r"bfloat16 and float32 experts, not torch\.float16"):
        PackedExperts(experts.half())
    with pytest.raises(ValueError, match="use_experts_implementation; Linear is not"):
        PackedExperts(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="CPU option and the experts are on meta"):
        PackedExperts(experts.to("meta"))


def test_packed_copies_cost_what_the_expert_weights_weigh():
    experts = build_experts("qwen3_moe", "Qwen3MoeExperts", "grouped_mm")
    weights = experts.gate_up_proj.numel() + experts.down_proj.numel()
    assert PackedExperts(experts).nbytes >= weights * 4
