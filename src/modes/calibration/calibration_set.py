"""`CalibrationSet`: calibration samples prepared once for every step that reads them.

Calibration, each search, fidelity and every baseline's calibrator run the same teacher-forced
batches and compare with the same unskipped log-probs. A set holds the batches (every rank's,
in global order), this rank's share, the reference log-probs of that share (computed once, by
whichever step needs them first), and a fingerprint that names the data for caches.
`measure` runs the set under a plan: the one place "forward every batch with a plan applied
and add up KL and slot counts" is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from modes import engine
from modes.calibration.kl import CalibrationBatch, Semantics, answer_logprobs, prepare_batches
from modes.data.sample import Sample
from modes.engine import ApplyOptions, SlotCounts, add_counts, stats_from_counts
from modes.errors import UsageError
from modes.loading import input_device
from modes.parallel import Ranks, ranks
from modes.ratios import SkipRatios

__all__ = ["CalibrationSet", "PlanMeasurement", "measure"]


@dataclass
class CalibrationSet:
    """Teacher-forced calibration batches with their KL positions (``semantics``), this rank's
    share of them, and the unskipped model's log-probs there once computed."""

    batches: list[CalibrationBatch]  # every rank's, in global order
    semantics: Semantics
    samples: Sequence[Sample]  # what the batches encode
    batch_size: int
    fingerprint: str  # sha256 of the samples, semantics and batching
    group: Ranks = field(default_factory=ranks)
    _references: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # [A, V] per batch

    @classmethod
    def build(
        cls,
        model: Any,
        processor: Any,
        samples: Sequence[Sample],
        batch_size: int = 16,
        semantics: Semantics = "modes",
    ) -> CalibrationSet:
        """Encode ``samples`` once (on the model's input device) for the KL positions of ``semantics``."""
        if not samples:
            raise UsageError("no calibration samples")
        batches = prepare_batches(processor, samples, batch_size, input_device(model), semantics)
        digest = hashlib.sha256(f"{semantics}\x00{batch_size}\x00".encode())
        for sample in samples:
            digest.update(f"{sample.id}\x00{sample.question}\x00{sample.answer}\x00".encode())
        return cls(batches, semantics, list(samples), batch_size, digest.hexdigest())

    @classmethod
    def of(
        cls,
        model: Any,
        processor: Any,
        samples: Sequence[Sample] | CalibrationSet,
        batch_size: int = 16,
        semantics: Semantics = "modes",
    ) -> CalibrationSet:
        """``samples`` itself when already a set (its semantics must be ``semantics``), else a new set."""
        if not isinstance(samples, CalibrationSet):
            return cls.build(model, processor, samples, batch_size, semantics)
        if samples.semantics != semantics:
            raise UsageError(
                f"this calibration set scores the {samples.semantics!r} positions, not {semantics!r}: "
                f"build one with CalibrationSet.build(..., semantics={semantics!r})"
            )
        return samples

    def with_semantics(self, model: Any, processor: Any, semantics: Semantics) -> CalibrationSet:
        """The same samples and batching scored at the positions of ``semantics``."""
        if semantics == self.semantics:
            return self
        return CalibrationSet.build(model, processor, self.samples, self.batch_size, semantics)

    @property
    def mine(self) -> list[tuple[int, CalibrationBatch]]:
        """(global index, batch) of this rank's share."""
        return self.group.share(self.batches)

    @property
    def answer_tokens(self) -> int:
        """Scored positions over every rank's batches."""
        return sum(batch.answer_tokens for batch in self.batches)

    def remember_reference(self, index: int, logprobs: torch.Tensor) -> None:
        """Keep the unskipped log-probs of batch ``index`` that a caller computed anyway."""
        self._references.setdefault(index, logprobs)

    @torch.no_grad()
    def reference(self, model: Any, index: int) -> torch.Tensor:
        """The unskipped model's log-probs [A, V] at batch ``index``'s KL positions (computed on
        first use; the model must not be skipping anything then)."""
        if index not in self._references:
            self._references[index] = answer_logprobs(model, self.batches[index])
        return self._references[index]

    def references(self, model: Any) -> None:
        """Compute every reference of this rank's share now (before a plan is applied)."""
        for index, _ in self.mine:
            self.reference(model, index)


@dataclass(frozen=True)
class PlanMeasurement:
    """A plan's effect on a calibration set, summed over every rank's batches."""

    kl_sum: float  # KL(p_reference || p_plan) summed over the answer tokens
    agreeing: int  # answer tokens whose top-1 prediction is the reference's
    answer_tokens: int
    counts: SlotCounts  # skipped and total slots per layer and bin (`modes.engine.slot_counts`)

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.answer_tokens

    @property
    def top1_agreement(self) -> float:
        return self.agreeing / self.answer_tokens

    @property
    def stats(self) -> dict[str, Any]:
        """`modes.skip_stats`' report of the counts."""
        return stats_from_counts(self.counts)

    @property
    def ratios(self) -> SkipRatios:
        return SkipRatios.from_stats(self.stats)


@torch.no_grad()
def measure(
    model: Any,
    calibration: CalibrationSet,
    plan: Any,
    *,
    options: ApplyOptions | None = None,
    processor: Any = None,
    kl: bool = True,
    progress: str | None = None,
) -> PlanMeasurement:
    """``plan`` applied to ``model`` (`modes.apply`; an engine plan of any kind) over every batch
    of ``calibration``: KL to the reference and top-1 agreement (unless ``kl=False``: slot
    counts only, no reference needed) and the slot counts. Each rank runs its share; per-batch
    results are combined in global batch order, so the sums equal one process's."""
    group = calibration.group
    mine = calibration.mine
    if kl:
        calibration.references(model)  # before the plan is applied

    def my_batches() -> dict[int, tuple[float, int, int, SlotCounts]]:
        results = {}
        bar = tqdm(mine, desc=progress, unit="batch", disable=not (progress and group.is_main))
        with engine.applied(model, plan, options, processor=processor):
            for index, batch in bar:
                engine.reset_stats(model)
                if kl:
                    logprobs, reference = answer_logprobs(model, batch), calibration.reference(model, index)
                    divergence = float(F.kl_div(logprobs, reference, log_target=True, reduction="sum"))
                    agreeing = int((logprobs.argmax(-1) == reference.argmax(-1)).sum())
                else:
                    model(**batch.inputs, use_cache=False)
                    divergence, agreeing = 0.0, 0
                results[index] = (divergence, agreeing, batch.answer_tokens, engine.slot_counts(model))
        return results

    kl_sum, agreeing, tokens, counts = 0.0, 0, 0, {}
    for batch_kl, batch_agreeing, batch_tokens, batch_counts in group.gather(my_batches).values():
        kl_sum, agreeing, tokens = kl_sum + batch_kl, agreeing + batch_agreeing, tokens + batch_tokens
        counts = add_counts(counts, batch_counts)
    return PlanMeasurement(kl_sum, agreeing, tokens, counts)
