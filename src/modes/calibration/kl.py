"""Teacher-forced calibration batches and the KL divergence at their answer tokens.

Two readings of "the answer tokens' logits" (docs/algorithm.md section 7):

- ``"modes"``: the logits that predict the answer tokens and the end-of-turn token;
- ``"release"``: the authors' release, the logits at positions from the last ``<|im_start|>``
  plus the length of the assistant header to the end, i.e. the logits AT the answer tokens
  and at the end-of-turn token (one position later). The release writes the header's length
  as 3 (``<|im_start|>assistant\n`` on Qwen's tokenizer); here it is measured with the
  model's own tokenizer and chat template, so other tokenizers get the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from modes.data.encoding import answer_logit_mask, encode_teacher_forced, prompt_text
from modes.data.sample import Sample, batches_by_kind
from modes.errors import UsageError

__all__ = [
    "SEMANTICS",
    "CalibrationBatch",
    "Semantics",
    "answer_kl",
    "assistant_header_length",
    "prepare_batches",
    "release_logit_mask",
]

Semantics = Literal["modes", "release"]
SEMANTICS: tuple[str, ...] = get_args(Semantics)


@dataclass(frozen=True)
class CalibrationBatch:
    """Inputs of one teacher-forced batch and where its scored logits are."""

    inputs: dict[str, torch.Tensor]
    logit_mask: torch.Tensor  # [B, L] bool

    @property
    def answer_tokens(self) -> int:
        return int(self.logit_mask.sum())


def prepare_batches(
    processor: Any,
    samples: Sequence[Sample],
    batch_size: int,
    device: torch.device,
    semantics: Semantics = "modes",
) -> list[CalibrationBatch]:
    """Teacher-forced batches of ``samples`` whose KL positions follow ``semantics``."""
    if semantics not in SEMANTICS:
        raise UsageError(f"semantics must be one of {list(SEMANTICS)}, not {semantics!r}")
    batches = []
    header = assistant_header_length(processor) if semantics == "release" else 0
    for group in batches_by_kind(samples, batch_size):
        encoded = encode_teacher_forced(processor, group)
        answer_mask = encoded.pop("answer_mask")
        if semantics == "modes":
            mask = answer_logit_mask(answer_mask)
        else:
            mask = release_logit_mask(
                encoded["input_ids"], encoded["attention_mask"], _im_start_id(processor), header
            )
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encoded.items()}
        batches.append(CalibrationBatch(inputs, mask.to(device)))
    return batches


def release_logit_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, im_start_id: int, header_length: int
) -> torch.Tensor:
    """[B, L] the release's KL positions: from the last ``<|im_start|>`` + ``header_length`` (the
    assistant header's tokens, `assistant_header_length`) to the end of each (left-padded) row."""
    length = input_ids.shape[1]
    positions = torch.arange(length).expand_as(input_ids)  # [B, L]
    starts = torch.where(input_ids == im_start_id, positions, -1).max(dim=1).values  # [B]
    if bool((starts < 0).any()):
        raise UsageError("release semantics: a calibration row has no <|im_start|> token")
    return (positions >= (starts + header_length).unsqueeze(1)) & attention_mask.bool()


def _im_start_id(processor: Any) -> int:
    tokenizer = getattr(processor, "tokenizer", processor)
    token_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise UsageError(
            "release semantics need a ChatML tokenizer with <|im_start|> (Qwen's), as the release "
            "assumes; calibrate with semantics='modes'"
        )
    return int(token_id)


def assistant_header_length(processor: Any) -> int:
    """Tokens of the assistant header the chat template opens a reply with, from its
    ``<|im_start|>`` on: 3 on Qwen's tokenizer (``<|im_start|>``, ``assistant``, ``\n``), the
    release's constant; 2 on the bundled word-level tokenizer, which drops the newline."""
    tokenizer = getattr(processor, "tokenizer", processor)
    opened = prompt_text(processor, Sample("header", "?", "", ""))
    start = opened.rfind("<|im_start|>")
    if start < 0:
        raise UsageError(
            "release semantics need a ChatML chat template whose reply opens with <|im_start|> (Qwen's), "
            "as the release assumes; calibrate with semantics='modes'"
        )
    return len(tokenizer(opened[start:], add_special_tokens=False)["input_ids"])


def answer_logprobs(model: Any, batch: CalibrationBatch) -> torch.Tensor:
    """Log-probabilities [A, V] at the batch's answer positions (temperature 1)."""
    logits = model(**batch.inputs, use_cache=False).logits  # [B, L, V]
    return F.log_softmax(logits[batch.logit_mask].float(), dim=-1)


def answer_kl(model: Any, batch: CalibrationBatch, reference: torch.Tensor) -> torch.Tensor:
    """Sum over the batch's answer tokens of KL(p_reference || p_model), a 0-dim tensor;
    ``reference``: the unskipped log-probs [A, V] there (`answer_logprobs`)."""
    return F.kl_div(answer_logprobs(model, batch), reference, log_target=True, reduction="sum")
