"""Teacher-forced calibration batches and the KL divergence at their answer tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from modes.data.encoding import answer_logit_mask, encode_teacher_forced
from modes.data.sample import Sample, batches_by_kind

__all__ = ["CalibrationBatch", "answer_kl", "prepare_batches"]


@dataclass
class CalibrationBatch:
    """Inputs of one batch, where its answer logits are, and the unskipped model's log-probs there."""

    inputs: dict[str, torch.Tensor]
    logit_mask: torch.Tensor  # [B, L] bool
    reference_logprobs: torch.Tensor | None = None  # [A, V], A = answer tokens in the batch

    @property
    def answer_tokens(self) -> int:
        return int(self.logit_mask.sum())


def prepare_batches(
    processor: Any, samples: Sequence[Sample], batch_size: int, device: torch.device
) -> list[CalibrationBatch]:
    batches = []
    for group in batches_by_kind(samples, batch_size):
        encoded = encode_teacher_forced(processor, group)
        mask = answer_logit_mask(encoded.pop("answer_mask"))
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encoded.items()}
        batches.append(CalibrationBatch(inputs, mask.to(device)))
    return batches


def answer_logprobs(model: Any, batch: CalibrationBatch) -> torch.Tensor:
    """Log-probabilities [A, V] at the batch's answer positions (temperature 1)."""
    logits = model(**batch.inputs, use_cache=False).logits  # [B, L, V]
    return F.log_softmax(logits[batch.logit_mask].float(), dim=-1)


def answer_kl(model: Any, batch: CalibrationBatch) -> torch.Tensor:
    """Sum over the batch's answer tokens of KL(p_reference || p_model), a 0-dim tensor."""
    logprobs = answer_logprobs(model, batch)
    reference = batch.reference_logprobs
    return F.kl_div(logprobs, reference, log_target=True, reduction="sum")
