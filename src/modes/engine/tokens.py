"""Which modality each token of the current forward call belongs to.

A pre-forward hook on the patched model fills a `TokenContext` from the call's inputs; every
experts wrapper of that model reads it. The experts see a flat ``[B * L, H]`` tensor in the
order of the flattened ``input_ids``, so one code per flattened token is all they need.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from modes.adapters.registry import MARKUP_TOKEN_FIELDS, MODALITIES, ModelSpec

__all__ = [
    "NUM_CODES",
    "OTHER",
    "PAD",
    "STAT_NAMES",
    "CallTokens",
    "TokenContext",
    "media_token_ids",
    "modality_code",
]

OTHER = len(MODALITIES)  # special tokens: never skipped, counted in the totals
PAD = OTHER + 1  # padding: never skipped, never counted
NUM_CODES = PAD + 1
STAT_NAMES: tuple[str, ...] = (*MODALITIES, "other")  # one statistics bin per code below PAD


def modality_code(name: str) -> int:
    return MODALITIES.index(name)


def _config_values(config: Any, fields: Iterable[str]) -> set[int]:
    """Integer values of ``fields`` in ``config`` and in its sub-configs (text, vision, audio...)."""
    configs = [config]
    for attr in ("text_config", "vision_config", "audio_config", "thinker_config"):
        sub = getattr(config, attr, None)
        if sub is not None:
            configs.append(sub)
    values = set()
    for cfg in configs:
        for name in fields:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                values.add(value)
    return values


def media_token_ids(config: Any, spec: ModelSpec) -> dict[str, set[int]]:
    """Placeholder token ids of each non-text modality of ``spec`` found in ``config``."""
    return {
        modality: _config_values(config, fields)
        for modality, fields in spec.media_token_fields.items()
        if modality in spec.modalities
    }


@dataclass(frozen=True)
class CallTokens:
    """The tokens one experts call sees and what every layer derives from their codes.

    Derived once per forward and shared by all MoE layers, so a decode step's per-layer
    bookkeeping is a couple of small ops rather than a dozen.
    """

    codes: torch.Tensor  # [T] long modality codes
    skippable: torch.Tensor  # [T, 1] bool: False for special tokens and padding
    bins: torch.Tensor  # [T] long statistics bin (code, with padding folded into OTHER)
    counted_per_bin: torch.Tensor  # [NUM_CODES - 1] long, tokens per bin, padding not counted

    @classmethod
    def of(cls, codes: torch.Tensor) -> CallTokens:
        bins = codes.clamp(max=OTHER)  # [T]
        counted = (codes < PAD).long()  # [T]
        return cls(
            codes=codes,
            skippable=(codes < OTHER).unsqueeze(1),
            bins=bins,
            counted_per_bin=torch.zeros(NUM_CODES - 1, dtype=torch.long, device=codes.device).index_add_(
                0, bins, counted
            ),
        )


@dataclass
class TokenContext:
    """Per-call token codes for one patched model (no global state: models don't interfere)."""

    media_ids: dict[str, torch.Tensor]
    special_ids: torch.Tensor
    codes: torch.Tensor | None = None  # [N] int64 codes, N = B * L of the current call
    sequence: torch.Tensor | None = None  # [N] int64 batch row of each token
    subsets: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N] bool
    attention_received: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N]
    _tokens: dict[str | None, CallTokens] = field(default_factory=dict, repr=False)  # per subset

    @classmethod
    def for_model(cls, config: Any, spec: ModelSpec, special_token_ids: Iterable[int] | None) -> TokenContext:
        special = set(special_token_ids or ()) | _config_values(config, MARKUP_TOKEN_FIELDS)
        media = media_token_ids(config, spec)
        for ids in media.values():
            special -= ids
        return cls(
            media_ids={m: torch.tensor(sorted(ids), dtype=torch.long) for m, ids in media.items()},
            special_ids=torch.tensor(sorted(special), dtype=torch.long),
        )

    def set_from_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoding: bool = False,
        subset_type_ids: torch.Tensor | None = None,
    ) -> None:
        """Code every token of ``input_ids`` [B, L]: a decode step's new token is text, never
        media (algorithm.md 2), unless it is a special token, which is never skipped wherever it
        comes from (so a sequential decode step and a continuous-batching forward, which cannot
        tell prompt from generated tokens, code a generated special token alike)."""
        codes = torch.full_like(input_ids, modality_code("text"))  # [B, L]
        if not decoding:
            for modality, ids in self.media_ids.items():
                codes[torch.isin(input_ids, ids.to(input_ids.device))] = modality_code(modality)
        codes[torch.isin(input_ids, self.special_ids.to(input_ids.device))] = OTHER
        if attention_mask is not None and attention_mask.dim() == 2:
            current = attention_mask[:, -input_ids.shape[1] :]  # [B, L]
            codes[current == 0] = PAD
        self._set(codes)
        self.subsets = _subsets_from_type_ids(subset_type_ids, self.codes.numel())

    def set_all_text(self, batch: int, length: int, device: torch.device) -> None:
        """For calls without ``input_ids`` (embeddings given directly): every token is text."""
        self._set(torch.full((batch, length), modality_code("text"), dtype=torch.long, device=device))

    def _set(self, codes: torch.Tensor) -> None:
        batch, length = codes.shape
        self.codes = codes.reshape(-1)  # [B * L]
        self.sequence = torch.arange(batch, device=codes.device).repeat_interleave(length)  # [B * L]
        self.subsets = {}
        self.attention_received = {}
        self._tokens = {}

    def clear(self) -> None:
        self.codes = self.sequence = None
        self.subsets = {}
        self.attention_received = {}
        self._tokens = {}

    def tokens_for(self, subset: str | None, num_tokens: int) -> CallTokens:
        """The tokens an experts module of ``subset`` sees (``num_tokens`` of them), cached per call."""
        tokens = self._tokens.get(subset)
        if tokens is None:
            tokens = self._tokens[subset] = CallTokens.of(self.codes_for(subset, num_tokens))
        elif tokens.codes.numel() != num_tokens:
            self.codes_for(subset, num_tokens)  # raises the mismatch error
        return tokens

    def codes_for(self, subset: str | None, num_tokens: int) -> torch.Tensor:
        """Codes of the tokens an experts module sees ([num_tokens]), with a clear error if unknown."""
        if self.codes is None:
            raise RuntimeError(
                "modes: an experts module ran outside a forward of the patched model, so the "
                "modality of its tokens is unknown; call the model that `modes.apply` patched"
            )
        codes = self.select(subset, self.codes)
        if codes.numel() != num_tokens:
            raise RuntimeError(
                f"modes: experts module received {num_tokens} tokens but the call has "
                f"{codes.numel()}; this model routes tokens in a way its adapter does not describe"
            )
        return codes

    def select(self, subset: str | None, values: torch.Tensor | None) -> torch.Tensor | None:
        """The entries of per-token ``values`` [N] that an experts module of ``subset`` sees."""
        if values is None or subset is None or subset not in self.subsets:
            return values
        return values[self.subsets[subset]]


def _subsets_from_type_ids(type_ids: torch.Tensor | None, num_tokens: int) -> dict[str, torch.Tensor]:
    """ERNIE-4.5-VL style modality-isolated experts: vision tokens (type id != 0) vs the rest."""
    if type_ids is None:
        return {}
    visual = type_ids.reshape(-1).bool()  # [N]
    if visual.numel() != num_tokens or not bool(visual.any()):
        return {}
    return {"visual": visual, "non_visual": ~visual}
