"""Render a block benchmark's JSON (`benchmarks/results/moe_block*.json`) as the Markdown
tables in BENCHMARKS.md: speedups, then the decode loop's and each CPU path's (packed weights,
compiled kernel) kernel gains, and the prefill target against the memory bound.

python benchmarks/table.py [benchmarks/results/moe_block.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (0.0, 0.5, 0.75, 0.88)


def bound(row: dict, prefix: str) -> str:
    """`` [fraction of the attainable speedup]`` where it lies below the ideal: in prefill the
    kernels' one-row-per-expert floor caps it (plain, or with ``prefix`` "packed_" the packed
    loop's), in decode the experts whose weights are read (default hits / hits at r)."""
    attainable = row.get(f"{prefix}attainable", row["ideal"])
    if attainable >= row["ideal"]:
        return ""
    return f" [{row[f'{prefix}fraction_of_attainable']:.0%} of {attainable:.1f}x]"


def cell(row: dict) -> str:
    if row["target_ratio"] == 0.0:
        return f"{row['speedup']:.2f}x"
    text = f"{row['speedup']:.2f}x ({row['fraction_of_ideal']:.0%}) @ {row['ratio']:.2f}"
    return text + bound(row, "")


def loop_table(results: list[dict], ratio: float = 0.88) -> None:
    """Decode cases: the kernels' own gain (modes' loop with nothing skipped vs the default) and
    the speedup at ``ratio`` against each, so skipping's share of the speedup stands apart."""
    print("| shape | dtype | tokens | default ms | modes loop, every slot kept, ms | kernel gain "
          f"| r = {ratio}: vs default | vs the loop, every slot kept |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        if not result.get("loop_every_slot_ms"):
            continue
        row = next(row for row in result["rows"] if row["target_ratio"] == ratio)
        over_loop, loop_ms = row["speedup_over_loop"], result["loop_every_slot_ms"]
        print(f"| {result['shape']} | {result['dtype']} | {result['tokens']} | {result['default_ms']:.2f} "
              f"| {loop_ms:.2f} | {result['loop_gain']:.2f}x "
              f"| {row['speedup']:.2f}x ({row['fraction_of_ideal']:.0%}) @ {row['ratio']:.2f} "
              f"| {over_loop:.2f}x ({over_loop / row['ideal']:.0%}) |")  # fmt: skip


PATH_TITLES = {
    "packed": "With oneDNN-packed expert weights (`execution='packed'`)",
    "compiled": "On modes' compiled kernel (`execution='compiled'`)",
}


def path_cell(row: dict, path: str) -> str:
    over_loop = row[f"{path}_speedup_over_{path}_loop"]
    text = (
        f"{row[f'{path}_speedup']:.2f}x ({row[f'{path}_fraction_of_ideal']:.0%}); "
        f"{over_loop:.2f}x ({row[f'{path}_fraction_of_ideal_over_{path}_loop']:.0%})"
    )
    return text + bound(row, f"{path}_")


def path_table(results: list[dict], path: str) -> None:
    """A CPU path (``packed`` or ``compiled``): speedup over the default at each ratio (fraction
    of ideal), and the path's loop's own gain with nothing skipped, so skipping's share stands apart."""
    columns = [c for c in COLUMNS if c > 0]
    print(f"{PATH_TITLES[path]}:")
    print()
    print(f"| shape | dtype | tokens | {path} loop, every slot kept: gain | "
          + " | ".join(f"r = {c}: vs default; vs {path} loop" for c in columns) + " |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * len(columns))
    for result in results:
        if path not in result.get("cpu_paths", ()):
            continue
        rows = {row["target_ratio"]: row for row in result["rows"]}
        cells = " | ".join(path_cell(rows[c], path) for c in columns)
        print(f"| {result['shape']} | {result['dtype']} | {result['tokens']} "
              f"| {result[f'{path}_loop_gain']:.2f}x | {cells} |")  # fmt: skip


def memory_table(results: list[dict], ratio: float = 0.88, target: float = 0.9) -> None:
    """Prefill cases: the issue's target (``target`` of the ideal at ``ratio``) against the
    memory bound (default / the time to read every expert weight once), which no execution of
    the kept rows can beat while every expert keeps some, and the best speedup measured."""
    print(f"| shape | dtype | tokens | ideal at r = {ratio} | target ({target:.0%}) | memory bound "
          "| measured: default path | packed | compiled | target within the memory bound |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        if not result.get("memory_bound"):
            continue
        row = next(row for row in result["rows"] if row["target_ratio"] == ratio)
        goal, bound_ = target * row["ideal"], result["memory_bound"]
        print(f"| {result['shape']} | {result['dtype']} | {result['tokens']} | {row['ideal']:.1f}x "
              f"| {goal:.1f}x | {bound_:.1f}x | {row['speedup']:.2f}x | {_speedup(row, 'packed')} "
              f"| {_speedup(row, 'compiled')} "
              f"| {'yes' if goal <= bound_ else 'no'} |")  # fmt: skip


def _speedup(row: dict, path: str) -> str:
    return f"{row[f'{path}_speedup']:.2f}x" if f"{path}_speedup" in row else "-"


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/moe_block.json")
    data = json.loads(path.read_text())
    print("| shape | dtype | tokens | default ms | " + " | ".join(f"r = {c}" for c in COLUMNS) + " |")
    print("|---|---|---|---|" + "---|" * len(COLUMNS))
    for result in data["results"]:
        rows = {row["target_ratio"]: row for row in result["rows"]}
        cells = " | ".join(cell(rows[c]) for c in COLUMNS)
        head = f"| {result['shape']} | {result['dtype']} | {result['tokens']} | {result['default_ms']:.1f}"
        print(f"{head} | {cells} |")
    if any(result.get("loop_every_slot_ms") for result in data["results"]):
        print()
        loop_table(data["results"])
    for path in PATH_TITLES:
        if any(path in result.get("cpu_paths", ()) for result in data["results"]):
            print()
            path_table(data["results"], path)
    if any(result.get("memory_bound") for result in data["results"]):
        print()
        memory_table(data["results"])


if __name__ == "__main__":
    main()
