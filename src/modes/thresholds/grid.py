"""Threshold grids B = {tau(1) < ... < tau(D)} (algorithm.md section 4)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from modes.errors import UsageError

__all__ = ["DEFAULT_X_MAX", "GridSpec"]

DEFAULT_X_MAX = {"text": 0.71, "visual": 0.6, "audio": 0.6}  # released code's defaults


@dataclass(frozen=True)
class GridSpec:
    """``sigmoid``: tau = 2 / (1 + exp(-c (x - 1))), x in linspace(0, x_max, D), dense near 0
    where scores live; ``linear``: tau = x itself.

    ``x_max`` per modality defaults to the released code's constants, tuned for 48-layer
    models (alpha ~ 1/48). `GridSpec.covering` sets it so the largest tau skips every slot.
    """

    size: int = 100
    mapping: Literal["sigmoid", "linear"] = "sigmoid"
    steepness: float = 10.0
    x_max: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_X_MAX))

    def __post_init__(self) -> None:
        if self.size < 2:
            raise UsageError(f"grid size must be at least 2, got {self.size}")
        if self.mapping not in ("sigmoid", "linear"):
            raise UsageError(f"grid mapping must be 'sigmoid' or 'linear', not {self.mapping!r}")

    @classmethod
    def covering(
        cls, max_scores: dict[str, float], size: int = 100, mapping: str = "sigmoid", steepness: float = 10.0
    ):
        """A grid whose largest tau per modality exceeds that modality's largest possible score."""
        x_max = {}
        for modality, score in max_scores.items():
            tau = min(1.999, score * 1.0001 + 1e-12)
            x_max[modality] = tau if mapping == "linear" else 1.0 - math.log(2.0 / tau - 1.0) / steepness
        return cls(size=size, mapping=mapping, steepness=steepness, x_max=x_max)

    def taus(self, modality: str) -> list[float]:
        top = self.x_max.get(modality, DEFAULT_X_MAX.get(modality, 0.6))
        xs = [top * i / (self.size - 1) for i in range(self.size)]
        if self.mapping == "linear":
            return xs
        return [2.0 / (1.0 + math.exp(-self.steepness * (x - 1.0))) for x in xs]

    def to_json(self) -> dict:
        return asdict(self)
