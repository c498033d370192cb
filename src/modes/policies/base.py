"""`PolicyConfig`, the registry of policies by name, and reading a policy back from JSON."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

from modes.engine.info import ModelInfo
from modes.engine.rules import SkipRule
from modes.errors import PlanError, UsageError

__all__ = ["PolicyConfig", "check_number", "policy_from_json", "register_policy", "registered_policies"]

_POLICIES: dict[str, type[PolicyConfig]] = {}
Config = TypeVar("Config", bound=type["PolicyConfig"])


class PolicyConfig(ABC):
    """One skipping policy's parameters. Subclasses are frozen dataclasses that validate in
    ``__post_init__`` and name themselves (``name``, stored in plans) with a format ``version``."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    renormalize: bool = False  # rescale kept weights to the original sum (MoDES's switch)

    @abstractmethod
    def rule(self, layer: int) -> SkipRule:
        """The rule of MoE layer ``layer``."""

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """The config as JSON-ready data (`from_parameters` reads it back)."""

    @classmethod
    @abstractmethod
    def from_parameters(cls, data: dict[str, Any]) -> PolicyConfig:
        """The config from `parameters` output (layer keys may be strings)."""

    def layers(self) -> set[int] | None:
        """MoE layers the config has values for (None: layer-independent)."""
        return None

    def expert_counts(self) -> set[int]:
        """Numbers of experts its per-expert tables assume (empty: none)."""
        return set()

    def check_fits(self, info: ModelInfo) -> None:
        """Raise `PlanError` unless the config has a value for exactly the model's MoE layers
        and its tables match the model's experts."""
        if self.expert_counts() - {info.num_experts}:
            raise PlanError(
                f"{self.name} tables have {sorted(self.expert_counts())} experts but the model has "
                f"{info.num_experts}; calibrate on this model"
            )
        have, want = self.layers(), set(info.moe_layers)
        if have is not None and have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise PlanError(
                f"plan layers do not match the model's MoE layers {sorted(want)}: missing {missing}, "
                f"not in model {extra}; the plan was made for another model size"
            )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, **self.parameters()}


def register_policy(cls: Config) -> Config:
    """Class decorator: make ``cls`` loadable from plan files under ``cls.name``."""
    if cls.name in _POLICIES and _POLICIES[cls.name] is not cls:
        raise UsageError(f"a policy named {cls.name!r} is already registered ({_POLICIES[cls.name]})")
    _POLICIES[cls.name] = cls
    return cls


def registered_policies() -> tuple[str, ...]:
    return tuple(sorted(_POLICIES))


def policy_from_json(data: dict[str, Any]) -> PolicyConfig:
    """The registered config named by ``data["name"]``, at the version it was written with."""
    name = data.get("name")
    if name not in _POLICIES:
        raise PlanError(f"unknown method {name!r}; registered policies: {list(registered_policies())}")
    cls = _POLICIES[name]
    version = data.get("version", 1)
    if version != cls.version:
        raise PlanError(f"{name} policy has version {version!r}; this modes reads version {cls.version}")
    parameters = {k: v for k, v in data.items() if k not in ("name", "version")}
    try:
        return cls.from_parameters(parameters)
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise PlanError(f"{name} policy parameters are malformed ({error!r})") from error


def check_number(value: Any, where: str) -> float:
    """``value`` as a float, or a `PlanError` unless it is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise PlanError(f"{where} must be finite and >= 0, got {value!r}")
    return float(value)
