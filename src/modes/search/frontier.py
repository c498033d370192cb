"""Frontier search for the per-modality thresholds (algorithm.md section 4).

Minimise f (mean KL at calibration answer tokens) subject to g (skip ratio) >= rho over the
tau grids. With g non-decreasing in each tau and f assumed so, the frontier walk needs at
most 2D evaluations where the exhaustive grid needs D^2, and both return the same pair.
Every evaluated point is appended to a cache file as it completes, so an interrupted search
resumes without recomputing a point.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from modes import engine
from modes.calibration.importance import Importance
from modes.calibration.kl import CalibrationBatch, answer_kl, answer_logprobs, prepare_batches
from modes.data.sample import Sample
from modes.engine import SlotCounts, add_counts, stats_from_counts
from modes.loading import input_device
from modes.parallel import Ranks, ranks
from modes.plan import SkipPlan
from modes.search.grid import GridSpec

__all__ = [
    "DEFAULT_GAMMAS",
    "SearchBudgetError",
    "SearchPoint",
    "SearchResult",
    "TargetUnreachableError",
    "frontier_walk",
    "search",
    "unreachable_message",
]

Index = tuple[int, ...]  # 0-based grid position per searched modality


class TargetUnreachableError(ValueError):
    """Even the largest thresholds of the grid skip less than the target ratio."""


class SearchBudgetError(RuntimeError):
    """The evaluation budget ran out; rerun with the same cache to resume."""


TargetOf = Literal["skippable", "all"]
TARGET_OF: tuple[str, ...] = ("skippable", "all")


@dataclass(frozen=True)
class SearchPoint:
    index: Index
    thresholds: dict[str, float]
    f: float  # mean KL(p_orig || p_skip) over calibration answer tokens
    g: float  # skip ratio over all routed slots of non-padding calibration tokens (algorithm.md 3)
    g_skippable: float | None = None  # the same over the skippable (non-special) tokens' slots

    def ratio(self, of: TargetOf) -> float:
        """The skip ratio a target ``of`` the skippable or of all slots is compared with."""
        return self.g if of == "all" else self.g_skippable

    def to_json(self) -> dict[str, Any]:
        return {
            "index": list(self.index),
            "thresholds": self.thresholds,
            "f": self.f,
            "g": self.g,
            "g_skippable": self.g_skippable,
        }


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
    return point.g


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
    special_share = 1.0 - corner.g / corner.g_skippable if corner.g_skippable else 0.0
    if of == "all" and corner.g_skippable >= 1.0 - 1e-9:
        return (
            f"target skip ratio {target:.4f} of all slots is unreachable: special tokens (chat markup, "
            f"media start/end) hold {special_share:.1%} of the slots and are never skipped, so at most "
            f"{corner.g:.4f} of all slots can be skipped on these samples; give a target of at most "
            "that, or a target of the skippable slots (--target-of skippable, the default)"
        )
    return (
        f"target skip ratio {target:.4f} of the {of} slots is unreachable with this grid: its largest "
        f"thresholds {corner.thresholds} skip {corner.ratio(of):.4f} of them "
        f"({corner.g_skippable:.4f} of the skippable slots, {corner.g:.4f} of all); widen the grid "
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
            point = SearchPoint(
                tuple(data["index"]), data["thresholds"], data["f"], data["g"], data["g_skippable"]
            )
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
    """f and g of one threshold setting from a single pass over the calibration batches, this
    rank's share of them (``batches``: (global index, batch)) combined with the others'."""

    def __init__(
        self,
        model,
        importance: Importance,
        batches: list[tuple[int, CalibrationBatch]],
        answer_tokens: int,
        special_ids,
        budget: int | None,
        group: Ranks,
    ):
        self.model, self.importance, self.batches = model, importance, batches
        self.answer_tokens = answer_tokens
        self.special_ids = special_ids
        self.budget = budget
        self.group = group
        self.computed = 0

    @torch.no_grad()
    def __call__(self, thresholds: dict[str, float]) -> tuple[float, float, float]:
        """(f, g over all slots, g over the skippable slots)."""
        if self.budget is not None and self.computed >= self.budget:
            raise SearchBudgetError(f"evaluation budget of {self.budget} points used; rerun to resume")
        plan = SkipPlan(
            self.importance.alphas,
            thresholds,
            model=self.importance.model,
            special_token_ids=self.special_ids,
        )

        def my_batches() -> dict[int, tuple[float, SlotCounts]]:
            results = {}
            with engine.applied(self.model, plan):
                for index, batch in self.batches:
                    engine.reset_stats(self.model)
                    results[index] = (float(answer_kl(self.model, batch)), engine.slot_counts(self.model))
            return results

        per_batch = self.group.gather(my_batches)  # global batch order: the one-process sum
        kl, counts = 0.0, {}
        for batch_kl, batch_counts in per_batch.values():
            kl += batch_kl
            counts = add_counts(counts, batch_counts)
        stats = stats_from_counts(counts)
        self.computed += 1
        return kl / self.answer_tokens, stats["ratio"], stats["skippable_ratio"]


DEFAULT_GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def search(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    importance: Importance,
    target: float,
    grid: GridSpec | int | None = None,
    method: Literal["frontier", "exhaustive"] = "frontier",
    modalities: Sequence[str] | None = None,
    cache: str | Path | None = None,
    batch_size: int = 16,
    max_evaluations: int | None = None,
    special_token_ids: Sequence[int] | None = None,
    tied: bool = False,
    progress: bool = True,
    target_of: TargetOf = "skippable",
    gammas: Sequence[float] = DEFAULT_GAMMAS,
) -> SearchResult:
    """Thresholds that reach skip ratio ``target`` on ``samples`` with the least answer KL.

    Tempered GMLG: the scores use alphas ``importance.tempered(gamma)`` (alpha^gamma,
    renormalised) for each gamma of ``gammas``, each searched on its own, and the result of
    least calibration KL is kept. gamma = 0 is DMT only (uniform alphas), 1 is MoDES as
    published, so the choice nests both and is made on ``samples`` alone; ``gammas=(1.0,)``
    searches MoDES's own alphas only. ``result.evaluations`` counts the points computed for
    every gamma.

    ``target_of``: ``"skippable"`` (default) reads the target as a share of the slots of
    skippable tokens, like the paper's k' of k experts; ``"all"`` as a share of all slots,
    special tokens (never skipped) included. The grid's largest thresholds are evaluated first,
    so an unreachable target fails after one evaluation, naming what caps it. ``tied=True``
    searches one threshold shared by every modality (the single-tau ablations). ``grid``: a
    `GridSpec`, or the points per modality of a grid (release's sigmoid mapping) whose largest
    tau skips every skippable slot for each gamma, whatever the model's depth (default 100);
    ``GridSpec()`` is the release's own grid, tuned for 48-layer models. Points go to ``cache`` as they are
    computed: a rerun resumes, and searches for other targets with the same importance,
    samples and grid reuse them.
    """
    if not gammas:
        raise ValueError("gammas must name at least one exponent (1.0: MoDES's own alphas)")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target skip ratio must be in (0, 1), got {target}")
    if target_of not in TARGET_OF:
        raise ValueError(f"target_of must be one of {list(TARGET_OF)}, not {target_of!r}")
    tokenizer = getattr(processor, "tokenizer", processor)
    special_ids = list(special_token_ids or tokenizer.all_special_ids)
    data = _CalibrationData.of(
        model, processor, samples, batch_size, importance.semantics
    )  # once: every gamma
    results: dict[float, SearchResult] = {}
    budget = max_evaluations
    for gamma in gammas:
        alphas = importance if gamma == 1 else importance.tempered(gamma)
        results[gamma] = _search_alphas(
            model, samples, data, alphas, target, _grid_for(grid, alphas, tied),
            method, modalities, cache, budget, special_ids, tied, progress, target_of,
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
    return GridSpec.covering({"text": max(scores.values())} if tied else scores, size=grid or 100)


@dataclass
class _CalibrationData:
    """This rank's share of the calibration batches, with the unskipped model's log-probs at
    their KL positions, and the answer tokens of all of them: the same for every gamma."""

    group: Ranks
    mine: list[tuple[int, CalibrationBatch]]
    answer_tokens: int

    @classmethod
    def of(
        cls, model: Any, processor: Any, samples: Sequence[Sample], batch_size: int, semantics: str
    ) -> _CalibrationData:
        group = ranks()
        batches = prepare_batches(processor, samples, batch_size, input_device(model), semantics)
        mine = group.share(batches)
        with torch.no_grad():
            for _, batch in mine:
                batch.reference_logprobs = answer_logprobs(model, batch)
        return cls(group, mine, sum(batch.answer_tokens for batch in batches))


def _search_alphas(
    model: Any,
    samples: Sequence[Sample],
    data: _CalibrationData,
    importance: Importance,
    target: float,
    grid: GridSpec,
    method: Literal["frontier", "exhaustive"],
    modalities: Sequence[str] | None,
    cache: str | Path | None,
    max_evaluations: int | None,
    special_ids: list[int],
    tied: bool,
    progress: bool,
    target_of: TargetOf,
) -> SearchResult:
    """The frontier search of `search` for one set of alphas."""
    searched = ["text"] if tied else list(modalities or importance.modalities[:2])
    if not 1 <= len(searched) <= 2:
        raise ValueError(f"search one or two modalities, not {searched}")
    fingerprint = {**_fingerprint(importance, samples, grid, searched, special_ids), "tied": tied}
    group = data.group
    store = _shared_cache(group, cache, fingerprint)
    measure = PointEvaluator(
        model, importance, data.mine, data.answer_tokens, special_ids, max_evaluations, group
    )
    thresholds_at = _thresholds_at(importance, grid, searched, tied)
    bar = _progress_bar(method, grid.size, len(searched), target, progress and group.is_main)

    def evaluate(index: Index) -> SearchPoint:
        if index not in store.points:
            thresholds = thresholds_at(index)
            store.add(SearchPoint(index, thresholds, *measure(thresholds)))
        point = store.points[index]
        bar.update(1)
        bar.set_postfix(ratio=f"{point.ratio(target_of):.3f}", kl=f"{point.f:.4f}")
        return point

    try:
        best, frontier = _walk(method, evaluate, grid.size, len(searched), target, target_of)
    finally:
        bar.close()
    provenance = {
        "method": method,
        "grid": grid.to_json(),
        "samples": len(samples),
        "calibration_kl": best.f,
        "ratio_of_all_slots": best.g,
        "ratio_of_skippable_slots": best.g_skippable,
        "alpha_mode": importance.mode,
        "semantics": importance.semantics,  # the KL positions of calibration and of f
        "evaluations": len(store.points),
        "tied_thresholds": tied,
    }
    plan = SkipPlan(
        importance.alphas,
        best.thresholds,
        model=importance.model,
        target_ratio=target,
        target_of=target_of,
        achieved_ratio=best.ratio(target_of),
        special_token_ids=special_ids,
        provenance=provenance,
    )
    points = sorted(store.points.values(), key=lambda p: p.index)
    return SearchResult(plan, best, frontier, points, measure.computed, {m: grid.taus(m) for m in searched})


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
        return point.ratio(target_of)

    corner = evaluate((size - 1,) * dims)
    if ratio(corner) < target:
        raise TargetUnreachableError(unreachable_message(target, target_of, corner))
    if method == "exhaustive":
        return exhaustive(evaluate, size, target, dims, ratio)
    if dims == 1:
        return scan_one(evaluate, size, target, ratio)
    return frontier_walk(evaluate, size, target, ratio)


def _fingerprint(
    importance: Importance, samples: Sequence[Sample], grid: GridSpec, searched, special_ids
) -> dict[str, Any]:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.id}\x00{sample.question}\x00{sample.answer}\x00".encode())
    alphas = json.dumps({str(k): v for k, v in sorted(importance.alphas.items())}, sort_keys=True)
    return {
        "model": importance.model.to_json(),
        "alphas_sha256": hashlib.sha256(alphas.encode()).hexdigest(),
        "samples_sha256": digest.hexdigest(),
        "grid": grid.to_json(),
        "modalities": list(searched),
        "special_ids": sorted(special_ids),
        "semantics": importance.semantics,
        "cache_format": 3,  # keyed lines; points carry g over the skippable slots too
    }
