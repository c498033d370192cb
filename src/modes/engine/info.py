"""`ModelInfo`: the facts about a model that a plan or importance file must agree with."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from modes.errors import PlanError

__all__ = ["ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    """Model type, MoE layer indices, routed experts per layer and top-k."""

    model_type: str
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "moe_layers": list(self.moe_layers)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        try:
            return cls(
                model_type=str(data["model_type"]),
                moe_layers=tuple(int(i) for i in data["moe_layers"]),
                num_experts=int(data["num_experts"]),
                top_k=int(data["top_k"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PlanError(f"plan 'model' section is malformed ({error!r})") from error
