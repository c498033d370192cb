"""The pipeline's defaults, in one place the library and the command line both read (plain
constants: ``modes --help`` shows them without importing torch)."""

from __future__ import annotations

__all__ = ["COMPARE_GRID_SIZE", "DEFAULT_GAMMAS", "SEARCH_GRID_SIZE"]

DEFAULT_GAMMAS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # alpha exponents a search tries
SEARCH_GRID_SIZE = 100  # thresholds per modality of a search's covering grid
COMPARE_GRID_SIZE = 24  # the same for `compare` and `demo`, which search many targets and methods
