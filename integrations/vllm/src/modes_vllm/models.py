"""vLLM's Qwen3-MoE and Qwen3-VL-MoE with MoDES: the same modules, each MoE layer's router wrapped.

The classes are registered under vLLM's own architecture names (`modes_vllm.register`), so a
checkpoint loads unchanged. ``requires_raw_input_tokens`` makes vLLM hand the outer ``forward``
the token ids even when it embeds them itself (images): that forward runs eagerly, codes the
tokens into `SkipState`'s buffers, then calls the compiled decoder stack.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform

from modes_vllm.routing import RoutingTables
from modes_vllm.skipping import (
    MEDIA_TOKEN_FIELDS,
    SkipState,
    activate,
    check_plan_fits,
    load_plan,
    skip_slots,
)

__all__ = ["ModesQwen3MoeForCausalLM", "ModesQwen3VLMoeForConditionalGeneration", "SkippingRouter"]

PLAN_ENV = "MODES_PLAN"

# experts kernels that leave a slot routed to expert id -1 out of the GEMMs (vLLM's Triton fused
# MoE, as under expert parallelism); elsewhere a skipped slot keeps its id with weight 0 (the CPU
# kernel indexes per-expert counters with the id unchecked: -1 crashes it).
DROPS_NEGATIVE_IDS = frozenset({"TritonExperts"})


class SkippingRouter:
    """A MoE runner's router whose top-k routing passes through `skip_slots` for layer ``layer``."""

    def __init__(self, router: Any, layer: int) -> None:
        self.base_router = router
        self.layer = layer

    def select_experts(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        weights, expert_ids = self.base_router.select_experts(*args, **kwargs)  # [T, k] each
        return skip_slots(weights, expert_ids, self.layer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base_router, name)


def _moe_runners(model: torch.nn.Module) -> list[tuple[int, MoERunner]]:
    return [(extract_layer_index(m.layer_name), m) for m in model.modules() if isinstance(m, MoERunner)]


def _keeps_ids(runners: list[tuple[int, MoERunner]]) -> bool:
    """Whether skipped slots must keep a valid id (see DROPS_NEGATIVE_IDS)."""
    if not current_platform.is_cuda_alike():
        return True
    kinds = {type(getattr(runner.routed_experts, "fused_experts", None)).__name__ for _, runner in runners}
    return not kinds <= DROPS_NEGATIVE_IDS


def _media_ids(hf_config: Any) -> dict[str, list[int]]:
    media = {}
    for modality, fields in MEDIA_TOKEN_FIELDS.items():
        ids = [getattr(hf_config, f) for f in fields if getattr(hf_config, f, None) is not None]
        if ids:
            media[modality] = ids
    return media


def _decode_mask(count: int, device: torch.device) -> tuple[torch.Tensor, int | None]:
    """[count] bool: tokens of requests in a decode step (one new token), and the number of real
    (unpadded) tokens; all False outside a scheduled forward (profiling, warm-up)."""
    metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
    if isinstance(metadata, list):  # micro-batches
        metadata = metadata[0] if metadata else None
    if isinstance(metadata, dict):
        metadata = next((m for m in metadata.values() if hasattr(m, "query_start_loc")), None)
    if metadata is None:
        return torch.zeros(count, dtype=torch.bool, device=device), None
    starts = metadata.query_start_loc.to(device)  # [R + 1]
    lengths = starts[1:] - starts[:-1]  # [R]
    tokens = torch.arange(count, device=device)
    request = torch.searchsorted(starts[1:], tokens, right=True).clamp(max=lengths.shape[0] - 1)  # [count]
    num_valid = int(metadata.num_actual_tokens) if hasattr(metadata, "num_actual_tokens") else None
    return lengths[request] == 1, num_valid


def _key_compile_cache(vllm_config: VllmConfig, plan: dict[str, Any]) -> None:
    """Make the plan part of vLLM's compile-cache key: the graphs traced with and without MoDES
    share every other factor (the MoE source files included), so without this a run could load
    the other's compiled model from the cache: with the plan silently not applied."""
    if not isinstance(vllm_config.additional_config, dict):
        raise RuntimeError("modes-vllm needs vLLM's additional_config to be a dict (its default)")
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    vllm_config.additional_config["modes_plan_sha256"] = digest


class ModesMixin:
    """Installs MoDES on the model's MoE layers when ``MODES_PLAN`` names a plan file."""

    requires_raw_input_tokens: ClassVar[bool] = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.modes_state: SkipState | None = None
        path = os.environ.get(PLAN_ENV)
        if path:
            self.modes_state = self._install(path, vllm_config)
        activate(self.modes_state)

    def _install(self, path: str, vllm_config: VllmConfig) -> SkipState:
        model_config = vllm_config.model_config
        plan = load_plan(path)
        _key_compile_cache(vllm_config, plan)
        check_plan_fits(plan, model_config.hf_text_config, model_config.hf_config.model_type, path)
        runners = _moe_runners(self)
        device = next(self.parameters()).device  # type: ignore[attr-defined]
        tables = RoutingTables.from_plan(plan, _media_ids(model_config.hf_config), device=device)
        for layer, runner in runners:
            if layer in tables.layers:  # layers the plan has no alphas for are left as they are
                runner.router = SkippingRouter(runner.router, layer)
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        num_layers = model_config.hf_text_config.num_hidden_layers
        return SkipState.allocate(tables, max_tokens, keep_ids=_keeps_ids(runners), num_layers=num_layers)

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        if self.modes_state is not None and input_ids is not None:
            decode, num_valid = _decode_mask(input_ids.shape[0], input_ids.device)
            self.modes_state.begin_forward(input_ids, decode, num_valid)
        return super().forward(input_ids, positions, *args, **kwargs)  # type: ignore[misc]


class ModesQwen3VLMoeForConditionalGeneration(ModesMixin, Qwen3VLMoeForConditionalGeneration):
    """vLLM's Qwen3-VL-MoE with MoDES."""


class ModesQwen3MoeForCausalLM(ModesMixin, Qwen3MoeForCausalLM):
    """vLLM's Qwen3-MoE with MoDES."""
