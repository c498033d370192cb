"""Calibration and search on the bundled model: one process vs two ranks under torchrun.

    python benchmarks/distributed.py [--samples 256] [--repeats 3]

Both configurations get the same two cores: one process with two threads, or two gloo ranks
with one thread each. Runs alternate round by round, so drift hits both; each time is the
wall time of the whole command (start-up and model loading included, as a user sees it),
median over the rounds. The outputs of the two configurations are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host import cpu_name

COMMANDS = {
    "calibrate": ["calibrate", "--samples", "{samples}", "--out", "{dir}/importance.json"],
    "search": [
        "search",
        "--samples",
        "{samples}",
        "--importance",
        "{importance}",
        "--target",
        "0.75",
        "--grid-size",
        "24",
        "--out",
        "{dir}/plan.json",
    ],
}
LAUNCHERS = {
    "1 process x 2 threads": ([sys.executable, "-m", "modes"], "2"),
    "2 ranks x 1 thread": (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "modes",
        ],
        "1",
    ),
}


def run(launcher: str, command: str, samples: int, importance: Path, out: Path) -> float:
    prefix, threads = LAUNCHERS[launcher]
    args = [a.format(samples=samples, dir=out, importance=importance) for a in COMMANDS[command]]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    start = time.perf_counter()
    subprocess.run([*prefix, *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/distributed.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    importance = work / "importance.json"  # the search reads one importance file in every run
    run("1 process x 2 threads", "calibrate", args.samples, importance, work.joinpath("seed").resolve())
    (work / "seed" / "importance.json").rename(importance)
    times: dict[str, dict[str, list[float]]] = {c: {name: [] for name in LAUNCHERS} for c in COMMANDS}
    outputs: dict[str, dict[str, str]] = {c: {} for c in COMMANDS}
    for round_number in range(args.repeats):
        for command in COMMANDS:
            for launcher in LAUNCHERS:
                out = work / f"{command}-{round_number}-{launcher.split()[0]}"
                times[command][launcher].append(run(launcher, command, args.samples, importance, out))
                result = out / ("importance.json" if command == "calibrate" else "plan.json")
                data = json.loads(result.read_text())
                key = "alphas" if command == "calibrate" else "policy"
                outputs[command].setdefault(launcher, json.dumps(data[key], sort_keys=True))
    rows = []
    for command, by_launcher in times.items():
        one, two = (statistics.median(by_launcher[name]) for name in LAUNCHERS)
        same = len(set(outputs[command].values())) == 1
        row = {"command": command, "one_process_s": one, "two_ranks_s": two, "speedup": one / two}
        rows.append({**row, "identical_output": same})
        print(
            f"{command:10s} 1 process {one:6.1f} s, 2 ranks {two:6.1f} s: {one / two:.2f}x, identical: {same}"
        )
    machine = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    report = {"machine": machine, "samples": args.samples, "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
