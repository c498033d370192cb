"""Attention received by each token, for MC-MoE's token protection (prefill only).

MC-MoE protects tokens by ||x||_1 times the attention they receive, averaged over heads and
divided by the number of queries that can see them (the paper's formula; the authors' release
sums along the wrong axis). Fused attention kernels never form the probabilities, so while a
plan that needs them is applied, the language model's attention implementation is swapped for
a registered wrapper of the same implementation: outputs are unchanged (the original function
computes them) and, in prefill, the wrapper also computes each key's received attention.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from modes.adapters.registry import UnsupportedModelError
from modes.engine.tokens import TokenContext

__all__ = ["AttentionProbe", "attention_received"]

_PREFIX = "modes_probe_"
_RECEIVERS: WeakKeyDictionary[nn.Module, tuple[TokenContext, int]] = WeakKeyDictionary()


def attention_received(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Mean over heads of the attention each of the last Q keys receives, per query that sees it.

    ``query`` [B, Hq, Q, D], ``key`` [B, Hkv, K, D], ``mask`` boolean (True = attend) or additive,
    broadcastable to [B, 1, Q, K], or None for plain causal attention -> [B, Q].
    """
    batch, heads, queries, _ = query.shape
    keys = key.shape[2]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)  # [B, Hq, K, D]
    allowed = _allowed(mask, batch, queries, keys, query.device)  # [B, Q, K]
    total = query.new_zeros(batch, keys, dtype=torch.float32)  # [B, K]
    for head in range(heads):  # one head at a time: memory O(B Q K)
        scores = (query[:, head] @ key[:, head].transpose(1, 2)).float() * scaling  # [B, Q, K]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        total += probs.sum(dim=1)
    seen_by = allowed.sum(dim=1).clamp_min(1)  # [B, K] queries that can see each key
    return (total / heads / seen_by)[:, keys - queries :]  # [B, Q]


def _allowed(mask: torch.Tensor | None, batch: int, queries: int, keys: int, device) -> torch.Tensor:
    if mask is None:  # causal, the queries being the last ones
        rows = torch.arange(keys - queries, keys, device=device).unsqueeze(1)  # [Q, 1]
        return (torch.arange(keys, device=device) <= rows).expand(batch, queries, keys)
    mask = mask[..., :keys]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(batch, 1, queries, keys)[:, 0]


def _probed(original: str, module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    output = _original_function(original, module)(module, query, key, value, attention_mask, *args, **kwargs)
    receiver = _RECEIVERS.get(module)
    if receiver is not None and query.shape[2] > 1:
        context, layer = receiver
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        with torch.no_grad():
            received = attention_received(query, key, attention_mask, scaling)  # [B, Q]
        context.attention_received[layer] = received.reshape(-1)
    return output


def _original_function(original: str, module: nn.Module) -> Callable:
    if original == "eager":  # each modeling file has its own eager function
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


def _probe_name(original: str) -> str:
    name = _PREFIX + original
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, partial(_probed, original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


@dataclass
class AttentionProbe:
    """The attention modules of a patched model's MoE layers, switched to the probing wrapper."""

    modules: list[nn.Module]
    original: dict[int, tuple[Any, str]]  # id(config) -> (config, implementation)

    @classmethod
    def attach(cls, layers: dict[int, nn.Module], context: TokenContext) -> AttentionProbe:
        """``layers``: MoE layer index -> its decoder layer. Every layer is checked before any is
        changed, so a refusal leaves the model as it was."""
        for layer, decoder_layer in layers.items():
            attention = getattr(decoder_layer, "self_attn", None)
            if attention is None or getattr(attention, "config", None) is None:
                raise UnsupportedModelError(
                    f"decoder layer {layer} ({type(decoder_layer).__name__}) has no `self_attn` "
                    "module with a config, which token protection (mc_moe) needs"
                )
        modules, original = [], {}
        for layer, decoder_layer in layers.items():
            attention = decoder_layer.self_attn
            config = attention.config
            if id(config) not in original:
                implementation = config._attn_implementation or "eager"
                if implementation.startswith(_PREFIX):
                    implementation = implementation[len(_PREFIX) :]
                original[id(config)] = (config, implementation)
                config._attn_implementation_internal = _probe_name(implementation)
            _RECEIVERS[attention] = (context, layer)
            modules.append(attention)
        return cls(modules, original)

    def detach(self) -> None:
        for module in self.modules:
            _RECEIVERS.pop(module, None)
        for config, implementation in self.original.values():
            config._attn_implementation_internal = implementation
