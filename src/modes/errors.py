"""Errors a user can act on, shared by every layer of modes."""

from __future__ import annotations

__all__ = ["PlanError"]


class PlanError(ValueError):
    """A plan or importance file is malformed, or does not fit the model it is applied to."""
