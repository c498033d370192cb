"""The CPU expert loop computes what transformers' own kernels compute, for every layout
transformers' ``use_experts_implementation`` describes (gate or not, transposed, bias, norm)."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoConfig

from modes.engine.execute import run_compacted, run_expert_loop

SMALL = dict(
    hidden_size=32,
    moe_hidden_size=32,
    intermediate_size=16,
    moe_intermediate_size=16,
    num_experts=6,
    num_local_experts=6,
    n_routed_experts=6,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
# (model_type, experts class): one per layout flag combination found in transformers 5.x
LAYOUTS = [
    ("qwen3_moe", "Qwen3MoeExperts"),  # concatenated gate_up, [E, out, in]
    ("gpt_oss", "GptOssExperts"),  # interleaved gate_up, transposed, bias, own gate
    ("aria_text", "AriaExperts"),  # transposed
    ("nemotron_h", "NemotronHExperts"),  # no gate
    ("muse_spark", "MuseSparkExperts"),  # post-expert norm
]


def build_experts(model_type: str, class_name: str, implementation: str) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type)
    config = type(getattr(config, "text_config", config))(**SMALL)  # multimodal: the text model's
    package = model_type.removesuffix("_text")
    module = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
    experts = getattr(module, class_name)(config)
    experts.config._experts_implementation = implementation
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(0, 0.5)
    return experts.eval()


def routing(experts: torch.nn.Module, tokens: int = 5, top_k: int = 2):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, SMALL["hidden_size"], generator=generator)
    index = torch.stack(
        [torch.randperm(experts.num_experts, generator=generator)[:top_k] for _ in range(tokens)]
    )
    weights = torch.rand(tokens, top_k, generator=generator)
    return hidden, index, weights


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
