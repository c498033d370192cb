"""Errors a user can act on, shared by every layer of modes.

Each derives from `UserError`: its message names the problem and the fix, and the command
line prints it as one line (``--debug`` for the traceback). Anything else is a bug in modes or
below it and keeps its traceback. Library callers can still catch the built-in kind each one
also is (``ValueError``, ``RuntimeError``).
"""

from __future__ import annotations

__all__ = ["PlanError", "UsageError", "UserError"]


class UserError(Exception):
    """A mistake a user can fix: a file, an option, a model or data that does not fit."""


class UsageError(UserError, ValueError):
    """An argument out of its range, or options that cannot work together."""


class PlanError(UserError, ValueError):
    """A plan or importance file is malformed, or does not fit the model it is applied to."""
