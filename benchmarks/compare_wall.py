"""`modes compare` wall time of two source trees side by side, and whether their outputs agree.

    git worktree add /tmp/before REV
    python benchmarks/compare_wall.py --before /tmp/before/src [--calibration-samples 64 --test-samples 220]

Both runs start together, one process and one torch thread each (the two cores shared evenly),
every method at targets 0.63 / 0.75 / 0.88; wall time includes start-up and model loading, as a
user sees it. The rows (plans included) of the two compare.json files are then compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def start(name: str, source: str | None, out: Path, options: list[str]) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if source:
        env["PYTHONPATH"] = source
    command = [sys.executable, "-m", "modes", "compare", *options, "--out", str(out / name / "compare.json")]
    log = (out / f"{name}.log").open("w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter()


def rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="src/ of the tree to compare against")
    parser.add_argument("--calibration-samples", default="64")
    parser.add_argument("--test-samples", default="220")
    parser.add_argument("--work", default="runs/compare_wall")
    parser.add_argument("--out", default="benchmarks/results/compare_wall.json")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    options = ["--targets", "0.63,0.75,0.88", "--calibration-samples", args.calibration_samples]
    options += ["--test-samples", args.test_samples]
    runs = {
        "before": start("before", args.before, work, options),
        "after": start("after", None, work, options),
    }
    walls = {}
    for name, (process, started) in runs.items():
        if process.wait() != 0:
            raise SystemExit(f"{name} failed: see {work / name}.log")
        walls[name] = time.perf_counter() - started
    same = rows(work / "before" / "compare.json") == rows(work / "after" / "compare.json")
    result = {
        "options": options,
        "wall_s": walls,
        "speedup": walls["before"] / walls["after"],
        "rows_identical": same,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    before, after = walls["before"], walls["after"]
    print(f"before {before:.0f} s, after {after:.0f} s ({result['speedup']:.2f}x); rows identical: {same}")


if __name__ == "__main__":
    main()
