"""`SkipPlan`: one skipping policy for one model, with what it was searched with, as versioned JSON."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from modes.adapters.registry import MODALITIES
from modes.engine.info import ModelInfo
from modes.engine.rules import SkipRule
from modes.errors import PlanError, UsageError
from modes.io import write_json_atomic
from modes.policies import ModesConfig, PolicyConfig, policy_from_json
from modes.ratios import TargetOf

__all__ = ["FORMAT_VERSION", "ModelInfo", "PlanError", "SkipPlan"]

FORMAT_VERSION = 2  # 2: a typed "policy" section and the special token ids; 1 is still read


class SkipPlan:
    """Which routed experts to skip: a policy config, the model it fits, and provenance.

    ``SkipPlan(importance, thresholds)`` is MoDES (`modes.policies.ModesConfig`: slot i of
    token x at layer l is skipped iff alpha_m(l) * pi_i < tau_m); ``SkipPlan(policy=...)``
    takes any registered policy config. ``special_token_ids`` are the ids the plan was
    calibrated and searched with as never skipped; `modes.apply` uses them unless told others.
    """

    def __init__(
        self,
        importance: dict[int, dict[str, float]] | None = None,
        thresholds: dict[str, float] | None = None,
        renormalize: bool = False,
        *,
        policy: PolicyConfig | None = None,
        model: ModelInfo | None = None,
        target_ratio: float | None = None,
        target_of: TargetOf | str = TargetOf.SKIPPABLE,
        achieved_ratio: float | None = None,
        special_token_ids: Iterable[int] | None = None,
        provenance: dict[str, Any] | None = None,
    ):
        if policy is None:
            policy = ModesConfig(importance or {}, thresholds or {}, renormalize)
        elif importance or thresholds or renormalize:
            raise PlanError("give either importance and thresholds (MoDES) or a policy config, not both")
        self.policy = policy
        self.model = model
        self.target_ratio = target_ratio
        self.target_of = TargetOf.parse(target_of)  # what target and achieved ratio are shares of
        self.achieved_ratio = achieved_ratio
        self.special_token_ids = None if special_token_ids is None else tuple(sorted(set(special_token_ids)))
        self.provenance = dict(provenance or {})

    # -- what the engine reads -------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.policy.name

    @property
    def importance(self) -> dict[int, dict[str, float]]:
        return self.policy.importance if isinstance(self.policy, ModesConfig) else {}

    @property
    def thresholds(self) -> dict[str, float]:
        return self.policy.thresholds if isinstance(self.policy, ModesConfig) else {}

    @property
    def renormalize(self) -> bool:
        return self.policy.renormalize

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.thresholds)

    def rule(self, layer: int) -> SkipRule:
        return self.policy.rule(layer)

    def check_fits(self, info: ModelInfo) -> None:
        """Raise `PlanError` if this plan was made for a different model than ``info``."""
        mine = self.model
        if mine is not None:
            for name in ("model_type", "num_experts", "top_k"):
                if getattr(mine, name) != getattr(info, name):
                    raise PlanError(
                        f"plan was made for {name}={getattr(mine, name)!r} but the model has "
                        f"{name}={getattr(info, name)!r}; calibrate and search on this model"
                    )
        self.policy.check_fits(info)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SkipPlan) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return (
            f"SkipPlan(policy={self.policy!r}, model={self.model!r}, achieved_ratio={self.achieved_ratio!r})"
        )

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": "modes.SkipPlan",
            "format_version": FORMAT_VERSION,
            "model": self.model.to_json() if self.model else None,
            "policy": self.policy.to_json(),
            "special_token_ids": None if self.special_token_ids is None else list(self.special_token_ids),
            "target_ratio": self.target_ratio,
            "target_of": self.target_of.value,
            "achieved_ratio": self.achieved_ratio,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "plan") -> SkipPlan:
        if not isinstance(data, dict) or data.get("format") != "modes.SkipPlan":
            raise PlanError(f"{source} is not a modes plan (no 'format': 'modes.SkipPlan')")
        version = data.get("format_version")
        if version not in _POLICY_READERS:
            raise PlanError(
                f"{source} has format_version {version!r}; this modes reads {sorted(_POLICY_READERS)}"
            )
        try:
            return cls(
                policy=_POLICY_READERS[version](data),
                model=ModelInfo.from_json(data["model"]) if data.get("model") else None,
                target_ratio=data.get("target_ratio"),
                target_of=data.get("target_of", TargetOf.ALL),  # files from before the key: all slots
                achieved_ratio=data.get("achieved_ratio"),
                special_token_ids=data.get("special_token_ids"),
                provenance=data.get("provenance") or {},
            )
        except (PlanError, UsageError) as error:
            raise PlanError(f"{source}: {error}") from error
        except (KeyError, AttributeError, TypeError, ValueError) as error:
            raise PlanError(f"{source} is malformed ({error!r})") from error

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SkipPlan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise PlanError(f"{path} is not valid JSON ({error})") from error
        return cls.from_json(data, source=str(path))


def _policy_v1(data: dict[str, Any]) -> PolicyConfig:
    """Format 1 kept MoDES's fields at the top and a baseline's as ``method`` + ``parameters``."""
    method = data.get("method", "modes")
    if method == "modes":
        return ModesConfig(data["importance"], data["thresholds"], bool(data.get("renormalize", False)))
    return policy_from_json({"name": method, **(data.get("parameters") or {})})


_POLICY_READERS = {1: _policy_v1, 2: lambda data: policy_from_json(data["policy"])}
