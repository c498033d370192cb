"""MoDES and the baselines it is compared with (algorithm.md sections 1, 2 and 5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from modes.adapters.registry import MODALITIES
from modes.engine.rules import DiepRule, KReduction, McMoeRule, NaeeRule, SkipRule, ThresholdRule
from modes.errors import PlanError
from modes.policies.base import PolicyConfig, check_number, register_policy

__all__ = ["DiepConfig", "KReductionConfig", "McMoeConfig", "ModesConfig", "NaeeConfig"]


def _int_keys(table: dict[Any, Any]) -> dict[int, Any]:
    return {int(layer): value for layer, value in table.items()}


def _str_keys(table: dict[int, Any]) -> dict[str, Any]:
    return {str(layer): value for layer, value in sorted(table.items())}


def _check_modality(modality: str, where: str) -> None:
    if modality not in MODALITIES:
        raise PlanError(f"{where} names unknown modality {modality!r}; known: {list(MODALITIES)}")


@register_policy
@dataclass(frozen=True)
class ModesConfig(PolicyConfig):
    """MoDES (GMLG + DMT): skip slot i of token x at layer l iff alpha_m(l) * pi_i < tau_m.

    ``importance`` holds alpha per MoE layer and modality, ``thresholds`` tau per modality;
    ``renormalize`` rescales the kept weights to the original sum (off, as in the release).
    """

    name: ClassVar[str] = "modes"

    importance: dict[int, dict[str, float]]
    thresholds: dict[str, float]
    renormalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "importance", {k: dict(v) for k, v in _int_keys(self.importance).items()})
        object.__setattr__(self, "thresholds", dict(self.thresholds))
        if not self.thresholds:
            raise PlanError("plan has no thresholds; give at least {'text': tau}")
        for modality, tau in self.thresholds.items():
            _check_modality(modality, "thresholds")
            check_number(tau, f"thresholds[{modality!r}]")
        if not self.importance:
            raise PlanError("plan has no importance entries; run `modes.calibrate` first")
        for layer, alphas in self.importance.items():
            if layer < 0:
                raise PlanError(f"importance has a negative layer index {layer}")
            for modality, alpha in alphas.items():
                _check_modality(modality, f"importance[{layer}]")
                check_number(alpha, f"importance[{layer}][{modality!r}]")
            missing = set(self.thresholds) - set(alphas)
            if missing:
                raise PlanError(
                    f"importance[{layer}] has no alpha for modality {sorted(missing)} that the "
                    "thresholds name; calibrate with those modalities or drop their thresholds"
                )

    def rule(self, layer: int) -> SkipRule:
        return ThresholdRule(self.importance[layer], self.thresholds)

    def layers(self) -> set[int]:
        return set(self.importance)

    def parameters(self) -> dict[str, Any]:
        return {
            "importance": _str_keys(self.importance),
            "thresholds": self.thresholds,
            "renormalize": self.renormalize,
        }

    @classmethod
    def from_parameters(cls, data: dict[str, Any]) -> ModesConfig:
        return cls(data["importance"], data["thresholds"], bool(data.get("renormalize", False)))


@register_policy
@dataclass(frozen=True)
class KReductionConfig(PolicyConfig):
    """Keep each token's top ``keep`` routed slots: skip ratio exactly 1 - keep / k."""

    name: ClassVar[str] = "k_reduction"

    keep: int

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
            raise PlanError(f"k_reduction needs an integer 'keep' >= 0, got {self.keep!r}")

    @classmethod
    def for_ratio(cls, top_k: int, ratio: float) -> KReductionConfig:
        """The k' of k closest to skipping ``ratio`` of the routed slots."""
        return cls(max(0, round(top_k * (1 - ratio))))

    def rule(self, layer: int) -> SkipRule:
        return KReduction(self.keep)

    def parameters(self) -> dict[str, Any]:
        return {"keep": self.keep}

    @classmethod
    def from_parameters(cls, data: dict[str, Any]) -> KReductionConfig:
        return cls(data["keep"])


def _check_layer_table(name: str, table: dict[int, float], what: str, scale: float) -> None:
    if not isinstance(table, dict) or not table:
        raise PlanError(f"{name} needs {what!r}: {{layer: value}}")
    for layer, value in table.items():
        check_number(value, f"{name} {what}[{layer}]")
    check_number(scale, f"{name} scale")


@register_policy
@dataclass(frozen=True)
class NaeeConfig(PolicyConfig):
    """NAEE generalised to top-k: per-layer ``beta`` (median pi_2 / pi_1 on calibration data)
    times ``scale`` (found by bisection for a target ratio)."""

    name: ClassVar[str] = "naee"

    beta: dict[int, float]
    scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.beta, dict):
            object.__setattr__(self, "beta", _int_keys(self.beta))
        _check_layer_table(self.name, self.beta, "beta", self.scale)

    def rule(self, layer: int) -> SkipRule:
        return NaeeRule(self.beta[layer] * self.scale)

    def layers(self) -> set[int]:
        return set(self.beta)

    def parameters(self) -> dict[str, Any]:
        return {"beta": _str_keys(self.beta), "scale": self.scale}

    @classmethod
    def from_parameters(cls, data: dict[str, Any]) -> NaeeConfig:
        return cls(data["beta"], data.get("scale", 1.0))


@register_policy
@dataclass(frozen=True)
class McMoeConfig(NaeeConfig):
    """NAEE's rule with MC-MoE's prefill token protection: each sequence's top ``protect``
    fraction of tokens by ||x||_1 * attention received keeps every slot."""

    name: ClassVar[str] = "mc_moe"

    protect: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            isinstance(self.protect, bool)
            or not isinstance(self.protect, (int, float))
            or not 0 <= self.protect <= 1
        ):
            raise PlanError(f"mc_moe 'protect' must be a fraction in [0, 1], got {self.protect!r}")

    def rule(self, layer: int) -> SkipRule:
        return McMoeRule(self.beta[layer] * self.scale, self.protect)

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "protect": self.protect}

    @classmethod
    def from_parameters(cls, data: dict[str, Any]) -> McMoeConfig:
        return cls(data["beta"], data.get("scale", 1.0), data.get("protect", 0.02))


@register_policy
@dataclass(frozen=True)
class DiepConfig(PolicyConfig):
    """DiEP: per-layer ``gamma1`` (NAEE's median) times ``scale``, and per-layer [E x E] ``cka``
    tables (expert-output similarity over the layer's mean pairwise similarity)."""

    name: ClassVar[str] = "diep"

    gamma1: dict[int, float]
    cka: dict[int, list[list[float]]] = field(default_factory=dict)
    scale: float = 1.0

    def __post_init__(self) -> None:
        for what in ("gamma1", "cka"):
            if isinstance(getattr(self, what), dict):
                object.__setattr__(self, what, _int_keys(getattr(self, what)))
        _check_layer_table(self.name, self.gamma1, "gamma1", self.scale)
        if not isinstance(self.cka, dict) or set(self.cka) != set(self.gamma1):
            raise PlanError(
                f"diep needs 'cka': one [E x E] table for each of the layers {sorted(self.gamma1)}"
            )
        for layer, table in self.cka.items():
            tensor = torch.tensor(table, dtype=torch.float32)
            if (
                tensor.dim() != 2
                or tensor.shape[0] != tensor.shape[1]
                or not bool(torch.isfinite(tensor).all())
            ):
                raise PlanError(f"diep cka table of layer {layer} must be a finite square matrix")

    def rule(self, layer: int) -> SkipRule:
        return DiepRule(self.gamma1[layer] * self.scale, torch.tensor(self.cka[layer], dtype=torch.float32))

    def layers(self) -> set[int]:
        return set(self.gamma1)

    def expert_counts(self) -> set[int]:
        return {len(table) for table in self.cka.values()}

    def parameters(self) -> dict[str, Any]:
        return {"gamma1": _str_keys(self.gamma1), "cka": _str_keys(self.cka), "scale": self.scale}

    @classmethod
    def from_parameters(cls, data: dict[str, Any]) -> DiepConfig:
        return cls(data["gamma1"], data["cka"], data.get("scale", 1.0))
