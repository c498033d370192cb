"""What glibc's default allocator costs transformers' default experts call, and why the other
benchmarks keep freed memory.

    python benchmarks/page_faults.py [--out benchmarks/results/page_faults.json]

One Qwen3-VL-30B-A3B-shaped experts module (fp32), its default call on 512 and 2048 tokens, in
child processes under glibc's defaults and keeping freed memory
(`modes.evaluation.allocator.retain_freed_memory`), alternating, 3 of each (medians over them).
Each process times the call cold (64 MB read before it), medians of 5 after one warm-up, with
nothing else held, then with oneDNN-packed copies of the weights resident
(``execution="packed"``), and again after freeing them; minor page faults per call alongside.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from modes.engine.packed import PackedExperts
from modes.evaluation.allocator import RETAINED, SYSTEM_DEFAULT, choose_allocator, minor_page_faults

sys.path.insert(0, str(Path(__file__).parent))
from moe_block import FLUSH_BYTES, SHAPES, build_experts, routing

CALLS = 5
CONDITIONS = ("alone", "packed_copies_resident", "packed_copies_freed")


def _time_calls(experts: torch.nn.Module, draw: tuple[torch.Tensor, ...]) -> dict[str, float]:
    flush = torch.ones(FLUSH_BYTES // 4)
    times, faults = [], []
    for _ in range(CALLS + 1):  # the first is warm-up
        flush.sum()
        before, start = minor_page_faults(), time.perf_counter()
        experts(*draw)
        times.append(time.perf_counter() - start)
        faults.append(minor_page_faults() - before)
    return {"ms": round(statistics.median(times[1:]) * 1e3, 1), "minor_faults": statistics.median(faults[1:])}


@torch.no_grad()
def measure(retain: bool, tokens: int) -> dict:
    """One process's figures: the default call alone, beside packed copies, after freeing them."""
    result = {"allocator": choose_allocator(system_malloc=not retain), "tokens": tokens}  # first
    shape = SHAPES["qwen3-vl-30b-a3b"]
    experts = build_experts(shape, torch.float32)
    draw = routing(tokens, shape, torch.float32, torch.Generator().manual_seed(0))
    result["alone"] = _time_calls(experts, draw)
    packs = PackedExperts(experts)
    result["packed_copies_resident"] = _time_calls(experts, draw)
    del packs
    gc.collect()
    result["packed_copies_freed"] = _time_calls(experts, draw)
    return result


def _medians(results: list[dict]) -> list[dict]:
    """Per token count, allocator and condition: medians over the processes."""
    summary = []
    for tokens in sorted({r["tokens"] for r in results}):
        for allocator in (SYSTEM_DEFAULT, RETAINED):
            runs = [r for r in results if r["tokens"] == tokens and r["allocator"] == allocator]
            row = {"tokens": tokens, "allocator": allocator, "processes": len(runs)}
            for condition in CONDITIONS:
                row[condition] = {
                    key: statistics.median(r[condition][key] for r in runs) for key in ("ms", "minor_faults")
                }
            summary.append(row)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/page_faults.json")
    parser.add_argument("--processes", type=int, default=3, help="processes per allocator and size")
    parser.add_argument("--child", nargs=2, metavar=("RETAIN", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0] == "1", int(args.child[1]))))
        return
    results = []
    for tokens in (512, 2048):
        for _ in range(args.processes):  # a process per allocator (it cannot be switched back),
            for retain in ("0", "1"):  # alternating, since this VM drifts between processes
                command = [sys.executable, __file__, "--child", retain, str(tokens)]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                results.append(json.loads(output.strip().splitlines()[-1]))
                print(results[-1], flush=True)
    summary = _medians(results)
    for row in summary:
        print(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    report = {"threads": torch.get_num_threads(), "summary": summary, "processes": results}
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
