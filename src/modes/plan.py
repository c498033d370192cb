"""`SkipPlan`: the plain-data result of calibration and search, saved as versioned JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modes.adapters.registry import MODALITIES
from modes.io import write_json_atomic

__all__ = ["FORMAT_VERSION", "ModelInfo", "PlanError", "SkipPlan"]

FORMAT_VERSION = 1


class PlanError(ValueError):
    """A plan is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a model that a plan must agree with."""

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


@dataclass
class SkipPlan:
    """Which routed experts to skip: alpha per (MoE layer, modality) and tau per modality.

    A slot (token x, routed expert i) at layer l is skipped iff alpha_m(l) * pi_i < tau_m,
    m the modality of x (algorithm.md section 2). ``renormalize`` rescales the kept weights to
    the original sum (off by default, as in the released code).
    """

    importance: dict[int, dict[str, float]]
    thresholds: dict[str, float]
    renormalize: bool = False
    method: str = "modes"  # or a baseline policy of `modes.engine.policies`
    parameters: dict[str, Any] = field(default_factory=dict)  # the baseline policy's parameters
    model: ModelInfo | None = None
    target_ratio: float | None = None
    achieved_ratio: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.importance = {int(layer): dict(alphas) for layer, alphas in self.importance.items()}
        self.thresholds = dict(self.thresholds)
        self.validate()

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.thresholds)

    def validate(self) -> None:
        """Raise `PlanError` naming the first problem found in the plan's own data."""
        if self.method != "modes":
            from modes.engine.policies import validate_parameters

            validate_parameters(self.method, self.parameters)
            return
        if not self.thresholds:
            raise PlanError("plan has no thresholds; give at least {'text': tau}")
        for modality, tau in self.thresholds.items():
            _check_modality(modality, "thresholds")
            _check_value(tau, f"thresholds[{modality!r}]")
        if not self.importance:
            raise PlanError("plan has no importance entries; run `modes.calibrate` first")
        for layer, alphas in self.importance.items():
            if layer < 0:
                raise PlanError(f"importance has a negative layer index {layer}")
            for modality, alpha in alphas.items():
                _check_modality(modality, f"importance[{layer}]")
                _check_value(alpha, f"importance[{layer}][{modality!r}]")
            missing = set(self.thresholds) - set(alphas)
            if missing:
                raise PlanError(
                    f"importance[{layer}] has no alpha for modality {sorted(missing)} that the "
                    "thresholds name; calibrate with those modalities or drop their thresholds"
                )

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
        have, want = set(self.importance), set(info.moe_layers)
        if self.method != "modes":
            from modes.engine.policies import parameter_experts, parameter_layers

            have = parameter_layers(self.method, self.parameters) or want
            if parameter_experts(self.method, self.parameters) - {info.num_experts}:
                raise PlanError(
                    f"{self.method} tables have {sorted(parameter_experts(self.method, self.parameters))} "
                    f"experts but the model has {info.num_experts}; calibrate on this model"
                )
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise PlanError(
                f"plan layers do not match the model's MoE layers {sorted(want)}: "
                f"missing {missing}, not in model {extra}; the plan was made for another model size"
            )

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": "modes.SkipPlan",
            "format_version": FORMAT_VERSION,
            "model": self.model.to_json() if self.model else None,
            "thresholds": self.thresholds,
            "importance": {str(layer): alphas for layer, alphas in sorted(self.importance.items())},
            "renormalize": self.renormalize,
            "method": self.method,
            "parameters": self.parameters,
            "target_ratio": self.target_ratio,
            "achieved_ratio": self.achieved_ratio,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "plan") -> SkipPlan:
        if not isinstance(data, dict) or data.get("format") != "modes.SkipPlan":
            raise PlanError(f"{source} is not a modes plan (no 'format': 'modes.SkipPlan')")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise PlanError(
                f"{source} has format_version {version!r}; this modes reads version {FORMAT_VERSION}"
            )
        try:
            importance = {int(layer): alphas for layer, alphas in data["importance"].items()}
            return cls(
                importance=importance,
                thresholds=data["thresholds"],
                renormalize=bool(data.get("renormalize", False)),
                method=str(data.get("method", "modes")),
                parameters=data.get("parameters") or {},
                model=ModelInfo.from_json(data["model"]) if data.get("model") else None,
                target_ratio=data.get("target_ratio"),
                achieved_ratio=data.get("achieved_ratio"),
                provenance=data.get("provenance") or {},
            )
        except (KeyError, AttributeError, TypeError, ValueError) as error:
            if isinstance(error, PlanError):
                raise PlanError(f"{source}: {error}") from error
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


def _check_modality(modality: str, where: str) -> None:
    if modality not in MODALITIES:
        raise PlanError(f"{where} names unknown modality {modality!r}; known: {list(MODALITIES)}")


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise PlanError(f"{where} must be finite and >= 0, got {value!r}")
