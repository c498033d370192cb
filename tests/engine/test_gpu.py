"""The compacted path on a CUDA device: the model's own grouped kernel on the kept rows.

Skipped without a GPU (CI has none); run on a GPU machine with `pytest tests/engine/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from experts_layouts import LAYOUTS, build_experts, routing
from modes.engine.execute import run_compacted

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(("model_type", "class_name"), LAYOUTS, ids=[m for m, _ in LAYOUTS])
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_compacted_path_on_gpu_matches_the_kernel_with_skipped_weights_zeroed(
    model_type, class_name, implementation
):
    experts = build_experts(model_type, class_name, implementation).to("cuda", torch.bfloat16)
    hidden, index, weights = routing(experts, tokens=64, top_k=2)
    hidden, index, weights = hidden.cuda().bfloat16(), index.cuda(), weights.cuda().bfloat16()
    nothing = torch.zeros_like(index, dtype=torch.bool)
    unskipped = run_compacted(experts, hidden, index, weights, nothing)
    assert torch.equal(unskipped, experts(hidden, index, weights))  # the module itself
    skip = torch.rand(index.shape, generator=torch.Generator().manual_seed(2)) < 0.7
    skip = skip.cuda()
    expected = experts(hidden, index, weights.masked_fill(skip, 0)).float()
    got = run_compacted(experts, hidden, index, weights, skip).float()
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
