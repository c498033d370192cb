"""`Sample`: one question about an optional image, with its reference answer and skill."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image

__all__ = ["Sample", "batches_by_kind"]


@dataclass(frozen=True)
class Sample:
    """One benchmark item: an optional image, a question, its answer and the skill it tests."""

    id: str
    question: str
    answer: str
    skill: str
    image: Image.Image | None = None


def batches_by_kind(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    """Batches of samples that all have an image or all have none (less padding)."""
    for has_image in (True, False):
        group = [s for s in samples if (s.image is not None) == has_image]
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]
