"""One vocabulary for skip ratios (algorithm.md section 3).

A skip ratio is a share of routed slots, counted two ways: of the *skippable* slots (text and
media tokens; like the paper's k' of k experts) or of *all* slots (special tokens, never
skipped, included). `TargetOf` names which one a target means; `SkipRatios` carries both.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from modes.errors import UsageError

__all__ = ["SkipRatios", "TargetOf"]


class TargetOf(StrEnum):
    """What a target skip ratio is a share of. A ``str``: JSON and argparse see plain words."""

    SKIPPABLE = "skippable"
    ALL = "all"

    @classmethod
    def parse(cls, value: TargetOf | str) -> TargetOf:
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"target_of must be one of {[m.value for m in cls]}, not {value!r}") from None


@dataclass(frozen=True)
class SkipRatios:
    """The share of routed slots skipped, of the skippable slots and of all slots."""

    skippable: float
    all: float

    def of(self, target_of: TargetOf | str) -> float:
        """The ratio a target ``of`` the skippable or of all slots is compared with."""
        return self.skippable if TargetOf.parse(target_of) is TargetOf.SKIPPABLE else self.all

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> SkipRatios:
        """From a `modes.skip_stats` report (``skippable_ratio`` and ``ratio``)."""
        return cls(skippable=stats["skippable_ratio"], all=stats["ratio"])

    def to_json(self) -> dict[str, float]:
        return {"ratio_of_skippable_slots": self.skippable, "ratio_of_all_slots": self.all}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SkipRatios:
        return cls(skippable=data["ratio_of_skippable_slots"], all=data["ratio_of_all_slots"])
