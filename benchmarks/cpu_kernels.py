"""How fast this CPU's matmul kernels stream expert weights, against what the memory delivers.

    python benchmarks/cpu_kernels.py [--out benchmarks/results/cpu_kernels.json]

All 128 experts of a Qwen3-VL-30B-A3B layer, stored as transformers stores them ([E, out, in],
gate_up and down side by side as one [2304, 2048] matrix per expert, 1.2 GB in bf16), are
streamed once per timed pass, cold (the set is 37 times the L3): by `read_once` (what the
memory delivers), and by ``F.linear`` on M rows per expert with oneDNN enabled (what matmul
picks by default) and disabled (ATen's own kernels), by oneDNN on weights packed once
(``execution="packed"``), and by modes' compiled kernel in one call over all
experts (``execution="compiled"``, where it builds). The passes are interleaved round by round;
medians after one warm-up round; the process keeps the memory it frees (`choose_allocator`).
This explains the block benchmark: the bf16 GEMV choice of modes' expert loop, why prefill with
a few kept rows per expert falls short of the ideal speedup on oneDNN (its kernels, not the
memory, bound it), and what the compiled kernel changes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from modes.engine.kernels import KERNEL_DTYPES, KernelUnavailableError, grouped_rows_linear, load_kernel
from modes.engine.packed import pack_weight, packed_linear
from modes.evaluation.allocator import choose_allocator
from modes.evaluation.bench import read_once

EXPERTS, OUT, IN = 128, 2304, 2048  # Qwen3-VL-30B-A3B: 2 x 768 gate_up + 768 down, hidden 2048
ROWS = (1, 2, 4, 8, 16)


def _passes(weights: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Label -> one pass over every expert's weights, plain and on packed copies made once."""
    inputs = {m: torch.randn(m, IN).to(weights.dtype) for m in ROWS}
    packed_weights = [pack_weight(weight) for weight in weights]

    def linear(rows: int, onednn: bool) -> Callable[[], object]:
        def run() -> None:
            torch.backends.mkldnn.enabled = onednn
            try:
                for expert in range(EXPERTS):
                    F.linear(inputs[rows], weights[expert])  # [M, IN] x [OUT, IN]^T
            finally:
                torch.backends.mkldnn.enabled = True

        return run

    def packed(rows: int) -> Callable[[], object]:
        def run() -> None:
            for weight in packed_weights:
                packed_linear(inputs[rows], weight)

        return run

    def compiled(rows: int) -> Callable[[], object]:
        grouped = inputs[rows].repeat(EXPERTS, 1)  # [E * M, IN], grouped by expert
        starts, experts = torch.arange(0, EXPERTS * rows + 1, rows), torch.arange(EXPERTS)
        return lambda: grouped_rows_linear(grouped, weights, starts, experts)  # one call, all experts

    has_kernel = _kernel_runs(weights.dtype)
    passes: dict[str, Callable[[], object]] = {"sum": lambda: read_once([weights])}
    for rows in ROWS:
        passes[f"M={rows} oneDNN"] = linear(rows, onednn=True)
        passes[f"M={rows} ATen"] = linear(rows, onednn=False)
        passes[f"M={rows} packed"] = packed(rows)
        if has_kernel:
            passes[f"M={rows} compiled"] = compiled(rows)
    return passes


def _kernel_runs(dtype: torch.dtype) -> bool:
    """Whether modes' compiled kernel builds here and runs ``dtype`` (else its passes are left out)."""
    try:
        load_kernel()
        return dtype in KERNEL_DTYPES
    except KernelUnavailableError as reason:
        print(f"  (no compiled passes: {reason})")
        return False


def measure(dtype: torch.dtype, rounds: int) -> dict:
    """Each round runs every pass once, starting one pass further along than the last."""
    weights = torch.randn(EXPERTS, OUT, IN).to(dtype)  # [E, out, in]
    gigabytes = weights.numel() * weights.element_size() / 1e9
    passes = _passes(weights)
    labels = list(passes)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for round_number in range(rounds + 1):
        shift = round_number % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            passes[label]()
            if round_number:  # round 0 is warm-up
                times[label].append(time.perf_counter() - start)
    rows = []
    for label, values in times.items():
        seconds = statistics.median(values)
        rows.append({"pass": label, "ms": round(seconds * 1e3, 1), "GB_per_s": round(gigabytes / seconds, 1)})
    return {"dtype": str(dtype).replace("torch.", ""), "gigabytes": round(gigabytes, 3), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--out", default="benchmarks/results/cpu_kernels.json")
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's default allocator")
    args = parser.parse_args()
    allocator = choose_allocator(args.system_malloc)
    machine = {
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "allocator": allocator,
    }
    results = []
    for name in args.dtypes.split(","):
        result = measure(getattr(torch, name), args.rounds)
        results.append(result)
        print(f"{result['dtype']} ({result['gigabytes']} GB per pass)")
        for row in result["rows"]:
            print(f"  {row['pass']:14s} {row['ms']:8.1f} ms  {row['GB_per_s']:5.1f} GB/s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
