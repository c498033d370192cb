"""Frontier search for the per-modality thresholds (algorithm.md section 4).

Minimise f (mean KL at calibration answer tokens) subject to g (skip ratio) >= rho over the
tau grids. With g non-decreasing in each tau and f assumed so, the frontier walk needs at
most 2D evaluations where the exhaustive grid needs D^2, and both return the same pair.
Every evaluated point is appended to a cache file as it completes, so an interrupted search
resumes without recomputing a point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from modes.calibration.calibration_set import CalibrationSet, measure
from modes.calibration.importance import Importance
from modes.data.sample import Sample
from modes.defaults import DEFAULT_GAMMAS, SEARCH_GRID_SIZE
from modes.errors import UsageError, UserError
from modes.parallel import Ranks
from modes.plan import SkipPlan
from modes.ratios import SkipRatios, TargetOf
from modes.thresholds.grid import GridSpec

__all__ = [
    "DEFAULT_GAMMAS",
    "SearchBudgetError",
    "SearchConfig",
    "SearchPoint",
    "SearchResult",
    "TargetUnreachableError",
    "frontier_walk",
    "search",
    "unreachable_message",
]

Index = tuple[int, ...]  # 0-based grid position per searched modality


class TargetUnreachableError(UserError, ValueError):
    """Even the largest thresholds of the grid skip less than the target ratio."""


class SearchBudgetError(UserError, RuntimeError):
    """The evaluation budget ran out; rerun with the same cache to resume."""


Method = Literal["frontier", "exhaustive"]


@dataclass(frozen=True)
class SearchConfig:
    """How thresholds are searched: everything but the data, the alphas and the target.

    ``grid``: points per modality of a grid whose largest tau skips every skippable slot for
    each gamma (default 100), or a `GridSpec` (``GridSpec()`` is the release's own grid, tuned
    for 48-layer models). ``gammas``: the alpha exponents tried (`Importance.tempered`; 1 is
    MoDES's own alphas). ``target_of``: what the target is a share of. ``tied``: one threshold
    for every modality. ``max_evaluations``: a budget of computed points (a rerun resumes).
    """

    grid: GridSpec | int | None = None
    gammas: tuple[float, ...] = DEFAULT_GAMMAS
    target_of: TargetOf = TargetOf.SKIPPABLE
    method: Method = "frontier"
    modalities: tuple[str, ...] | None = None
    tied: bool = False
    max_evaluations: int | None = None
    batch_size: int = 16  # samples per forward, when the search encodes the samples itself

    def __post_init__(self) -> None:
        object.__setattr__(self, "gammas", tuple(float(g) for g in self.gammas))
        object.__setattr__(self, "target_of", TargetOf.parse(self.target_of))
        if self.modalities is not None:
            object.__setattr__(self, "modalities", tuple(self.modalities))
        if not self.gammas:
            raise UsageError("gammas must name at least one exponent (1.0: MoDES's own alphas)")
        if not all(math.isfinite(g) and g >= 0 for g in self.gammas):
            raise UsageError(f"gammas must be finite and >= 0, got {self.gammas}")
        if self.method not in ("frontier", "exhaustive"):
            raise UsageError(f"method must be 'frontier' or 'exhaustive', not {self.method!r}")

    def with_options(self, **options: Any) -> SearchConfig:
        """A copy with ``options`` (field names) changed; an unknown name is refused by name."""
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown search options {unknown}; SearchConfig fields are {_field_names()}")
        return dataclasses.replace(self, **options)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(SearchConfig)]


@dataclass(frozen=True)
class SearchPoint:
    index: Index
    thresholds: dict[str, float]
    f: float  # mean KL(p_orig || p_skip) over calibration answer tokens
    ratios: SkipRatios  # skip ratio of the skippable and of all calibration slots (algorithm.md 3)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": list(self.index),
            "thresholds": self.thresholds,
            "f": self.f,
            **self.ratios.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchPoint:
        return cls(tuple(data["index"]), data["thresholds"], data["f"], SkipRatios.from_json(data))


@dataclass
class SearchResult:
    plan: SkipPlan
    best: SearchPoint
    frontier: list[SearchPoint]
    points: list[SearchPoint]
    evaluations: int  # points computed by this call (cached ones excluded)
    grid: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "best": self.best.to_json(),
            "frontier": [p.to_json() for p in self.frontier],
            "points": [p.to_json() for p in self.points],
            "evaluations": self.evaluations,
            "grid": self.grid,
            "plan": self.plan.to_json(),
        }


# -- the walks, on an abstract evaluate(index) -> SearchPoint ----------------------------------
def _all_slots(point: SearchPoint) -> float:
    return point.ratios.all


Ratio = Callable[[SearchPoint], float]


def frontier_walk(
    evaluate: Callable[[Index], SearchPoint], size: int, target: float, ratio: Ratio = _all_slots
) -> tuple[SearchPoint, list[SearchPoint]]:
    """Two modalities. For each q, lower p while g(q, p) >= rho; record (q, p + 1) when p moved.

    A point recorded when p did not move at q is dominated by the one recorded at q - 1
    (same p, smaller tau_q, hence no larger f), so it is never evaluated.
    """
    frontier: list[SearchPoint] = []
    p = size - 1
    last_failed: SearchPoint | None = None
    for q in range(size):
        moved = None
        while p >= 0:
            point = evaluate((q, p))
            if ratio(point) < target:
                last_failed = point
                break
            moved, p = point, p - 1
        if moved is not None:
            frontier.append(moved)
        if p < 0:
            break
    if not frontier:
        raise TargetUnreachableError(_unreachable(target, last_failed, ratio))
    return min(frontier, key=lambda point: point.f), frontier


def scan_one(
    evaluate: Callable[[Index], SearchPoint], size: int, target: float, ratio: Ratio = _all_slots
) -> tuple[SearchPoint, list[SearchPoint]]:
    """One modality: the smallest tau with g >= rho, by bisection (g is monotone)."""
    top = evaluate((size - 1,))
    if ratio(top) < target:
        raise TargetUnreachableError(_unreachable(target, top, ratio))
    low, high, best = 0, size - 1, top
    while low < high:
        middle = (low + high) // 2
        point = evaluate((middle,))
        if ratio(point) >= target:
            high, best = middle, point
        else:
            low = middle + 1
    return best, [best]


def exhaustive(
    evaluate: Callable[[Index], SearchPoint], size: int, target: float, dims: int, ratio: Ratio = _all_slots
) -> tuple[SearchPoint, list[SearchPoint]]:
    indices = [()]
    for _ in range(dims):
        indices = [(*i, j) for i in indices for j in range(size)]
    points = [evaluate(i) for i in indices]
    feasible = [p for p in points if ratio(p) >= target]
    if not feasible:
        raise TargetUnreachableError(_unreachable(target, max(points, key=ratio), ratio))
    return min(feasible, key=lambda p: (p.f, -ratio(p))), feasible


def _unreachable(target: float, largest: SearchPoint | None, ratio: Ratio = _all_slots) -> str:
    reached = f"{ratio(largest):.4f} (thresholds {largest.thresholds})" if largest else "nothing"
    return (
        f"target skip ratio {target:.4f} is unreachable: the largest ratio this grid reaches is {reached}; "
        "lower --target or widen the grid (larger x_max or the linear mapping)"
    )


def unreachable_message(target: float, of: TargetOf, corner: SearchPoint) -> str:
    """Why ``target`` cannot be reached when even the grid's largest thresholds (``corner``)
    fall short, naming what caps it and the fix that helps."""
    ratios = corner.ratios
    special_share = 1.0 - ratios.all / ratios.skippable if ratios.skippable else 0.0
    if of is TargetOf.ALL and ratios.skippable >= 1.0 - 1e-9:
        return (
            f"target skip ratio {target:.4f} of all slots is unreachable: special tokens (chat markup, "
            f"media start/end) hold {special_share:.1%} of the slots and are never skipped, so at most "
            f"{ratios.all:.4f} of all slots can be skipped on these samples; give a target of at most "
            "that, or a target of the skippable slots (--target-of skippable, the default)"
        )
    return (
        f"target skip ratio {target:.4f} of the {of} slots is unreachable with this grid: its largest "
        f"thresholds {corner.thresholds} skip {ratios.of(of):.4f} of them "
        f"({ratios.skippable:.4f} of the skippable slots, {ratios.all:.4f} of all); widen the grid "
        "(--grid-x-max auto makes the largest tau skip every skippable slot) or lower --target"
    )


# -- evaluating points on a model, with the resumable cache ------------------------------------
class PointCache:
    """Append-only JSONL of evaluated points, resumable: each search (model, importance, samples,
    grid: its fingerprint) writes a header line with its key, then one line per point it
    evaluates, tagged with that key. Several searches share one file without mixing: targets
    of one run reuse each other's points, the gammas of a tempered search keep their own."""

    def __init__(self, path: str | Path | None, fingerprint: dict[str, Any]):
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint
        self.key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.points: dict[Index, SearchPoint] = {}
        if self.path is None:
            return
        known = self._load() if self.path.exists() else False
        if not known:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"key": self.key, "fingerprint": fingerprint})

    def _load(self) -> bool:
        """This search's points from the file; whether its header is there."""
        known = False
        for line in self.path.read_text().splitlines():
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that point is recomputed
            if data.get("key") != self.key:
                continue  # another search's (or an older format's) line
            if "fingerprint" in data:
                known = True
                continue
            point = SearchPoint.from_json(data)
            self.points[point.index] = point
        return known

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, point: SearchPoint) -> None:
        self.points[point.index] = point
        if self.path is not None:
            self._append({"key": self.key, **point.to_json()})


class PointEvaluator:
    """f and g of one threshold setting: one `measure` of the calibration set under the plan."""

    def __init__(
        self,
        model: Any,
        importance: Importance,
        calibration: CalibrationSet,
        special_ids: list[int],
        budget: int | None,
    ):
        self.model, self.importance, self.calibration = model, importance, calibration
        self.special_ids = special_ids
        self.budget = budget
        self.computed = 0

    def __call__(self, thresholds: dict[str, float]) -> tuple[float, SkipRatios]:
        """(f, the skip ratios)."""
        if self.budget is not None and self.computed >= self.budget:
            raise SearchBudgetError(f"evaluation budget of {self.budget} points used; rerun to resume")
        plan = SkipPlan(
            self.importance.alphas,
            thresholds,
            model=self.importance.model,
            special_token_ids=self.special_ids,
        )
        measured = measure(self.model, self.calibration, plan)
        self.computed += 1
        return measured.mean_kl, measured.ratios


def search(
    model: Any,
    processor: Any,
    samples: Sequence[Sample] | CalibrationSet,
    importance: Importance,
    target: float,
    config: SearchConfig | None = None,
    *,
    cache: str | Path | None = None,
    special_token_ids: Sequence[int] | None = None,
    progress: bool = True,
    **options: Any,
) -> SearchResult:
    """Thresholds that reach skip ratio ``target`` on ``samples`` with the least answer KL.

    ``samples``: the calibration samples, or a `CalibrationSet` built with the importance's
    semantics (its reference log-probs are then reused, not recomputed). ``config``: a
    `SearchConfig`; ``options`` change its fields for this call (``grid=24, gammas=(1.0,)``).

    Tempered GMLG: the scores use alphas ``importance.tempered(gamma)`` (alpha^gamma,
    renormalised) for each gamma of ``config.gammas``, each searched on its own, and the result
    of least calibration KL is kept. gamma = 0 is DMT only (uniform alphas), 1 is MoDES as
    published, so the choice nests both and is made on ``samples`` alone. ``result.evaluations``
    counts the points computed for every gamma. The grid's largest thresholds are evaluated
    first, so an unreachable target fails after one evaluation, naming what caps it. Points go
    to ``cache`` as they are computed: a rerun resumes, and searches for other targets with the
    same importance, samples and grid reuse them.
    """
    config = (config or SearchConfig()).with_options(**options)
    if not 0.0 < target < 1.0:
        raise UsageError(f"target skip ratio must be in (0, 1), got {target}")
    tokenizer = getattr(processor, "tokenizer", processor)
    special_ids = list(special_token_ids or tokenizer.all_special_ids)
    calibration = CalibrationSet.of(model, processor, samples, config.batch_size, importance.semantics)
    results: dict[float, SearchResult] = {}
    budget = config.max_evaluations
    for gamma in config.gammas:
        alphas = importance if gamma == 1 else importance.tempered(gamma)
        results[gamma] = _search_alphas(
            model, calibration, alphas, target, config, cache=cache, budget=budget,
            special_ids=special_ids, progress=progress,
        )  # fmt: skip
        budget = None if budget is None else budget - results[gamma].evaluations
    gamma, best = min(results.items(), key=lambda item: item[1].best.f)
    best.plan.provenance.update(
        tempered_gamma=gamma, calibration_kl_by_gamma={str(g): r.best.f for g, r in results.items()}
    )
    best.evaluations = sum(result.evaluations for result in results.values())
    return best


def _grid_for(grid: GridSpec | int | None, importance: Importance, tied: bool) -> GridSpec:
    """``grid`` itself, or a grid of that size whose largest tau skips every skippable slot."""
    if isinstance(grid, GridSpec):
        return grid
    scores = importance.max_alphas()
    return GridSpec.covering(
        {"text": max(scores.values())} if tied else scores, size=grid or SEARCH_GRID_SIZE
    )


def _search_alphas(
    model: Any,
    calibration: CalibrationSet,
    importance: Importance,
    target: float,
    config: SearchConfig,
    *,
    cache: str | Path | None,
    budget: int | None,
    special_ids: list[int],
    progress: bool,
) -> SearchResult:
    """The frontier search of `search` for one set of alphas."""
    searched = ["text"] if config.tied else list(config.modalities or importance.modalities[:2])
    if not 1 <= len(searched) <= 2:
        raise UsageError(f"search one or two modalities, not {searched}")
    grid = _grid_for(config.grid, importance, config.tied)
    fingerprint = {**_fingerprint(importance, calibration, grid, searched, special_ids), "tied": config.tied}
    group = calibration.group
    store = _shared_cache(group, cache, fingerprint)
    measure_point = PointEvaluator(model, importance, calibration, special_ids, budget)
    thresholds_at = _thresholds_at(importance, grid, searched, config.tied)
    bar = _progress_bar(config.method, grid.size, len(searched), target, progress and group.is_main)

    def evaluate(index: Index) -> SearchPoint:
        if index not in store.points:
            thresholds = thresholds_at(index)
            store.add(SearchPoint(index, thresholds, *measure_point(thresholds)))
        point = store.points[index]
        bar.update(1)
        bar.set_postfix(ratio=f"{point.ratios.of(config.target_of):.3f}", kl=f"{point.f:.4f}")
        return point

    try:
        best, frontier = _walk(config.method, evaluate, grid.size, len(searched), target, config.target_of)
    finally:
        bar.close()
    provenance = {
        "method": config.method,
        "grid": grid.to_json(),
        "samples": len(calibration.samples),
        "calibration_kl": best.f,
        **best.ratios.to_json(),
        "alpha_mode": importance.mode,
        "semantics": importance.semantics,  # the KL positions of calibration and of f
        "evaluations": len(store.points),
        "tied_thresholds": config.tied,
    }
    plan = SkipPlan(
        importance.alphas,
        best.thresholds,
        model=importance.model,
        target_ratio=target,
        target_of=config.target_of,
        achieved_ratio=best.ratios.of(config.target_of),
        special_token_ids=special_ids,
        provenance=provenance,
    )
    points = sorted(store.points.values(), key=lambda p: p.index)
    grids = {m: grid.taus(m) for m in searched}
    return SearchResult(plan, best, frontier, points, measure_point.computed, grids)


def _shared_cache(group: Ranks, path: str | Path | None, fingerprint: dict[str, Any]) -> PointCache:
    """Rank 0's cache (it alone reads and writes the file); the other ranks hold its points."""
    main: list[PointCache] = []

    def open_on_main() -> dict[Index, SearchPoint]:
        main.append(PointCache(path, fingerprint))
        return main[0].points

    points = group.broadcast(open_on_main)  # a refused cache is refused on every rank
    if group.is_main:
        return main[0]
    store = PointCache(None, fingerprint)
    store.points = dict(points)
    return store


def _thresholds_at(
    importance: Importance, grid: GridSpec, searched: list[str], tied: bool
) -> Callable[[Index], dict[str, float]]:
    """Grid position -> thresholds of every calibrated modality (those not searched stay 0)."""
    taus = {m: grid.taus(m) for m in searched}
    others = {m: 0.0 for m in importance.modalities if m not in searched}  # never skipped

    def thresholds_at(index: Index) -> dict[str, float]:
        if tied:
            return dict.fromkeys(importance.modalities, taus["text"][index[0]])
        return {**others, **{m: taus[m][i] for m, i in zip(searched, index, strict=True)}}

    return thresholds_at


def _progress_bar(method: str, size: int, dims: int, target: float, progress: bool) -> tqdm:
    """A bar whose total is the most points the walk can visit (it usually stops sooner)."""
    walked = 2 * size + 1 if dims == 2 else size.bit_length() + 1  # + 1: the ceiling check
    total = size**dims if method == "exhaustive" else walked
    return tqdm(
        total=total, desc=f"search {target:.2f} ({method}, at most)", unit="point", disable=not progress
    )


def _walk(
    method: str,
    evaluate: Callable[[Index], SearchPoint],
    size: int,
    dims: int,
    target: float,
    target_of: TargetOf,
) -> tuple[SearchPoint, list[SearchPoint]]:
    """The ceiling first (one evaluation at the largest thresholds), then the walk ``method``."""

    def ratio(point: SearchPoint) -> float:
        return point.ratios.of(target_of)

    corner = evaluate((size - 1,) * dims)
    if ratio(corner) < target:
        raise TargetUnreachableError(unreachable_message(target, target_of, corner))
    if method == "exhaustive":
        return exhaustive(evaluate, size, target, dims, ratio)
    if dims == 1:
        return scan_one(evaluate, size, target, ratio)
    return frontier_walk(evaluate, size, target, ratio)


def _fingerprint(
    importance: Importance, calibration: CalibrationSet, grid: GridSpec, searched, special_ids
) -> dict[str, Any]:
    alphas = json.dumps({str(k): v for k, v in sorted(importance.alphas.items())}, sort_keys=True)
    return {
        "model": importance.model.to_json(),
        "alphas_sha256": hashlib.sha256(alphas.encode()).hexdigest(),
        "samples_sha256": calibration.fingerprint,
        "grid": grid.to_json(),
        "modalities": list(searched),
        "special_ids": sorted(special_ids),
        "semantics": importance.semantics,
        "cache_format": 4,  # keyed lines; points carry both skip ratios by name
    }
