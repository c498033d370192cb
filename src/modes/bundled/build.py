"""Tokenizer, processor and model config of the bundled Qwen3-VL-MoE, built from scratch.

The tokenizer is a word-level `tokenizers` model over the benchmark's vocabulary with the
Qwen3-VL special tokens and a Qwen-style chat template, so the real Qwen3-VL processor and
model classes handle it exactly as they handle the full-size checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3VLMoeConfig

from modes.data.benchmark import IMAGE_SIZE, vocabulary
from modes.loading import PATCH_SIZE, build_qwen3_vl_processor

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tokenizer", "model_config", "save_processor"]

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %} <|vision_start|> <|image_pad|> <|vision_end|> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} <|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = [*SPECIAL_TOKENS, "<unk>", "user", "assistant", "system", "\n", *vocabulary()]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def model_config(tokenizer: PreTrainedTokenizerFast, **text_overrides: Any) -> Qwen3VLMoeConfig:
    """A shrunk Qwen3-VL-MoE: 12 MoE layers of 32 experts, top-8, and a 2-block vision tower."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=12,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=32,
        num_experts_per_tok=8,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5]},
        router_aux_loss_coef=0.01,
        tie_word_embeddings=True,
        pad_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        bos_token_id=ids("<|im_start|>"),
    )
    text.update(text_overrides)
    patches = IMAGE_SIZE // PATCH_SIZE
    vision = dict(
        depth=2,
        hidden_size=96,
        intermediate_size=192,
        num_heads=4,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text["hidden_size"],
        num_position_embeddings=patches * patches,
        deepstack_visual_indexes=[0],
    )
    return Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def save_processor(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """Write tokenizer, image/video processor configs and processor config for AutoProcessor."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    processor = build_qwen3_vl_processor(tokenizer, image_size=IMAGE_SIZE)
    tokenizer.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    resize = {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}
    video = {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": resize,
    }
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    processor_config = {"processor_class": "Qwen3VLProcessor"}
    (directory / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
