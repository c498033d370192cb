"""Exact-match accuracy of greedy answers, overall and per skill, with the realised skip ratio."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from modes import engine
from modes.data.encoding import encode_prompts
from modes.data.sample import Sample, batches_by_kind
from modes.data.samples import load_samples
from modes.engine import ApplyOptions, SlotCounts, add_counts, stats_from_counts
from modes.errors import UsageError
from modes.loading import input_device
from modes.parallel import Ranks, ranks
from modes.plan import SkipPlan

__all__ = ["evaluate", "generate_answers", "normalise_answer"]


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    batch_size: int = 32,
    max_new_tokens: int = 4,
    progress: bool = True,
    group: Ranks | None = None,
) -> dict[str, str]:
    """Greedy answer of every sample, keyed by sample id; with ``group`` (`modes.parallel`),
    each rank answers its share of the batches and every rank gets all the answers."""
    group = group or Ranks()
    batches = group.share(list(batches_by_kind(samples, batch_size)))
    bar = tqdm(total=sum(len(b) for _, b in batches), desc="eval", unit="sample", disable=not progress)

    def my_answers() -> dict[int, dict[str, str]]:
        answers = {}
        for index, batch in batches:
            answers[index] = _answer_batch(model, processor, batch, max_new_tokens)
            bar.update(len(batch))
        return answers

    per_batch = group.gather(my_answers)
    bar.close()
    return {sample_id: text for answers in per_batch.values() for sample_id, text in answers.items()}


def _answer_batch(model: Any, processor: Any, batch: list[Sample], max_new_tokens: int) -> dict[str, str]:
    tokenizer = getattr(processor, "tokenizer", processor)
    device = input_device(model)
    inputs = {k: v.to(device) for k, v in encode_prompts(processor, batch).items()}
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]  # [B, new]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return {sample.id: text.strip() for sample, text in zip(batch, texts, strict=True)}


def evaluate(
    model: Any,
    processor: Any,
    samples: Sequence[Sample] | None = None,
    plan: SkipPlan | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    options: ApplyOptions | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy overall and per skill; with a plan (or an already patched model), the skip ratios.

    A ``plan`` is applied with ``options`` (`modes.ApplyOptions`) for the evaluation only.
    """
    samples = list(samples if samples is not None else load_samples(split="test"))[:limit]
    if not samples:
        raise UsageError("no samples to evaluate")
    patched = (
        engine.applied(model, plan, options, processor=processor)
        if plan is not None
        else contextlib.nullcontext()
    )
    group = ranks()
    with patched:
        if engine.is_patched(model):
            engine.reset_stats(model)
        show = progress and group.is_main
        answers = generate_answers(model, processor, samples, batch_size, max_new_tokens, show, group)
        stats = _stats_of_every_rank(model, group) if engine.is_patched(model) else None
        paths = engine.execution_info(model)["paths"] if engine.is_patched(model) else None
    return {**_report(samples, answers, stats), "execution_paths": paths}


def _stats_of_every_rank(model: Any, group: Ranks) -> dict[str, Any]:
    total: SlotCounts = {}
    for counts in group.gather(lambda: {group.rank: engine.slot_counts(model)}).values():
        total = add_counts(total, counts)
    return stats_from_counts(total)


def _report(samples: Sequence[Sample], answers: dict[str, str], stats: dict | None) -> dict[str, Any]:
    correct: dict[str, list[bool]] = defaultdict(list)
    for sample in samples:
        correct[sample.skill].append(normalise_answer(answers[sample.id]) == normalise_answer(sample.answer))
    hits = [hit for skill_hits in correct.values() for hit in skill_hits]
    accuracy = sum(hits) / len(hits)
    return {
        "accuracy": accuracy,
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / len(hits)),  # binomial standard error
        "per_skill": {skill: sum(h) / len(h) for skill, h in sorted(correct.items())},
        "samples": len(hits),
        "skip_ratio": stats["ratio"] if stats else 0.0,  # of all slots
        "skippable_ratio": stats["skippable_ratio"] if stats else 0.0,  # of the text / media slots
        "per_modality": {m: v["ratio"] for m, v in stats["per_modality"].items()} if stats else {},
        "skip_stats": stats,
        "answers": answers,
    }
