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
    grid = modes.GridSpec.covering(importance.max_alphas(), size=5)
    result = modes.search(
        model,
        processor,
        calibration,
        importance,
        0.5,
        grid=grid,
        batch_size=batch_size,
        cache=cache,
        progress=False,
    )
    report = modes.evaluate(model, processor, test, plan=result.plan, batch_size=batch_size, progress=False)
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
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    group = ranks()
    model, processor = modes.load_model()
    calibration = modes.load_samples(split="calibration", limit=40)
    test = modes.load_samples(split="test", limit=40)
    with_images = [s for s in calibration if s.image is not None][:8]
    results = {
        "world": group.world,
        # 40 mixed samples in batches of 8: an odd number of batches, split unevenly
        "uneven": scenario(model, processor, calibration, test, 8, out / "cache_uneven"),
        # one batch for two ranks: rank 1 has nothing to do
        "empty": scenario(model, processor, with_images, with_images, 16, out / "cache_empty"),
    }
    (out / f"rank{group.rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
