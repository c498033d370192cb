"""Time one routed-experts block with real layer shapes: transformers' default vs modes skipping.

    python benchmarks/moe_block.py [--quick] [--out benchmarks/results/moe_block.json]

Per shape, dtype and token count: the transformers default experts implementation with no
skipping, then the modes wrapper at each skip ratio, on the module's weights and (``packed_*``
fields) with oneDNN-packed copies of them (``execution="packed"``). Skips
follow the MoDES rule (a score threshold on softmax-top-k router weights from a random router,
alpha constant), with the threshold set to the score quantile that gives the ratio. Every
configuration is called once per round, in turn, after warm-up; for prefill, times are
medians over rounds and a speedup is the median over rounds of the default's time over the
configuration's in the same round; for decode, whose draws keep different numbers of slots,
medians over whole passes over the draws (`Timings`).

Each timed call starts cold, as a MoE block does inside a model: the routing cycles over
several token draws (so consecutive calls hit different experts) and a buffer twice the
size of the last-level cache is read before every timed call (what attention and the other
layers stream between two calls of one block). Without this, a decode call that keeps one
expert (9 MB in bf16) finds its weights still in a 32 MB L3 from the previous repeat, which
no real model does.

The process keeps the memory it frees (`modes.evaluation.allocator.retain_freed_memory`, as
jemalloc or tcmalloc would in a CPU server), so that no call pays page faults for its
temporaries: under glibc's defaults transformers' default call spent 20-40% of its time
faulting in fresh pages, by amounts that shifted with what else was resident
(`benchmarks/page_faults.py`). Faults per call are recorded (``minor_faults_per_call``);
``--system-malloc`` keeps glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from modes.engine.compiled import CompiledExperts
from modes.engine.execute import CpuChoice, CpuPath, run_expert_loop
from modes.engine.packed import PackedExperts
from modes.engine.rules import Routing
from modes.engine.tokens import TokenContext
from modes.engine.wrappers import SkippingExperts
from modes.evaluation.allocator import choose_allocator, minor_page_faults
from modes.evaluation.bench import read_once

SHAPES = {
    "qwen3-vl-30b-a3b": dict(cls=Qwen3MoeExperts, hidden=2048, experts=128, top_k=8, width=768),
    "kimi-vl-a3b": dict(cls=Qwen3MoeExperts, hidden=2048, experts=64, top_k=6, width=1408),
    "gpt-oss-20b": dict(cls=GptOssExperts, hidden=2880, experts=32, top_k=4, width=2880),
}
RATIOS = (0.0, 0.25, 0.5, 0.63, 0.75, 0.88, 0.9)
DRAWS = 8  # token draws the timed calls cycle over
FLUSH_BYTES = 64 * 2**20  # read before each timed call: twice this VM's 32 MB L3


class FixedRule:
    """Skip slots whose score (alpha * pi, alpha = 1) is below a fixed threshold."""

    def __init__(self, tau: float):
        self.tau = tau

    def skip_mask(self, routing: Routing) -> torch.Tensor:
        return routing.pi < self.tau


def build_experts(shape: dict, dtype: torch.dtype) -> torch.nn.Module:
    model_type = "gpt_oss" if shape["cls"] is GptOssExperts else "qwen3_moe"
    config = AutoConfig.for_model(
        model_type,
        hidden_size=shape["hidden"],
        intermediate_size=shape["width"],
        moe_intermediate_size=shape["width"],
        num_experts=shape["experts"],
        num_local_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"],
    )
    config._experts_implementation = "grouped_mm"
    experts = shape["cls"](config)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(0, 0.02)
    return experts.to(dtype).eval()


def routing(tokens: int, shape: dict, dtype: torch.dtype, generator: torch.Generator):
    hidden = torch.randn(tokens, shape["hidden"], generator=generator).to(dtype)
    router = torch.randn(shape["hidden"], shape["experts"], generator=generator) / shape["hidden"] ** 0.5 * 4
    probs = torch.softmax(hidden.float() @ router, dim=-1)  # [T, E]
    weights, index = torch.topk(probs, shape["top_k"], dim=-1)  # [T, k]
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    return hidden, index, weights


class ColdTimer:
    """Times calls that each start with cold caches and the next token draw, and counts the
    minor page faults each call takes (none once the allocator keeps freed memory)."""

    def __init__(self, draws: list[tuple[torch.Tensor, ...]]):
        self.draws = draws
        self.flush_buffer = torch.ones(FLUSH_BYTES // 4)
        self.faults: dict[Any, list[int]] = {}

    def seconds(self, call, number: int, label: Any = None) -> float:
        """Wall time of ``call`` on draw ``number`` (cycling over the draws), after a flush."""
        draw = self.draws[number % len(self.draws)]
        self.flush_buffer.sum()
        faults = minor_page_faults()
        start = time.perf_counter()
        call(*draw)
        seconds = time.perf_counter() - start
        self.faults.setdefault(label, []).append(minor_page_faults() - faults)
        return seconds

    def interleaved(self, calls: dict[Any, Any], number: int) -> dict[Any, list[float]]:
        """Times of each of ``calls`` over ``number`` rounds, one call of each per round in turn,
        so that drift of the machine hits all alike; warm-up excluded. Each round starts one
        call further along, so no call always follows the same one (what a call leaves behind,
        such as freed buffers, would otherwise bias the next)."""
        for call in calls.values():
            for draw in self.draws[:2]:
                call(*draw)
        self.faults.clear()
        times: dict[Any, list[float]] = {label: [] for label in calls}
        labels = list(calls)
        for n in range(number):
            shift = n % len(labels)
            for label in labels[shift:] + labels[:shift]:
                times[label].append(self.seconds(calls[label], n, label))
        return times

    def faults_per_call(self) -> dict[str, float]:
        """Median minor page faults per timed call of each configuration."""
        return {str(label): statistics.median(counts) for label, counts in self.faults.items()}


def _setup(name: str, dtype: torch.dtype, tokens: int):
    shape = SHAPES[name]
    experts = build_experts(shape, dtype)
    generator = torch.Generator().manual_seed(0)
    draws = [routing(tokens, shape, dtype, generator) for _ in range(DRAWS)]
    context = TokenContext(media_ids={}, special_ids=torch.tensor([], dtype=torch.long))
    context.set_all_text(1, tokens, draws[0][0].device)
    return experts, draws, context


def _timed_calls(tokens: int, repeats: int) -> int:
    """Decode calls take milliseconds: time several whole passes over the draws."""
    return repeats if tokens >= 64 else max(repeats, 4) * DRAWS


class Timings:
    """Seconds of each configuration over interleaved rounds, reduced two ways.

    Prefill (every draw keeps about as many rows): medians, and a speedup is the median over
    rounds of the baseline's time over the configuration's in the same round, so a slow
    stretch of the machine, which hits a whole round, cancels. Decode (``per_call_varies``):
    a draw of one token can keep 0, 1 or 2 slots at a given ratio, so a median over calls would
    pick a typical draw, not the realised ratio; each whole pass over the draws is summed, and
    times and speedups are medians over passes, so that a stall of this VM, which hits one
    pass, does not weigh in (one such stall made a mean read 46 ms for a 7 ms call).
    """

    def __init__(self, times: dict[Any, list[float]], per_call_varies: bool):
        self.times = times
        self.per_call_varies = per_call_varies

    def seconds(self, label: Any) -> float | None:
        if label not in self.times:
            return None
        if self.per_call_varies:
            return statistics.median(self._passes(label)) / DRAWS
        return statistics.median(self.times[label])

    def speedup(self, label: Any, baseline: str = "default") -> float:
        if self.per_call_varies:
            pairs = zip(self._passes(baseline), self._passes(label), strict=True)
        else:
            pairs = zip(self.times[baseline], self.times[label], strict=True)
        return statistics.median(b / t for b, t in pairs)

    def _passes(self, label: Any) -> list[float]:
        """Seconds of each whole pass over the draws (consecutive rounds cycle over them)."""
        times = self.times[label]
        return [sum(times[start : start + DRAWS]) for start in range(0, len(times) - DRAWS + 1, DRAWS)]


@torch.no_grad()
def bench_case(name: str, dtype: torch.dtype, tokens: int, repeats: int) -> dict:
    experts, draws, context = _setup(name, dtype, tokens)
    all_weights = torch.cat([weights for _, _, weights in draws]).float().reshape(-1)
    wrappers = {
        ratio: SkippingExperts(
            experts,
            layer=0,
            rule=FixedRule(float(torch.quantile(all_weights, ratio)) if ratio > 0 else 0.0),
            context=context,
        )
        for ratio in RATIOS
    }
    paths = _cpu_paths(experts)  # one of each, shared by every ratio's wrapper
    calls = {"default": experts, **wrappers}
    for ratio, wrapper in wrappers.items():
        if ratio > 0:  # at ratio 0 the module itself runs, on any path
            for path_name, path in paths.items():
                calls[(path_name, ratio)] = _on_path(wrapper, path_name, path)
    if tokens >= 64:  # prefill: every expert keeps rows, so the kernels' one-row floor bounds it
        calls["floor"] = _weight_read_floor(experts, draws[0][0])
        calls["memory"] = _memory_read(experts)
        for path_name, path in paths.items():
            calls[f"{path_name}_floor"] = _weight_read_floor(experts, draws[0][0], path)
    else:  # decode: modes' CPU loop runs the kept rows, so time its kernels apart from skipping
        calls["loop"] = _loop_on_every_slot(experts)
    for path_name, path in paths.items():  # each path's loop with nothing skipped: its own gain
        calls[f"{path_name}_loop"] = _loop_on_every_slot(experts, path)
    timer = ColdTimer(draws)
    times = Timings(timer.interleaved(calls, _timed_calls(tokens, repeats)), tokens < 64)
    baseline, floor, loop = times.seconds("default"), times.seconds("floor"), times.seconds("loop")
    floor_speedup = times.speedup("floor") if floor else None
    rows = []
    default_hits = _experts_hit(draws, wrappers[0.0].rule)
    for ratio, wrapper in wrappers.items():
        wrapper.counter.reset()
        for draw in draws:
            wrapper(*draw)
        realised = float(wrapper.counter.skipped.sum() / wrapper.counter.total.sum())
        ideal = 1 / (1 - realised) if realised < 1 else float("inf")
        hits = _experts_hit(draws, wrapper.rule)
        expert_reads = default_hits / hits if hits else None  # decode's cap: experts read
        attainable = _attainable(ideal, floor_speedup if floor else expert_reads)
        speedup = times.speedup(ratio)
        row = {
            "target_ratio": ratio,
            "ratio": round(realised, 4),
            "experts_hit": round(hits, 3),
            "ms": round(times.seconds(ratio) * 1e3, 3),
            "speedup": round(speedup, 3),
            "ideal": round(ideal, 3),
            "fraction_of_ideal": round(speedup / ideal, 3),
            "attainable": round(attainable, 3),
            "fraction_of_attainable": round(speedup / attainable, 3),
            **({"speedup_over_loop": round(times.speedup(ratio, "loop"), 3)} if loop else {}),
        }
        for path_name in paths if ratio > 0 else ():
            cap = times.speedup(f"{path_name}_floor") if floor else expert_reads
            row.update(_path_fields(times, path_name, ratio, ideal, cap))
        rows.append(row)
    path_fields = {}
    for path_name in paths:
        path_fields[f"{path_name}_loop_ms"] = round(times.seconds(f"{path_name}_loop") * 1e3, 3)
        path_fields[f"{path_name}_loop_gain"] = round(times.speedup(f"{path_name}_loop"), 3)
        if floor:
            path_fields[f"{path_name}_weight_read_floor_ms"] = round(
                times.seconds(f"{path_name}_floor") * 1e3, 3
            )
    return {"shape": name, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens,
            "timed_calls": len(times.times["default"]), "default_ms": round(baseline * 1e3, 3),
            "cpu_paths": list(paths),
            "weight_read_floor_ms": round(floor * 1e3, 3) if floor else None,
            "memory_read_ms": round(times.seconds("memory") * 1e3, 3) if floor else None,
            "memory_bound": round(times.speedup("memory"), 3) if floor else None,
            "loop_every_slot_ms": round(loop * 1e3, 3) if loop else None,
            "loop_gain": round(times.speedup("loop"), 3) if loop else None,
            **path_fields,
            "default_experts_hit": round(default_hits, 3),
            "minor_faults_per_call": timer.faults_per_call(),
            "rows": rows}  # fmt: skip


def _cpu_paths(experts: torch.nn.Module) -> dict[str, CpuPath]:
    """The CPU paths `modes.apply` offers for ``experts`` where they run this layout and dtype on
    this CPU: oneDNN-packed copies (``packed``) and modes' compiled kernel (``compiled``)."""
    paths: dict[str, CpuPath] = {}
    for name, path in (("packed", PackedExperts), ("compiled", CompiledExperts)):
        try:
            paths[name] = path(experts)
        except ValueError as refusal:
            print(f"  (no {name} path: {refusal})", flush=True)
    return paths


def _on_path(wrapper: SkippingExperts, name: str, path: CpuPath) -> SkippingExperts:
    """``wrapper``'s rule on the CPU path ``path`` (``modes.apply`` would make one per wrapper:
    for packed weights, a copy per ratio)."""
    return SkippingExperts(
        wrapper.base_layer,
        layer=0,
        rule=wrapper.rule,
        context=wrapper.context,
        cpu_choice=CpuChoice(path, name),
    )


def _attainable(ideal: float, cap: float | None) -> float:
    """The ideal speedup, capped in prefill by the kernels' one-row-per-expert floor and in
    decode by the experts read (`_experts_hit`)."""
    return min(ideal, cap) if cap else ideal


def _experts_hit(draws: list[tuple[torch.Tensor, ...]], rule: FixedRule) -> float:
    """Mean number of distinct experts the slots ``rule`` keeps route to, over the draws.

    A decode call reads the weights of every expert hit and computes almost nothing, so its
    time follows this count, not the slots: when several of the default's slots share an
    expert (8 tokens x 4 slots over GPT-OSS's 32 experts hit about 20), skipping saves fewer
    expert reads than slots, and default hits / hits at r bounds the speedup below 1 / (1 - r).
    """
    counts = []
    for _, index, weights in draws:
        kept = ~rule.skip_mask(Routing.of(weights))  # [T, k]
        counts.append(index[kept].unique().numel())
    return statistics.mean(counts)


def _path_fields(times: Timings, path_name: str, ratio: float, ideal: float, cap: float | None) -> dict:
    """A CPU path's cells at ``ratio``: speedup over the default (fraction of the ideal and of
    what the path's own floor, or the experts read, allow) and over its loop with every slot kept."""
    label = (path_name, ratio)
    speedup, over_loop = times.speedup(label), times.speedup(label, f"{path_name}_loop")
    attainable = _attainable(ideal, cap)
    return {
        f"{path_name}_ms": round(times.seconds(label) * 1e3, 3),
        f"{path_name}_speedup": round(speedup, 3),
        f"{path_name}_fraction_of_ideal": round(speedup / ideal, 3),
        f"{path_name}_attainable": round(attainable, 3),
        f"{path_name}_fraction_of_attainable": round(speedup / attainable, 3),
        f"{path_name}_speedup_over_{path_name}_loop": round(over_loop, 3),
        f"{path_name}_fraction_of_ideal_over_{path_name}_loop": round(over_loop / ideal, 3),
    }


def _weight_read_floor(experts: torch.nn.Module, like: torch.Tensor, path: CpuPath | None = None):
    """The module (or, given a CPU ``path``, modes' loop on it) with one row per expert: every
    expert's weights read once, almost no compute. While skipping leaves every expert at least
    one row (prefill), no execution of the kept rows by those kernels can beat it, so the
    attainable speedup is min(1 / (1 - r), default / floor). (It is the kernels' floor: small-M
    GEMMs stream weights below what the memory delivers on this CPU, see BENCHMARKS.md.)"""
    count = experts.num_experts
    hidden = torch.randn(count, like.shape[1], generator=torch.Generator().manual_seed(1)).to(like.dtype)
    index, weights = torch.arange(count).unsqueeze(1), torch.ones(count, 1, dtype=like.dtype)  # k = 1
    if path is not None:
        return lambda *_: run_expert_loop(experts, hidden, index, weights, torch.arange(count), path)
    return lambda *_: experts(hidden, index, weights)


def _memory_read(experts: torch.nn.Module):
    """Every byte of the module's weights read once (`read_once`): what the memory delivers.
    While every expert keeps rows (prefill), no kernel can execute them faster, so default /
    this (``memory_bound``) caps the speedup of any execution on this machine, not only of ours."""
    weights = list(experts.parameters())
    return lambda *_: read_once(weights)


def _loop_on_every_slot(experts: torch.nn.Module, path: CpuPath | None = None):
    """modes' CPU expert loop with nothing skipped: against the default, what its kernels alone
    gain (the loop calls ATen's bf16 GEMV for single rows, where the default calls oneDNN, and
    a CPU ``path``'s kernels when given one)."""
    return lambda hidden, index, weights: run_expert_loop(
        experts, hidden, index, weights, torch.arange(index.numel()), path
    )


@torch.no_grad()
def overhead_case(name: str, dtype: torch.dtype, tokens: int, pairs: int) -> dict:
    """Ratio 0 vs the default, interleaved call by call (same draw within a pair) so that
    drift hits both alike."""
    experts, draws, context = _setup(name, dtype, tokens)
    wrapper = SkippingExperts(experts, layer=0, rule=FixedRule(0.0), context=context)
    times = ColdTimer(draws).interleaved({"default": experts, "modes": wrapper}, pairs)
    ratios = [m / d for m, d in zip(times["modes"], times["default"], strict=True)]
    return {
        "shape": name,
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": tokens,
        "pairs": pairs,
        "default_ms": round(statistics.median(times["default"]) * 1e3, 3),
        "modes_ms": round(statistics.median(times["modes"]) * 1e3, 3),
        "median_time_ratio": round(statistics.median(ratios), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/moe_block.json")
    parser.add_argument("--tokens", default="512,2048,1,8", help="prefill sizes and decode batch sizes")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument(
        "--overhead",
        type=int,
        default=0,
        metavar="PAIRS",
        help="only ratio 0 vs default, PAIRS interleaved calls",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default allocator (calls then pay page faults for their temporaries)",
    )
    args = parser.parse_args()
    allocator = choose_allocator(args.system_malloc)
    token_counts = [int(t) for t in args.tokens.split(",")]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    cases = [(s, d, t) for s in args.shapes.split(",") for d in dtypes for t in token_counts]
    if args.quick:
        cases = [("qwen3-vl-30b-a3b", torch.float32, 512), ("qwen3-vl-30b-a3b", torch.float32, 1)]
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "protocol": f"cold calls: {DRAWS} token draws cycled, {FLUSH_BYTES >> 20} MB read before each",
        "allocator": allocator,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for name, dtype, tokens in cases:
        if args.overhead:
            result = overhead_case(name, dtype, tokens, args.overhead)
            results.append(result)
            timing = f"{result['modes_ms']} / {result['default_ms']} ms"
            print(f"{name:18s} {result['dtype']:8s} T={tokens:<5d} r = 0 time ratio "
                  f"{result['median_time_ratio']:.3f} ({timing})", flush=True)  # fmt: skip
            out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
            continue
        result = bench_case(name, dtype, tokens, 3 if args.quick else args.repeats)
        results.append(result)
        cells = "  ".join(
            f"{r['ratio']:.2f}:{r['speedup']:.2f}x({r['fraction_of_ideal']:.0%})"
            + "".join(f"/{p} {r[f'{p}_speedup']:.2f}x" for p in result["cpu_paths"] if f"{p}_speedup" in r)
            for r in result["rows"]
        )
        head = f"{name:18s} {result['dtype']:8s} T={tokens:<5d} default {result['default_ms']:9.2f} ms"
        print(f"{head} | {cells}", flush=True)
        out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")  # per case
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
