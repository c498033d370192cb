"""MoDES inside vLLM's fused-MoE layers: one routing table per model, one opaque op per MoE layer.

vLLM compiles the decoder stack with torch.compile and, on CPU, traces the MoE router into the
graph; a value the router reads outside its inputs would be frozen at trace time. So the per
token state (token ids, decode mask) is written once per forward into fixed buffers by the
model's eager outer ``forward``, and the skip decision runs in ``modes_vllm::skip_slots``, a
custom op the compiler calls but never traces: it reads the buffers of the current forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modes_vllm.routing import MODALITIES, RoutingTables, route_coded

__all__ = ["PlanFileError", "SkipState", "active_state", "load_plan", "skip_stats"]

# config fields naming each modality's placeholder token ids (read from the model's HF config)
MEDIA_TOKEN_FIELDS = {"visual": ("image_token_id", "video_token_id"), "audio": ("audio_token_id",)}
CODES = (*MODALITIES, "other")


class PlanFileError(ValueError):
    """The plan file cannot be served: unreadable, not a MoDES plan, or made for another model."""


def load_plan(path: str | Path) -> dict[str, Any]:
    """The plan's JSON, checked to be a MoDES plan `modes_vllm.routing` can apply."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanFileError(f"MODES_PLAN={path}: no such file; write one with `modes search`") from None
    except (OSError, ValueError) as error:
        raise PlanFileError(f"MODES_PLAN={path} is not a JSON plan file ({error})") from None
    policy = plan.get("policy") if isinstance(plan, dict) else None
    if not isinstance(policy, dict) or policy.get("name") != "modes":
        raise PlanFileError(f"MODES_PLAN={path} is not a MoDES plan (no 'policy' named 'modes')")
    if not {"importance", "thresholds"} <= policy.keys():
        raise PlanFileError(f"MODES_PLAN={path}: the MoDES policy lacks 'importance' or 'thresholds'")
    if policy.get("renormalize"):
        raise PlanFileError(
            f"MODES_PLAN={path} renormalises kept weights, which the vLLM plugin does not do; "
            "search a plan without renormalize"
        )
    return plan


def check_plan_fits(plan: dict[str, Any], text_config: Any, model_type: str, path: str) -> None:
    """Raise `PlanFileError` if the plan was made for another model than vLLM's."""
    made_for = plan.get("model") or {}
    model = {
        "model_type": model_type,
        "num_experts": _num_experts(text_config),
        "top_k": text_config.num_experts_per_tok,
    }
    for name, value in model.items():
        if name in made_for and made_for[name] != value:
            raise PlanFileError(
                f"MODES_PLAN={path} was made for {name}={made_for[name]!r} but vLLM serves a model "
                f"with {name}={value!r}; calibrate and search on this model"
            )
    layers = {int(layer) for layer in plan["policy"]["importance"]}
    if max(layers) >= text_config.num_hidden_layers:
        raise PlanFileError(
            f"MODES_PLAN={path} has alphas for layer {max(layers)} but the model has "
            f"{text_config.num_hidden_layers} layers; calibrate and search on this model"
        )


def _num_experts(text_config: Any) -> int:
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(text_config, name, None) is not None:
            return int(getattr(text_config, name))
    raise PlanFileError("the model's config names no expert count")


@dataclass
class SkipState:
    """What `skip_slots` reads (the current forward's token codes and padding mask) and what it
    counts (routed and skipped slots per modality code, on the routing's device)."""

    tables: RoutingTables
    keep_ids: bool  # True: skipped slots keep their expert id with weight 0 (kernels without -1)
    codes: torch.Tensor  # [N] this forward's modality codes in [:T] (`RoutingTables.token_codes`)
    valid: torch.Tensor  # [N] bool: False on padding tokens
    num_layers: int
    routed: torch.Tensor = field(init=False)  # [layers, codes] slots routed
    skipped: torch.Tensor = field(init=False)  # [layers, codes] slots skipped
    record: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None  # for tests:
    # (layer, kept [T, k] bool, expert ids [T, k]) of each call

    def __post_init__(self) -> None:
        self.routed = torch.zeros(self.num_layers, len(CODES), dtype=torch.long, device=self.codes.device)
        self.skipped = torch.zeros_like(self.routed)

    @classmethod
    def allocate(cls, tables: RoutingTables, max_tokens: int, keep_ids: bool, num_layers: int) -> SkipState:
        device = tables.alpha.device
        return cls(
            tables,
            keep_ids,
            torch.zeros(max_tokens, dtype=torch.long, device=device),
            torch.zeros(max_tokens, dtype=torch.bool, device=device),
            num_layers,
        )

    def begin_forward(self, token_ids: torch.Tensor, decode: torch.Tensor, num_valid: int | None) -> None:
        """Code this forward's tokens (ids [T], decode mask [T]) into the buffers, once for every
        MoE layer (in place: their addresses stay fixed)."""
        count = token_ids.shape[0]
        if count > self.codes.shape[0]:
            raise RuntimeError(f"{count} tokens in one forward exceed the {self.codes.shape[0]} allocated")
        self.codes[:count].copy_(self.tables.token_codes(token_ids, decode))
        self.valid[:count] = True
        if num_valid is not None:
            self.valid[num_valid:count] = False

    def skip(
        self, layer: int, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept weights and expert ids [T, k] of one MoE layer's routing, counting the slots."""
        count = weights.shape[0]
        codes = self.codes[:count]  # [T]
        kept_weights, kept_ids = route_coded(self.tables, layer, codes, weights, expert_ids)
        skipped = kept_ids < 0  # [T, k]
        if self.keep_ids:
            kept_ids = torch.where(skipped, expert_ids, kept_ids)
        valid = self.valid[:count].long()  # [T]
        self.routed[layer].index_add_(0, codes, valid * weights.shape[1])
        self.skipped[layer].index_add_(0, codes, valid * skipped.sum(dim=1))
        if self.record is not None:
            self.record.append((layer, ~skipped, expert_ids.clone()))
        return kept_weights, kept_ids.to(expert_ids.dtype)

    def reset(self) -> None:
        """Zero the slot counts."""
        self.routed.zero_()
        self.skipped.zero_()

    def stats(self) -> dict[str, Any]:
        """Slots routed and skipped since start, per modality (special tokens under 'other') and
        per MoE layer and modality; ratios over all slots and over the skippable ones."""
        routed, skipped = self.routed.cpu(), self.skipped.cpu()  # [layers, codes]
        per_code = {
            code: {"routed": int(routed[:, i].sum()), "skipped": int(skipped[:, i].sum())}
            for i, code in enumerate(CODES)
        }
        layers = {
            layer: {"routed": routed[layer].tolist(), "skipped": skipped[layer].tolist()}
            for layer in sorted(self.tables.layers)
        }
        total, gone = int(routed.sum()), int(skipped.sum())
        skippable = total - per_code["other"]["routed"]
        return {
            "codes": list(CODES),
            "modalities": per_code,
            "layers": layers,
            "routed": total,
            "skipped": gone,
            "skip_ratio": gone / total if total else 0.0,
            "skip_ratio_of_skippable": gone / skippable if skippable else 0.0,
        }


_ACTIVE: SkipState | None = None


def activate(state: SkipState | None) -> None:
    global _ACTIVE
    _ACTIVE = state


def active_state() -> SkipState | None:
    """The state of the model this process serves with MoDES (None: no plan)."""
    return _ACTIVE


def skip_stats() -> dict[str, Any] | None:
    """`SkipState.stats` of this process's model (None without a plan): in-process engines only."""
    return None if _ACTIVE is None else _ACTIVE.stats()


@torch.library.custom_op("modes_vllm::skip_slots", mutates_args=())
def skip_slots(
    weights: torch.Tensor, expert_ids: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoDES on one MoE layer's top-k routing [T, k], for the tokens of the current forward."""
    if _ACTIVE is None:
        return weights.clone(), expert_ids.clone()
    return _ACTIVE.skip(layer, weights, expert_ids)


@skip_slots.register_fake
def _(weights: torch.Tensor, expert_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(weights), torch.empty_like(expert_ids)
