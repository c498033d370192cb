"""Per-architecture data: what the one skipping mechanism needs to know about a model family.

Every supported model stores its routed experts in a transformers experts module; the table
below only says where media tokens come from, whether the routing weights carry a constant
scaling factor, and which experts modules see only a subset of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modes.errors import UserError

__all__ = [
    "MODALITIES",
    "ModelSpec",
    "UnsupportedModelError",
    "register_model",
    "spec_for",
    "supported_model_types",
]

MODALITIES: tuple[str, ...] = ("text", "visual", "audio")
"""Modalities a plan may name, in the order of their integer codes."""

VISUAL_TOKEN_FIELDS = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")
AUDIO_TOKEN_FIELDS = ("audio_token_id", "audio_token_index")
MARKUP_TOKEN_FIELDS = (
    "vision_start_token_id",
    "vision_end_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "video_start_token_id",
    "video_end_token_id",
    "audio_start_token_id",
    "audio_end_token_id",
    "boi_token_index",
    "eoi_token_index",
)


class UnsupportedModelError(UserError, ValueError):
    """The model is not in the adapter table (or has no transformers experts modules)."""


@dataclass(frozen=True)
class ModelSpec:
    """What differs between MoE families, as data.

    - ``media_token_fields``: config fields holding the placeholder token ids of each
      non-text modality (searched in the config and its sub-configs).
    - ``scaling_factor_field``: text-config field of a constant factor the router multiplies
      into the combination weights (pi is the weight before it, algorithm.md section 1).
    - ``token_subsets``: experts-module name fragment -> name of the token subset that module
      sees (ERNIE-4.5-VL runs text and vision tokens through separate expert sets).
    - ``eager_accepts_sentinel``: the family's eager experts loop skips index == num_experts.
    - ``dense_router``: the experts module takes router-scaled inputs of every expert instead
      of (hidden, top_k_index, top_k_weights) (Llama 4).
    """

    family: str
    modalities: tuple[str, ...] = ("text",)
    media_token_fields: dict[str, tuple[str, ...]] = field(default_factory=dict)
    scaling_factor_field: str | None = None
    token_subsets: dict[str, str] = field(default_factory=dict)
    eager_accepts_sentinel: bool = True
    dense_router: bool = False


_VL = {"visual": VISUAL_TOKEN_FIELDS}
_REGISTRY: dict[str, ModelSpec] = {}


def register_model(model_types: str | tuple[str, ...], spec: ModelSpec) -> None:
    """Add (or replace) the data for one or more transformers ``model_type`` values."""
    for model_type in (model_types,) if isinstance(model_types, str) else model_types:
        _REGISTRY[model_type] = spec


register_model(("qwen3_vl_moe", "qwen3_vl_moe_text"), ModelSpec("Qwen3-VL-MoE", ("text", "visual"), _VL))
register_model(("qwen3_5_moe", "qwen3_5_moe_text"), ModelSpec("Qwen3.5-MoE", ("text", "visual"), _VL))
register_model(
    ("glm4v_moe", "glm4v_moe_text"),
    ModelSpec("GLM-4.5V", ("text", "visual"), _VL, scaling_factor_field="routed_scaling_factor"),
)
register_model(
    ("ernie4_5_vl_moe", "ernie4_5_vl_moe_text"),
    ModelSpec(
        "ERNIE-4.5-VL",
        ("text", "visual"),
        _VL,
        token_subsets={"text_moe": "non_visual", "vision_moe": "visual"},
    ),
)
register_model(("llama4", "llama4_text"), ModelSpec("Llama 4", ("text", "visual"), _VL, dense_router=True))
register_model(
    "kimi_k25",
    ModelSpec("Kimi-K2.5", ("text", "visual"), _VL, scaling_factor_field="routed_scaling_factor"),
)
register_model("internvl", ModelSpec("InternVL-3.5 (MoE text model)", ("text", "visual"), _VL))
register_model(
    "qwen3_omni_moe_thinker",
    ModelSpec(
        "Qwen3-Omni-MoE thinker",
        ("text", "visual", "audio"),
        {"visual": VISUAL_TOKEN_FIELDS, "audio": AUDIO_TOKEN_FIELDS},
    ),
)
register_model("qwen3_moe", ModelSpec("Qwen3-MoE"))
register_model("mixtral", ModelSpec("Mixtral"))
register_model("olmoe", ModelSpec("OLMoE"))
register_model("deepseek_v3", ModelSpec("DeepSeek-V3", scaling_factor_field="routed_scaling_factor"))
register_model("gpt_oss", ModelSpec("GPT-OSS", eager_accepts_sentinel=False))


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def spec_for(model_type: str) -> ModelSpec:
    """The spec of ``model_type``, or an error naming every supported one and the way out."""
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    hint = ""
    if model_type == "qwen3_omni_moe":
        hint = " For Qwen3-Omni-MoE, apply the plan to the thinker: `modes.apply(model.thinker, plan)`."
    raise UnsupportedModelError(
        f"modes has no adapter for model_type {model_type!r}.{hint} Supported: "
        f"{', '.join(supported_model_types())}. If the model stores its routed experts in a "
        "transformers experts module, describe it with `modes.adapters.register_model(...)`."
    )
