"""End to end on the default path: what `modes.apply(model, plan)` gives with no options.

    python benchmarks/default_path.py [--dtypes float32,bfloat16] [--out benchmarks/results/default_path.json]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/default_path.py ...

A Qwen3-VL-30B-A3B-shaped model truncated to 2 decoder layers (random weights, as `modes
bench --shape`), a 512-token prompt, batch 1, per dtype two `modes.evaluation.bench.bench`
runs, each alternating the unpatched model and the patched one round by round (speedups are
medians of per-round ratios):
- thresholds 0 (a MoDES plan that skips nothing): the overhead of the patch itself;
- k-reduction to 1 of 8 experts (87.5% of slots): the prefill speedup against the Amdahl bound
  and against the memory bound: a prefill that keeps any row of nearly every expert must read
  nearly all expert weights once, so the MoE part cannot take less than that read (timed here
  by `read_once`), however few rows it computes.
The second line of the usage runs everything as on an AVX2-only CPU: PyTorch's own kernels,
oneDNN and modes' kernel build all limited to AVX2 + FMA. The JSON names the CPU, its flags,
the instruction set each path ran and the environment.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import modes
from host import cpu_name
from modes.engine import moe_sites
from modes.engine.kernels import cpu_flags, kernel_status
from modes.evaluation.allocator import choose_allocator
from modes.evaluation.bench import bench, read_once, shaped_model
from modes.io import write_json_atomic
from modes.policies import KReductionConfig

SHAPE = "qwen3-vl-30b-a3b"
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")


def plans(model) -> dict[str, modes.SkipPlan]:
    info = modes.model_info(model)
    zero = modes.SkipPlan(
        {layer: {"text": 1 / len(info.moe_layers)} for layer in info.moe_layers}, {"text": 0.0}, model=info
    )
    return {"thresholds_0": zero, "skip_0.875": modes.SkipPlan(policy=KReductionConfig(1), model=info)}


def run(dtype: torch.dtype, layers: int, tokens: int, repeats: int, only: tuple[str, ...] = ()) -> dict:
    model = shaped_model(SHAPE, layers, dtype)
    vocab = model.config.get_text_config().vocab_size
    input_ids = torch.randint(10, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, plan in plans(model).items():
        if only and name not in only:
            continue
        report = bench(model, plan, input_ids, new_tokens=4, repeats=repeats)
        report |= memory_bound(report, expert_weights_read_s(model, repeats))
        results[name] = report
        print(
            f"{str(dtype).removeprefix('torch.'):>8} {name:>12}: prefill {report['prefill_speedup']:.3f}x "
            f"(Amdahl bound {report['amdahl_bound']:.2f}x, {report['prefill_fraction_of_bound']:.0%} of it; "
            f"memory bound {report['memory_bound']:.2f}x, {report['prefill_fraction_of_memory_bound']:.0%} "
            f"of it), paths {report['paths']}",
            flush=True,
        )
    return results


def expert_weights_read_s(model, repeats: int) -> float:
    """Median seconds to read every byte of the routed experts' weights once (`read_once`): what
    the memory delivers, whoever's kernel reads them."""
    weights = [weight for site in moe_sites(model) for weight in site.module.parameters()]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        read_once(weights)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first is warm-up


def memory_bound(report: dict, read_s: float) -> dict:
    """The Amdahl bound with the MoE part floored at one read of every expert's weights (the
    prompt's kept slots hit nearly every expert: 512 tokens x 1 slot over 128 experts hit ~98%)."""
    unskipped = report["unskipped"]["prefill_s"]
    share, ratio = report["moe_share_of_prefill"], report["plan"]["skip_ratio"]
    # the Amdahl formula term for term, so a floor that does not bind gives exactly the Amdahl bound
    moe_after = max(share * (1.0 - ratio), read_s / unskipped)
    bound = 1.0 / ((1.0 - share) + moe_after)
    return {
        "expert_weights_read_s": read_s,
        "memory_bound": bound,
        "prefill_fraction_of_memory_bound": report["prefill_speedup"] / bound,
    }


def machine() -> dict:
    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "cpu_flags": sorted(f for f in FLAGS_OF_INTEREST if f in flags),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
        "kernel": kernel_status(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--plans", default="", help="only these, comma-separated (thresholds_0, skip_0.875)")
    parser.add_argument("--out", default="benchmarks/results/default_path.json")
    args = parser.parse_args()
    allocator = choose_allocator(False)
    only = tuple(name for name in args.plans.split(",") if name)
    results = {
        d: run(getattr(torch, d), args.layers, args.tokens, args.repeats, only)
        for d in args.dtypes.split(",")
    }
    record = {"machine": {**machine(), "allocator": allocator}, "shape": SHAPE, "layers": args.layers,
              "prompt_tokens": args.tokens, "repeats": args.repeats, "results": results}  # fmt: skip
    write_json_atomic(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
