"""Per-architecture data for the one skipping mechanism."""

from modes.adapters.registry import (
    MODALITIES,
    ModelSpec,
    UnsupportedModelError,
    register_model,
    spec_for,
    supported_model_types,
)

__all__ = [
    "MODALITIES",
    "ModelSpec",
    "UnsupportedModelError",
    "register_model",
    "spec_for",
    "supported_model_types",
]
