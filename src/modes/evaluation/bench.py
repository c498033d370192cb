"""End-to-end latency with and without a plan: prefill time, decode tokens/s, MoE share, Amdahl bound.

Times are medians over repeats after warm-up, measured side by side in one process, the
unskipped model and the plan alternating round by round so that drift hits both alike, and
in turn first within a round (A B, B A, ...) so that whatever the second call of a round
inherits from the first does not bias either; speedups are medians of the per-round ratios.
The share of time inside the experts modules is measured on the unskipped model with hooks
(synchronous on CPU), in an extra prefill each round after warm-up (median; the first, cold
call would bias it), and bounds the end-to-end speedup a skip ratio r can give:
1 / ((1 - share) + share * (1 - r)).

The plan is applied anew for each of its rounds and removed before the unskipped model's, so
the unskipped model never runs beside packed expert weights (``execution='packed'``), as an unpatched
model would not. Packing again each round is not timed, but takes wall time.

Minor page faults per prefill are reported: under glibc's default allocator a CPU prefill
faults in fresh pages for its large temporaries on every call, at a cost that shifts with what
else is resident (packed copies made it dearer), so compare with the process keeping freed
memory (`modes.evaluation.allocator.retain_freed_memory`, which ``modes bench`` calls) or
under jemalloc / tcmalloc.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from modes import engine
from modes.engine import ApplyOptions
from modes.errors import UsageError
from modes.evaluation.allocator import minor_page_faults
from modes.plan import SkipPlan

__all__ = ["SHAPES", "bench", "read_once", "shaped_model"]

LABELS = ("unskipped", "plan")

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-vl-30b-a3b": dict(
        model_type="qwen3_vl_moe",
        text_config=dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            vocab_size=151936,
        ),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=2048),
    ),
}


def shaped_model(shape: str, layers: int, dtype: torch.dtype = torch.float32) -> Any:
    """Random-weight model with the real layer shapes of ``shape``, truncated to ``layers``.

    Token embeddings are drawn at unit scale, not transformers' 0.02: at that scale the
    residual stream is dominated by what attention averages over the prompt, nearly the same
    for every token, so routing collapses onto few experts (512 random tokens' top-1 hit 79
    and 16 of 128 experts in the two layers of the Qwen3-VL-30B shape) and skipping would read
    far fewer expert weights than on a trained, load-balanced model (126 and 118 at unit scale).
    """
    if shape not in SHAPES:
        raise UsageError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    spec = SHAPES[shape]
    text = {**spec["text_config"], "num_hidden_layers": layers}
    config = AutoConfig.for_model(spec["model_type"], text_config=text, vision_config=spec["vision_config"])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)  # token-specific routing, see above
    return model.eval()


@torch.no_grad()
def read_once(tensors: list[torch.Tensor]) -> None:
    """Read every byte of ``tensors`` once, as fast as PyTorch reads memory on any CPU: the floor
    of a memory bound. Bytes are summed as fp32 where they can be viewed so: a bf16 or fp16 sum
    widens every element and is compute-bound on AVX2 (63 ms against 47 ms for the same 1.2 GB
    of expert weights, 2 cores of a Xeon with AVX-512 run as AVX2), which would understate how
    fast the memory delivers and flatter a kernel measured against it."""
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        as_words = flat.numel() * flat.element_size() % 4 == 0 and flat.data_ptr() % 4 == 0
        if flat.element_size() != 4 and as_words:
            flat = flat.view(torch.uint8).view(torch.float32)
        flat.sum()


def _moe_share(model: Any, run: Callable[[], Any]) -> float:
    spent = [0.0]
    started: dict[int, float] = {}
    handles = []
    for site in engine.moe_sites(model):
        module = site.module
        handles.append(
            module.register_forward_pre_hook(lambda m, a: started.__setitem__(id(m), time.perf_counter()))
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - started[id(m)])
            )
        )
    try:
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return spent[0] / total


def _paired_speedup(samples: dict[str, dict[str, list[float]]], key: str) -> float:
    """Median over rounds of the unskipped time over the plan's in the same round: a slow
    stretch of the machine hits a whole round and cancels."""
    pairs = zip(samples["unskipped"][key], samples["plan"][key], strict=True)
    return statistics.median(unskipped / plan for unskipped, plan in pairs)


def _cache_keyword(model: Any) -> str:
    """The forward's name for the KV cache: ``cache`` from transformers 5.24 (``past_key_values``,
    deprecated there, goes in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    return output["cache"] if "cache" in output else output["past_key_values"]


@torch.no_grad()
def bench(
    model: Any,
    plan: SkipPlan,
    input_ids: torch.Tensor,
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    options: ApplyOptions | None = None,
) -> dict[str, Any]:
    """Prefill seconds and cached decode tokens/s for ``input_ids`` [B, L], without and with
    ``plan`` (applied with ``options``, `modes.ApplyOptions`)."""
    options = options or ApplyOptions()
    batch = input_ids.shape[0]

    def prefill() -> Any:
        return model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

    cache_keyword = _cache_keyword(model)

    def decode_step() -> float:
        """Median seconds of one cached decode step over ``new_tokens`` greedy steps."""
        output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        times = []
        for _ in range(new_tokens):
            past, next_ids = _cache_of(output), output.logits[:, -1:].argmax(-1)  # [B, 1]
            start = time.perf_counter()
            output = model(input_ids=next_ids, use_cache=True, **{cache_keyword: past})
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    samples: dict[str, dict[str, list[float]]] = {
        label: {"prefill": [], "step": [], "faults": []} for label in LABELS
    }
    shares = []  # of the unskipped model, hooked in a prefill of its own (hooks stay off the timed ones)
    for round_number in range(warmup + repeats):  # alternate unskipped and plan: drift hits both
        if round_number >= warmup:
            shares.append(_moe_share(model, prefill))
        for label in LABELS if round_number % 2 == 0 else LABELS[::-1]:
            with (
                engine.applied(model, plan, options) if label == "plan" else contextlib.nullcontext()
            ):  # anew: see the docstring
                faults, start = minor_page_faults(), time.perf_counter()
                prefill()
                prefill_s = time.perf_counter() - start
                faults = minor_page_faults() - faults
                step_s = decode_step()
            if round_number >= warmup:
                samples[label]["prefill"].append(prefill_s)
                samples[label]["step"].append(step_s)
                samples[label]["faults"].append(faults)
    rows = {}
    for label in LABELS:
        prefill_s, step_s = (statistics.median(samples[label][key]) for key in ("prefill", "step"))
        rows[label] = {
            "prefill_s": prefill_s,
            "decode_step_s": step_s,
            "decode_tokens_per_s": batch / step_s,
            "prefill_minor_page_faults": statistics.median(samples[label]["faults"]),
        }
    with engine.applied(model, plan, options):
        engine.reset_stats(model)
        prefill()
        rows["plan"]["skip_ratio"] = engine.skip_stats(model)["ratio"]
        paths = engine.execution_info(model)["paths"]
    ratio, share = rows["plan"]["skip_ratio"], statistics.median(shares)
    amdahl = 1.0 / ((1.0 - share) + share * (1.0 - ratio))
    prefill_speedup = _paired_speedup(samples, "prefill")
    return {
        **rows,
        "moe_share_of_prefill": share,
        "prefill_speedup": prefill_speedup,
        "decode_speedup": _paired_speedup(samples, "step"),
        "amdahl_bound": amdahl,
        "prefill_fraction_of_bound": prefill_speedup / amdahl,
        "batch": batch,
        "prompt_tokens": input_ids.shape[1],
        "new_tokens": new_tokens,
        "execution": options.execution,
        "paths": paths,
    }
