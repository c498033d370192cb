"""Standalone experts modules of every layout transformers' ``use_experts_implementation``
describes (gate or not, transposed, bias, norm), shrunk, with random weights and routing."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoConfig

from modes.engine import execute
from modes.engine.packed import packing_unsupported

__all__ = [
    "LAYOUTS",
    "SMALL",
    "TOLERANCE",
    "build_experts",
    "keep_first_slot_of_most_tokens",
    "record_projections",
    "routing",
    "skip_unless_packing",
]

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
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}
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


def keep_first_slot_of_most_tokens(index: torch.Tensor) -> torch.Tensor:
    """Skip mask [T, k]: every slot but each token's first, and token 0 entirely."""
    skip = torch.ones_like(index, dtype=torch.bool)
    skip[1:, 0] = False
    return skip


def record_projections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """Record, for each expert projection the CPU loop runs: (through oneDNN's GEMM rather than
    ATen's GEMV, on packed weights). The process-wide oneDNN switch must stay on throughout."""
    seen: list[tuple[bool, bool]] = []
    project, gemv = execute._project, execute._gemv

    def recording_project(experts, rows, name, expert, linear):
        assert torch.backends.mkldnn.enabled
        seen.append((True, linear is not None))
        return project(experts, rows, name, expert, linear)

    def recording_gemv(experts, row, name, expert):
        assert torch.backends.mkldnn.enabled
        seen.append((False, False))
        return gemv(experts, row, name, expert)

    monkeypatch.setattr(execute, "_project", recording_project)
    monkeypatch.setattr(execute, "_gemv", recording_gemv)
    return seen


def skip_unless_packing(dtype: torch.dtype = torch.float32) -> None:
    """Skip, with the reason, where this CPU or PyTorch build cannot pack ``dtype`` weights
    (oneDNN bf16 needs AVX-512 or ARM BF16)."""
    reason = packing_unsupported(dtype)
    if reason:
        pytest.skip(reason)
