"""Calibrate, search and evaluate on the bundled model, each result written as JSON: run alone
(the reference) or under torchrun, where every rank writes its own file.

    python pipeline.py OUT            # one process
    torchrun --standalone --nproc_per_node 2 pipeline.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import modes
from modes.parallel import ranks


def scenario(model, processor, calibration, test, batch_size: int, cache: Path) -> dict:
    importance = modes.calibrate(model, processor, calibration, batch_size=batch_size, progress=False)
    options = dict(grid=5, batch_size=batch_size, cache=cache, progress=False, gammas=(0.5, 1.0))
    result = modes.search(model, processor, calibration, importance, 0.5, **options)
    report = modes.evaluate(model, processor, test, plan=result.plan, batch_size=batch_size, progress=False)
    methods = ["modes", "naee", "k_reduction"]
    compared = modes.compare(
        model, processor, calibration, test, importance, [0.5], methods, grid_size=4, batch_size=batch_size,
        progress=False,
    )  # fmt: skip
    return {
        "alphas": {str(k): v for k, v in importance.alphas.items()},
        "raw_kl": {str(k): v for k, v in importance.raw_kl.items()},
        "answer_tokens": importance.answer_tokens,
        "thresholds": result.plan.thresholds,
        "frontier": [p.to_json() for p in result.frontier],
        "points": [p.to_json() for p in result.points],
        "evaluations": result.evaluations,
        "accuracy": report["accuracy"],
        "skip_ratio": report["skip_ratio"],
        "skip_stats": report["skip_stats"],
        "answers": report["answers"],
        "compare": [
            {k: v for k, v in row.items() if k != "plan"} | {"policy": row["plan"]["policy"]}
            for row in compared["rows"]
        ],
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    group = ranks()
    model, processor = modes.load_model()
    calibration = modes.load_samples(split="calibration", limit=64)
    test = modes.load_samples(split="test", limit=40)
    with_images = [s for s in calibration if s.image is not None][:8]
    results = {
        "world": group.world,
        # 64 mixed samples in batches of 10: 7 batches, split unevenly (4 and 3)
        "uneven": scenario(model, processor, calibration, test, 10, out / "cache_uneven"),
        # one batch for two ranks: rank 1 has nothing to do
        "empty": scenario(model, processor, with_images, with_images, 16, out / "cache_empty"),
    }
    (out / f"rank{group.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
