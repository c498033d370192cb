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

from modes.bundled.benchmark import Sample
from modes.calibration.importance import Importance
from modes.calibration.kl import CalibrationBatch, answer_kl, answer_logprobs, prepare_batches
from modes.engine import patch as engine
from modes.plan import SkipPlan
from modes.search.grid import GridSpec

__all__ = [
    "SearchBudgetError",
    "SearchPoint",
    "SearchResult",
    "TargetUnreachableError",
    "frontier_walk",
    "search",
]

Index = tuple[int, ...]  # 0-based grid position per searched modality


class TargetUnreachableError(ValueError):
    """Even the largest thresholds of the grid skip less than the target ratio."""


class SearchBudgetError(RuntimeError):
    """The evaluation budget ran out; rerun with the same cache to resume."""


@dataclass(frozen=True)
class SearchPoint:
    index: Index
    thresholds: dict[str, float]
    f: float  # mean KL(p_orig || p_skip) over calibration answer tokens
    g: float  # skip ratio over all non-padding calibration tokens

    def to_json(self) -> dict[str, Any]:
        return {"index": list(self.index), "thresholds": self.thresholds, "f": self.f, "g": self.g}


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
def frontier_walk(
    evaluate: Callable[[Index], SearchPoint], size: int, target: float
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
            if point.g < target:
                last_failed = point
                break
            moved, p = point, p - 1
        if moved is not None:
            frontier.append(moved)
        if p < 0:
            break
    if not frontier:
        raise TargetUnreachableError(_unreachable(target, last_failed))
    return min(frontier, key=lambda point: point.f), frontier


def scan_one(
    evaluate: Callable[[Index], SearchPoint], size: int, target: float
) -> tuple[SearchPoint, list[SearchPoint]]:
    """One modality: the smallest tau with g >= rho, by bisection (g is monotone)."""
    top = evaluate((size - 1,))
    if top.g < target:
        raise TargetUnreachableError(_unreachable(target, top))
    low, high, best = 0, size - 1, top
    while low < high:
        middle = (low + high) // 2
        point = evaluate((middle,))
        if point.g >= target:
            high, best = middle, point
        else:
            low = middle + 1
    return best, [best]


def exhaustive(
    evaluate: Callable[[Index], SearchPoint], size: int, target: float, dims: int
) -> tuple[SearchPoint, list[SearchPoint]]:
    indices = [()]
    for _ in range(dims):
        indices = [(*i, j) for i in indices for j in range(size)]
    points = [evaluate(i) for i in indices]
    feasible = [p for p in points if p.g >= target]
    if not feasible:
        raise TargetUnreachableError(_unreachable(target, max(points, key=lambda p: p.g)))
    return min(feasible, key=lambda p: (p.f, -p.g)), feasible


def _unreachable(target: float, largest: SearchPoint | None) -> str:
    reached = f"{largest.g:.4f} (thresholds {largest.thresholds})" if largest else "nothing"
    return (
        f"target skip ratio {target:.4f} is unreachable: the largest ratio this grid reaches is {reached}; "
        "lower --target or widen the grid (larger x_max or the linear mapping)"
    )


# -- evaluating points on a model, with the resumable cache ------------------------------------
class PointCache:
    """Append-only JSONL: a header with the search fingerprint, then one evaluated point per line."""

    def __init__(self, path: str | Path | None, fingerprint: dict[str, Any]):
        self.path = Path(path) if path else None
        self.fingerprint = fingerprint
        self.points: dict[Index, SearchPoint] = {}
        if self.path is not None and self.path.exists() and self.path.stat().st_size:
            self._load()
        elif self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"fingerprint": fingerprint})

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        header = json.loads(lines[0]) if lines else {}
        if header.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"search cache {self.path} was written by a search with other arguments "
                "(model, importance, samples or grid); delete it or pass another --cache"
            )
        for line in lines[1:]:
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that point is recomputed
            point = SearchPoint(tuple(data["index"]), data["thresholds"], data["f"], data["g"])
            self.points[point.index] = point

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, point: SearchPoint) -> None:
        self.points[point.index] = point
        if self.path is not None:
            self._append(point.to_json())


class PointEvaluator:
    """f and g of one threshold setting from a single pass over the calibration batches."""

    def __init__(
        self, model, importance: Importance, batches: list[CalibrationBatch], special_ids, budget: int | None
    ):
        self.model, self.importance, self.batches = model, importance, batches
        self.special_ids = special_ids
        self.budget = budget
        self.computed = 0

    @torch.no_grad()
    def __call__(self, thresholds: dict[str, float]) -> tuple[float, float]:
        if self.budget is not None and self.computed >= self.budget:
            raise SearchBudgetError(f"evaluation budget of {self.budget} points used; rerun to resume")
        plan = SkipPlan(importance=self.importance.alphas, thresholds=thresholds, model=self.importance.model)
        engine.apply(self.model, plan, self.special_ids)
        try:
            kl = sum(float(answer_kl(self.model, batch)) for batch in self.batches)
            ratio = engine.skip_stats(self.model)["ratio"]
        finally:
            engine.remove(self.model)
        self.computed += 1
        return kl / sum(b.answer_tokens for b in self.batches), ratio


def search(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    importance: Importance,
    target: float,
    grid: GridSpec | None = None,
    method: Literal["frontier", "exhaustive"] = "frontier",
    modalities: Sequence[str] | None = None,
    cache: str | Path | None = None,
    batch_size: int = 16,
    max_evaluations: int | None = None,
    special_token_ids: Sequence[int] | None = None,
    tied: bool = False,
    progress: bool = True,
) -> SearchResult:
    """Thresholds that reach skip ratio ``target`` on ``samples`` with the least answer KL.

    ``tied=True`` searches one threshold shared by every modality (the single-tau ablations).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target skip ratio must be in (0, 1), got {target}")
    grid = grid or GridSpec()
    searched = ["text"] if tied else list(modalities or importance.modalities[:2])
    if not 1 <= len(searched) <= 2:
        raise ValueError(f"search one or two modalities, not {searched}")
    taus = {m: grid.taus(m) for m in searched}
    tokenizer = getattr(processor, "tokenizer", processor)
    special_ids = list(special_token_ids or tokenizer.all_special_ids)
    device = next(model.parameters()).device
    batches = prepare_batches(processor, samples, batch_size, device)
    with torch.no_grad():
        for batch in batches:
            batch.reference_logprobs = answer_logprobs(model, batch)
    fingerprint = {**_fingerprint(importance, samples, grid, searched, special_ids), "tied": tied}
    store = PointCache(cache, fingerprint)
    measure = PointEvaluator(model, importance, batches, special_ids, max_evaluations)
    others = {m: 0.0 for m in importance.modalities if m not in searched}  # never skipped

    def thresholds_at(index: Index) -> dict[str, float]:
        if tied:
            return dict.fromkeys(importance.modalities, taus["text"][index[0]])
        return {**others, **{m: taus[m][i] for m, i in zip(searched, index, strict=True)}}

    bar = tqdm(desc=f"search ({method})", unit="point", disable=not progress)

    def evaluate(index: Index) -> SearchPoint:
        if index in store.points:
            return store.points[index]
        thresholds = thresholds_at(index)
        f, g = measure(thresholds)
        point = SearchPoint(index, thresholds, f, g)
        store.add(point)
        bar.update(1)
        bar.set_postfix(g=f"{g:.3f}", f=f"{f:.4f}")
        return point

    try:
        if method == "exhaustive":
            best, frontier = exhaustive(evaluate, grid.size, target, len(searched))
        elif len(searched) == 1:
            best, frontier = scan_one(evaluate, grid.size, target)
        else:
            best, frontier = frontier_walk(evaluate, grid.size, target)
    finally:
        bar.close()
    plan = SkipPlan(
        importance=importance.alphas,
        thresholds=best.thresholds,
        model=importance.model,
        target_ratio=target,
        achieved_ratio=best.g,
        provenance={
            "method": method,
            "grid": grid.to_json(),
            "samples": len(samples),
            "calibration_kl": best.f,
            "alpha_mode": importance.mode,
            "evaluations": len(store.points),
            "tied_thresholds": tied,
        },
    )
    return SearchResult(
        plan, best, frontier, sorted(store.points.values(), key=lambda p: p.index), measure.computed, taus
    )


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
    }
