"""Exact-match accuracy of greedy answers, overall and per skill, with the realised skip ratio."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm import tqdm

from modes.bundled.benchmark import Sample
from modes.data.encoding import encode_prompts
from modes.data.samples import load_samples
from modes.engine import patch as engine
from modes.plan import SkipPlan

__all__ = ["batches_by_kind", "evaluate", "generate_answers", "normalise_answer"]


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def batches_by_kind(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Batches of samples that all have an image or all have none (less padding)."""
    for has_image in (True, False):
        group = [s for s in samples if (s.image is not None) == has_image]
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    batch_size: int = 32,
    max_new_tokens: int = 4,
    progress: bool = True,
) -> dict[str, str]:
    """Greedy answer of every sample, keyed by sample id."""
    tokenizer = getattr(processor, "tokenizer", processor)
    answers: dict[str, str] = {}
    bar = tqdm(total=len(samples), desc="eval", unit="sample", disable=not progress)
    device = next(model.parameters()).device
    for batch in batches_by_kind(samples, batch_size):
        inputs = {k: v.to(device) for k, v in encode_prompts(processor, batch).items()}
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # [B, new]
        for sample, text in zip(
            batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True
        ):
            answers[sample.id] = text.strip()
        bar.update(len(batch))
    bar.close()
    return answers


def evaluate(
    model: Any,
    processor: Any,
    samples: Sequence[Sample] | None = None,
    plan: SkipPlan | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    special_token_ids: Sequence[int] | None = None,
    progress: bool = True,
    pack_weights: bool = False,
    cpu_kernel: bool = False,
) -> dict[str, Any]:
    """Accuracy overall and per skill; with a plan (or an already patched model), the skip ratios.

    A ``plan`` is applied for the evaluation only (with ``pack_weights`` or ``cpu_kernel``, see
    `modes.apply`) and removed afterwards.
    """
    samples = list(samples if samples is not None else load_samples(split="test"))[:limit]
    if not samples:
        raise ValueError("no samples to evaluate")
    applied_here = plan is not None
    if applied_here:
        tokenizer = getattr(processor, "tokenizer", processor)
        special = special_token_ids or tokenizer.all_special_ids
        engine.apply(model, plan, special, pack_weights=pack_weights, cpu_kernel=cpu_kernel)
    try:
        if engine.is_patched(model):
            engine.reset_stats(model)
        answers = generate_answers(model, processor, samples, batch_size, max_new_tokens, progress)
        stats = engine.skip_stats(model) if engine.is_patched(model) else None
    finally:
        if applied_here:
            engine.remove(model)
    return _report(samples, answers, stats)


def _report(samples: Sequence[Sample], answers: dict[str, str], stats: dict | None) -> dict[str, Any]:
    correct: dict[str, list[bool]] = defaultdict(list)
    for sample in samples:
        correct[sample.skill].append(normalise_answer(answers[sample.id]) == normalise_answer(sample.answer))
    hits = [hit for skill_hits in correct.values() for hit in skill_hits]
    return {
        "accuracy": sum(hits) / len(hits),
        "per_skill": {skill: sum(h) / len(h) for skill, h in sorted(correct.items())},
        "samples": len(hits),
        "skip_ratio": stats["ratio"] if stats else 0.0,
        "per_modality": {m: v["ratio"] for m, v in stats["per_modality"].items()} if stats else {},
        "skip_stats": stats,
        "answers": answers,
    }
