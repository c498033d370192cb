"""Calibration with prefix replay vs the plain per-layer full forward, side by side.

    python benchmarks/calibration.py [--samples 64] [--repeats 3]

Both runs calibrate the bundled model on the same samples; the script reports the median
wall time of each, the speedup, and the largest relative difference between their raw KL
values (they must agree to 1e-5).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import modes
from modes.calibration import calibrate


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/calibration.json")
    args = parser.parse_args()
    model, processor = modes.load_model()
    samples = modes.load_samples(split="calibration", limit=args.samples)
    run = lambda reuse: calibrate(  # noqa: E731
        model, processor, samples, batch_size=args.batch_size, reuse_prefix=reuse, progress=False
    )
    run(True)  # warm-up
    replay_s, replayed = timed(lambda: run(True), args.repeats)
    plain_s, plain = timed(lambda: run(False), args.repeats)
    worst = max(
        abs(replayed.raw_kl[layer][m] - value) / max(abs(value), 1e-30)
        for layer, by_modality in plain.raw_kl.items()
        for m, value in by_modality.items()
        if value > 0
    )
    result = {
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "samples": args.samples,
        "moe_layers": len(plain.alphas),
        "plain_seconds": round(plain_s, 3),
        "replay_seconds": round(replay_s, 3),
        "speedup": round(plain_s / replay_s, 3),
        "max_relative_difference": worst,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
