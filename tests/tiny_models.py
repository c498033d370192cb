"""Shrunk configs of every supported family, with random weights (no downloads).

Each entry builds the transformers model class users load for that family. Media token ids
are placed inside the small vocabulary so that prompts can carry them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedModel

VOCAB = 128
IMAGE_ID, VIDEO_ID, AUDIO_ID, START_ID, END_ID = 120, 121, 122, 123, 124
TEXT_IDS = range(3, 100)

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=4,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


@dataclass(frozen=True)
class TinyModel:
    model_type: str
    build: Callable[[], PreTrainedModel]
    media: dict[str, int]  # modality -> one placeholder id the prompts may use

    def __str__(self) -> str:
        return self.model_type


def _text(**overrides) -> dict:
    return {**_TEXT, **overrides}


def _vlm(model_type: str, text: dict, vision: dict | None = None, **top) -> PreTrainedModel:
    config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision or {}, **top)
    return AutoModelForImageTextToText.from_config(config)


def _causal(model_type: str, **fields) -> PreTrainedModel:
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))


_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4)
_QWEN_VL_TOP = dict(
    image_token_id=IMAGE_ID,
    video_token_id=VIDEO_ID,
    vision_start_token_id=START_ID,
    vision_end_token_id=END_ID,
)
_DEEPSEEK = dict(
    n_routed_experts=8,
    num_experts_per_tok=4,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    num_hidden_layers=3,
)


def _deepseek_text(**fields) -> dict:
    text = _text(**_DEEPSEEK, **fields)
    del text["head_dim"]  # derived from the rope/nope head dims
    text["num_key_value_heads"] = text["num_attention_heads"]  # MLA has no grouped KV heads
    return text


def _qwen3_omni_thinker() -> PreTrainedModel:
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    config = Qwen3OmniMoeThinkerConfig(
        text_config=_text(),
        vision_config=dict(_VISION),
        audio_config=dict(
            d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, output_dim=32
        ),
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        audio_token_id=AUDIO_ID,
        vision_start_token_id=START_ID,
        audio_start_token_id=END_ID,
    )
    return Qwen3OmniMoeThinkerForConditionalGeneration(config)


TINY_MODELS: list[TinyModel] = [
    TinyModel(
        "qwen3_vl_moe", lambda: _vlm("qwen3_vl_moe", _text(), _VISION, **_QWEN_VL_TOP), {"visual": IMAGE_ID}
    ),
    TinyModel(
        "qwen3_5_moe",
        lambda: _vlm(
            "qwen3_5_moe",
            _text(shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"]),
            _VISION,
            **_QWEN_VL_TOP,
        ),
        {"visual": IMAGE_ID},
    ),
    TinyModel(
        "glm4v_moe",
        lambda: _vlm(
            "glm4v_moe",
            _text(
                n_routed_experts=8,
                n_shared_experts=1,
                first_k_dense_replace=0,
                routed_scaling_factor=2.5,
                n_group=1,
                topk_group=1,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [2, 1, 1],
                    "partial_rotary_factor": 0.5,
                },
            ),
            dict(
                depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4
            ),
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            image_start_token_id=START_ID,
            image_end_token_id=END_ID,
        ),
        {"visual": IMAGE_ID},
    ),
    TinyModel(
        "ernie4_5_vl_moe",
        lambda: _vlm(
            "ernie4_5_vl_moe",
            _text(
                moe_intermediate_size=[16, 8],
                moe_num_shared_experts=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
            ),
            dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4),
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            image_start_token_id=START_ID,
            image_end_token_id=END_ID,
        ),
        {"visual": IMAGE_ID},
    ),
    # Llama4ForConditionalGeneration.forward fails in transformers 5.24 (it reads
    # `image_outputs` from the language model's output), so the text model is what runs.
    TinyModel(
        "llama4_text",
        lambda: _causal(
            "llama4_text", **_text(num_local_experts=8, num_experts_per_tok=1, intermediate_size_mlp=48)
        ),
        {},
    ),
    TinyModel(
        "kimi_k25",
        lambda: _vlm(
            "kimi_k25",
            _deepseek_text(model_type="deepseek_v3"),
            dict(
                num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, patch_size=4
            ),
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
        ),
        {"visual": IMAGE_ID},
    ),
    TinyModel(
        "internvl",
        lambda: _vlm(
            "internvl",
            _text(model_type="qwen3_moe"),
            dict(
                num_hidden_layers=1,
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                image_size=16,
                patch_size=4,
            ),
            image_token_id=IMAGE_ID,
        ),
        {"visual": IMAGE_ID},
    ),
    TinyModel("qwen3_omni_moe_thinker", _qwen3_omni_thinker, {"visual": IMAGE_ID, "audio": AUDIO_ID}),
    TinyModel("qwen3_moe", lambda: _causal("qwen3_moe", **_text()), {}),
    TinyModel("mixtral", lambda: _causal("mixtral", **_text(num_local_experts=8)), {}),
    TinyModel("olmoe", lambda: _causal("olmoe", **_text()), {}),
    TinyModel("deepseek_v3", lambda: _causal("deepseek_v3", **_deepseek_text()), {}),
    TinyModel(
        "gpt_oss",
        lambda: _causal(
            "gpt_oss", **_text(num_local_experts=8, layer_types=["sliding_attention", "full_attention"])
        ),
        {},
    ),
]


def build(tiny: TinyModel, seed: int = 0) -> PreTrainedModel:
    """Random-weight model in float32 and eval mode, spread so that routing is not uniform."""
    torch.manual_seed(seed)
    model = tiny.build().float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2:
                param.normal_(0, 1.0)  # sharper routing than the default init
    return model


def prompts(tiny: TinyModel, batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    """[batch, length] ids mixing text, one run of media placeholders per modality, and markup."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(TEXT_IDS.start, TEXT_IDS.stop, (batch, length), generator=generator)
    position = 2
    for media_id in tiny.media.values():
        if position > length:  # short prompts carry fewer media runs
            break
        ids[:, position - 1] = START_ID
        ids[:, position : position + 3] = media_id
        position += 5
    return ids


def call_kwargs(tiny: TinyModel, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """Forward arguments of ``ids`` for ``tiny``'s model."""
    kwargs = {"input_ids": ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if tiny.model_type == "ernie4_5_vl_moe":  # route image tokens through the vision experts
        kwargs["moe_mm_token_type_ids"] = (ids == tiny.media["visual"]).long()
    return kwargs
