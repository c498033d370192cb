"""Turn (image, question, answer) samples into model inputs with the model's own processor.

Two forms: generation prompts (chat template up to the assistant turn) and teacher-forced
sequences (prompt + reference answer + end-of-turn) with a mask over the answer and
end-of-turn tokens, the only positions whose logits calibration and training use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from modes.data.sample import Sample
from modes.errors import UserError

__all__ = ["EmptyAnswerError", "answer_logit_mask", "encode_prompts", "encode_teacher_forced", "prompt_text"]


class EmptyAnswerError(UserError, ValueError):
    """A sample's answer produced no tokens, so it cannot be scored."""


def _messages(sample: Sample) -> list[dict[str, Any]]:
    """Question, then image: the image ends at a fixed distance from the answer, which lets the
    small bundled model find grid cells by relative position (real checkpoints accept either order)."""
    content: list[dict[str, str]] = [{"type": "text", "text": sample.question}]
    if sample.image is not None:
        content.append({"type": "image"})
    return [{"role": "user", "content": content}]


def prompt_text(processor: Any, sample: Sample) -> str:
    return processor.apply_chat_template(_messages(sample), add_generation_prompt=True, tokenize=False)


def _end_of_turn(processor: Any) -> str:
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.eos_token or "<|im_end|>"


def _encode(processor: Any, texts: list[str], samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    images = [s.image for s in samples if s.image is not None]
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if images:
        kwargs["images"] = images
    return dict(processor(**kwargs))


def encode_prompts(processor: Any, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Left-padded generation inputs for ``samples`` (images and text-only may mix)."""
    return _encode(processor, [prompt_text(processor, s) for s in samples], samples)


def encode_teacher_forced(processor: Any, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Left-padded prompt + answer + end-of-turn, plus ``answer_mask`` [B, L] over the scored tokens.

    The mask marks positions whose *token* is part of the answer or the end-of-turn; the
    logits predicting them sit one position earlier (see `answer_logit_mask`).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    end = _end_of_turn(processor)
    answer_lengths = []
    texts = []
    for sample in samples:
        answer_ids = tokenizer(f"{sample.answer} {end}", add_special_tokens=False)["input_ids"]
        if len(answer_ids) <= 1:
            raise EmptyAnswerError(f"sample {sample.id!r}: answer {sample.answer!r} has no tokens")
        answer_lengths.append(len(answer_ids))
        texts.append(f"{prompt_text(processor, sample)}{sample.answer} {end}")
    batch = _encode(processor, texts, samples)
    length = batch["input_ids"].shape[1]
    positions = torch.arange(length).unsqueeze(0)  # [1, L]
    batch["answer_mask"] = positions >= (length - torch.tensor(answer_lengths).unsqueeze(1))  # [B, L]
    return batch


def answer_logit_mask(answer_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] mask of the positions whose logits predict an answer token (shifted left by one)."""
    shifted = torch.zeros_like(answer_mask)
    shifted[:, :-1] = answer_mask[:, 1:]
    return shifted
