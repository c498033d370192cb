"""Frontier walk: same optimum as the exhaustive grid with at most 2D evaluations; resume."""

from __future__ import annotations

import dataclasses
import random

import pytest

import modes
from modes.calibration import calibrate
from modes.defaults import DEFAULT_GAMMAS
from modes.ratios import SkipRatios
from modes.thresholds import GridSpec, SearchBudgetError, TargetUnreachableError, search
from modes.thresholds.frontier import SearchPoint, exhaustive, frontier_walk, scan_one


def point(index, thresholds, f, g):
    """A point whose ratio of all slots is ``g`` (its ratio of the skippable slots too)."""
    return SearchPoint(index, thresholds, f, SkipRatios(g, g))


def monotone_surface(size: int, seed: int):
    """Random f and g, each non-decreasing in both indices (as the method assumes)."""
    rng = random.Random(seed)
    row = sorted(rng.random() for _ in range(size))
    col = sorted(rng.random() for _ in range(size))
    weight = rng.uniform(0.2, 5)

    def evaluate(index):
        q, p = index
        g = (row[q] + weight * col[p]) / (1 + weight)
        f = row[q] ** 2 + weight**0.5 * col[p] ** 3
        return point(index, {"text": q, "visual": p}, f, g)

    return evaluate


@pytest.mark.parametrize("seed", range(25))
def test_frontier_equals_exhaustive_with_at_most_2d_evaluations(seed):
    size = 12
    surface = monotone_surface(size, seed)
    calls = []

    def counted(index):
        calls.append(index)
        return surface(index)

    lowest, highest = surface((0, 0)).ratios.all, surface((size - 1, size - 1)).ratios.all
    target = random.Random(seed).uniform(lowest, highest)
    best, _ = frontier_walk(counted, size, target)
    reference, _ = exhaustive(surface, size, target, dims=2)
    assert best.index == reference.index
    assert len(set(calls)) <= 2 * size


def test_unreachable_target_says_the_largest_ratio():
    surface = monotone_surface(5, 0)
    largest = surface((4, 4)).ratios.all
    with pytest.raises(TargetUnreachableError, match=f"{largest:.4f}"):
        frontier_walk(surface, 5, largest + 0.01)
    with pytest.raises(TargetUnreachableError):
        scan_one(lambda i: point(i, {"text": i[0]}, 0.0, i[0] / 10), 5, 0.9)


def test_one_modality_bisection_finds_the_smallest_feasible_tau():
    best, _ = scan_one(lambda i: point(i, {"text": i[0]}, i[0], i[0] / 20), 20, 0.5)
    assert best.index == (10,)


@pytest.fixture(scope="module")
def calibrated(small_vlm):
    model, processor = small_vlm
    samples = modes.load_samples(split="calibration", limit=16)
    importance = calibrate(model, processor, samples, batch_size=8, progress=False)
    scores = {m: max(a[m] for a in importance.alphas.values()) for m in importance.modalities}
    return model, processor, samples, importance, GridSpec.covering(scores, size=5)


def test_frontier_and_exhaustive_agree_on_a_model(calibrated):
    model, processor, samples, importance, grid = calibrated
    kwargs = dict(grid=grid, batch_size=8, progress=False, gammas=(1.0,))  # the walk for one set of alphas
    frontier = search(model, processor, samples, importance, 0.5, **kwargs)
    full = search(model, processor, samples, importance, 0.5, method="exhaustive", **kwargs)
    assert frontier.best.index == full.best.index
    assert frontier.evaluations <= 2 * grid.size and full.evaluations == grid.size**2
    assert frontier.plan.achieved_ratio >= 0.5
    assert frontier.plan.thresholds == frontier.best.thresholds


def test_interrupted_search_resumes_without_recomputing(calibrated, tmp_path):
    model, processor, samples, importance, grid = calibrated
    cache = tmp_path / "search.cache.jsonl"
    kwargs = dict(grid=grid, batch_size=8, progress=False, cache=cache)
    with pytest.raises(SearchBudgetError):
        search(model, processor, samples, importance, 0.5, max_evaluations=3, **kwargs)
    assert len(cache.read_text().splitlines()) == 1 + 3
    resumed = search(model, processor, samples, importance, 0.5, **kwargs)
    uninterrupted = search(
        model, processor, samples, importance, 0.5, grid=grid, batch_size=8, progress=False
    )
    assert resumed.evaluations == uninterrupted.evaluations - 3  # across every gamma
    assert resumed.best == uninterrupted.best
    assert resumed.plan == uninterrupted.plan
    again = search(model, processor, samples, importance, 0.5, **kwargs)
    assert again.evaluations == 0
    other = search(model, processor, samples[:8], importance, 0.5, **kwargs)  # its own lines, no mix
    fresh = search(model, processor, samples[:8], importance, 0.5, grid=grid, batch_size=8, progress=False)
    assert other.best == fresh.best and other.evaluations == fresh.evaluations


def test_a_calibration_set_reuses_its_references_and_gives_the_same_search(calibrated):
    """calibrate fills the set's reference log-probs; the search on the set runs no reference
    forward of its own and finds what a search on the bare samples finds."""
    model, processor, samples, importance, grid = calibrated
    calibration = modes.CalibrationSet.build(model, processor, samples, batch_size=8)
    again = calibrate(model, processor, calibration, progress=False)
    assert again.alphas == importance.alphas
    assert set(calibration._references) == {index for index, _ in calibration.mine}
    config = modes.SearchConfig(grid=grid, gammas=(1.0,), batch_size=8)
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        on_set = search(model, processor, calibration, importance, 0.5, config, progress=False)
    finally:
        handle.remove()
    assert len(forwards) == on_set.evaluations * len(calibration.batches)  # no reference forward
    on_samples = search(model, processor, samples, importance, 0.5, config, progress=False)
    assert on_set.best == on_samples.best and on_set.plan == on_samples.plan
    with pytest.raises(ValueError, match="scores the 'modes' positions"):
        search(
            model, processor, calibration, dataclasses.replace(importance, semantics="release"), 0.5, config
        )
    with pytest.raises(TypeError, match="unknown search options \\['grid_size'\\]"):
        search(model, processor, calibration, importance, 0.5, grid_size=5)


def test_tempered_search_keeps_the_gamma_of_least_calibration_kl(calibrated):
    model, processor, samples, importance, grid = calibrated
    kwargs = dict(batch_size=8, progress=False, grid=grid.size)
    tempered = search(model, processor, samples, importance, 0.5, **kwargs)
    by_gamma = tempered.plan.provenance["calibration_kl_by_gamma"]
    assert set(by_gamma) == {str(g) for g in DEFAULT_GAMMAS}
    assert tempered.best.f == min(by_gamma.values())
    gamma = tempered.plan.provenance["tempered_gamma"]
    alone = search(model, processor, samples, importance, 0.5, gammas=(gamma,), **kwargs)
    assert alone.plan.thresholds == tempered.plan.thresholds and alone.best.f == tempered.best.f
    published = search(model, processor, samples, importance, 0.5, gammas=(1.0,), **kwargs)
    assert published.plan.importance == importance.alphas  # gamma 1: MoDES's own alphas, untouched
    assert published.best.f == by_gamma["1.0"] >= tempered.best.f
