"""The CPU expert loop computes what transformers' own kernels compute, for every layout
transformers' ``use_experts_implementation`` describes (gate or not, transposed, bias, norm)."""

from __future__ import annotations

import pytest
import torch

from experts_layouts import LAYOUTS, SMALL, build_experts, record_projections, routing
from modes.engine.execute import run_compacted, run_expert_loop


@pytest.mark.parametrize(("model_type", "class_name"), LAYOUTS, ids=[m for m, _ in LAYOUTS])
def test_the_loop_on_every_slot_equals_the_grouped_kernel(model_type, class_name):
    experts = build_experts(model_type, class_name, "grouped_mm")
    hidden, index, weights = routing(experts)
    expected = experts(hidden, index, weights)
    got = run_expert_loop(experts, hidden, index, weights, torch.arange(index.numel()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model_type", "class_name"), LAYOUTS, ids=[m for m, _ in LAYOUTS])
def test_skipped_slots_contribute_nothing(model_type, class_name):
    experts = build_experts(model_type, class_name, "grouped_mm")
    hidden, index, weights = routing(experts)
    skip = torch.zeros_like(index, dtype=torch.bool)
    skip[:, 1] = True  # keep each token's first slot: 5 rows < 6 experts, so the loop runs
    skip[0, 0] = True  # and drop token 0 entirely
    expected = experts(hidden, index, weights.masked_fill(skip, 0))
    got = run_compacted(experts, hidden, index, weights, skip)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], torch.zeros_like(got[0]))


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize(("model_type", "class_name"), LAYOUTS[:2], ids=[m for m, _ in LAYOUTS[:2]])
def test_one_kept_slot_per_token_needs_no_sum(model_type, class_name, tokens):
    """Decode at high skip ratios: every token keeps only its top slot."""
    experts = build_experts(model_type, class_name, "grouped_mm")
    hidden, index, weights = routing(experts, tokens=tokens)
    skip = torch.ones_like(index, dtype=torch.bool)
    skip[:, 0] = False
    expected = experts(hidden, index, weights.masked_fill(skip, 0))
    got = run_compacted(experts, hidden, index, weights, skip)
    assert got.dtype == hidden.dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("model_type", "class_name", "dtype", "rows_per_expert", "onednn"), [
    ("qwen3_moe", "Qwen3MoeExperts", torch.bfloat16, 1, False),  # [out, in]: ATen's GEMV
    ("qwen3_moe", "Qwen3MoeExperts", torch.bfloat16, 2, True),
    ("qwen3_moe", "Qwen3MoeExperts", torch.float32, 1, True),
    ("gpt_oss", "GptOssExperts", torch.bfloat16, 1, True),  # [in, out]: ATen's path is slower
])  # fmt: skip
def test_single_bf16_rows_leave_onednn_for_atens_gemv(
    model_type, class_name, dtype, rows_per_expert, onednn, monkeypatch
):
    experts = build_experts(model_type, class_name, "grouped_mm").to(dtype)
    tokens = 3 * rows_per_expert
    hidden = torch.randn(tokens, SMALL["hidden_size"], generator=torch.Generator().manual_seed(2)).to(dtype)
    index = torch.arange(3).repeat_interleave(rows_per_expert).unsqueeze(1)  # [T, 1]: 3 experts
    weights = torch.rand(tokens, 1, generator=torch.Generator().manual_seed(3)).to(dtype)
    expected = experts(hidden, index, weights)
    seen = record_projections(monkeypatch)
    got = run_expert_loop(experts, hidden, index, weights, torch.arange(tokens))
    assert seen == [(onednn, False)] * 6  # 3 experts, 2 projections each
    assert torch.backends.mkldnn.enabled  # never switched off (record_projections checks each call)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
