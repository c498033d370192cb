"""vLLM with modes-vllm: prefill and decode tokens/s with and without skipping, side by side.

Runs in the plugin's venv (integrations/vllm/run-tests builds it), not modes' own:

    python benchmarks/vllm_plugin.py                               # bundled model, plan_88, CPU
    python benchmarks/vllm_plugin.py --shape qwen3-vl-30b --target 0.88   # on a GPU machine

One engine is loaded with the plugin; the conditions are its thresholds, switched in place
between batches (the plan's own, or every threshold -inf: nothing skipped, the op still run),
alternating which goes first each round. A second process runs plain vLLM (no plugin) for the
op's own cost. Prefill: every prompt with one new token; decode: ``--new-tokens`` more per prompt
(end of sequence ignored), its time less the prefill's. Medians over ``--rounds``, warm-up
excluded. ``--shape qwen3-vl-30b`` builds Qwen3-VL-30B-A3B's MoE text stack (48 layers, 128
experts, top-8, hidden 2048, expert width 768; Qwen3-MoE classes, random weights: vLLM's
dummy loader) and a plan with every alpha 1 whose text threshold is bisected to ``--target``.
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

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "src/modes/bundled/checkpoint"
SHAPES = {
    # Qwen3-VL-30B-A3B's text model (its MoE stack) as Qwen3-MoE
    "qwen3-vl-30b": dict(
        hidden_size=2048,
        num_hidden_layers=48,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        intermediate_size=6144,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
    ),
    # the same with a few small layers: checks the script on a CPU in seconds
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=32,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
}


def shaped_checkpoint(shape: str, folder: Path) -> Path:
    """A config-only Qwen3-MoE checkpoint of ``shape`` with the bundled model's tokenizer."""
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 151936,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        **SHAPES[shape],
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((BUNDLED / name).read_bytes())
    return folder


def uniform_plan(layers: int, path: Path) -> Path:
    """Every alpha 1 (the text threshold is set by `bisect_threshold`)."""
    plan = {
        "format": "modes.SkipPlan",
        "format_version": 2,
        "model": None,
        "special_token_ids": [],
        "policy": {
            "name": "modes",
            "importance": {str(i): {"text": 1.0} for i in range(layers)},
            "thresholds": {"text": 0.0},
            "renormalize": False,
        },
    }
    path.write_text(json.dumps(plan))
    return path


def prompts(count: int, length: int) -> list[dict]:
    """Token-id prompts of ``length`` text tokens (ids of the bundled tokenizer's words)."""
    return [{"prompt_token_ids": [20 + (i * 7 + j * 13) % 100 for j in range(length)]} for i in range(count)]


def timed(llm, inputs, params) -> float:
    start = time.perf_counter()
    llm.generate(inputs, params, use_tqdm=False)
    return time.perf_counter() - start


def measure(llm, inputs, new_tokens: int) -> dict[str, float]:
    from vllm import SamplingParams

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    many = SamplingParams(temperature=0, max_tokens=1 + new_tokens, ignore_eos=True)
    prefill = timed(llm, inputs, one)
    total = timed(llm, inputs, many)
    prompt_tokens = sum(len(i["prompt_token_ids"]) for i in inputs)
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill,
        "decode_tokens_per_s": len(inputs) * new_tokens / max(total - prefill, 1e-9),
    }


def bisect_threshold(llm, state, inputs, target: float) -> float:
    """The text threshold whose skip ratio over the prompts' prefill is closest to ``target``
    (20 halvings of [0, 1]); it stays set in ``state``."""
    from vllm import SamplingParams

    low, high, best = 0.0, 1.0, (float("inf"), 0.0)
    for _ in range(20):
        middle = (low + high) / 2
        ratio = _prefill_ratio(llm, state, inputs, middle, SamplingParams(max_tokens=1))
        best = min(best, (abs(ratio - target), middle))
        low, high = (middle, high) if ratio < target else (low, middle)
    _prefill_ratio(llm, state, inputs, best[1], SamplingParams(max_tokens=1))
    return best[1]


def _prefill_ratio(llm, state, inputs, tau: float, params) -> float:
    state.tables.tau[0] = tau
    state.reset()
    llm.generate(inputs, params, use_tqdm=False)
    return state.stats()["skip_ratio"]


def engine(args, model: str):
    from vllm import LLM

    options = dict(
        model=model,
        dtype=args.dtype,
        max_model_len=args.prompt_tokens + args.new_tokens + 8,
        enforce_eager=args.mode == "eager",
        enable_prefix_caching=False,
        seed=0,
    )
    if args.shape:
        options.update(load_format="dummy")
    return LLM(**options)


def run_conditions(args, model: str) -> dict:
    """This process: the plugin's engine, thresholds switched between rounds."""
    import modes_vllm.skipping as skipping
    import torch

    llm = engine(args, model)
    state = skipping.active_state()
    inputs = prompts(args.prompts, args.prompt_tokens)
    if args.target is not None:
        bisect_threshold(llm, state, inputs, args.target)
    plan_tau = state.tables.tau.clone()
    conditions = {"no skipping": torch.full_like(plan_tau, float("-inf")), "plan": plan_tau}
    measure(llm, inputs, args.new_tokens)  # warm-up
    rounds: dict[str, list[dict]] = {name: [] for name in conditions}
    ratios = {}
    for round_ in range(args.rounds):
        order = list(conditions) if round_ % 2 == 0 else list(reversed(conditions))
        for name in order:
            state.tables.tau.copy_(conditions[name])
            state.reset()
            rounds[name].append(measure(llm, inputs, args.new_tokens))
            ratios[name] = state.stats()["skip_ratio"]
    top_k = llm.llm_engine.model_config.hf_text_config.num_experts_per_tok
    return {
        **{name: {**median(results), "skip_ratio": ratios[name]} for name, results in rounds.items()},
        "op_us_per_moe_layer_decode": op_cost_us(state, args.prompts, top_k),
    }


def op_cost_us(state, tokens: int, top_k: int, calls: int = 2000) -> float:
    """Microseconds per `modes_vllm::skip_slots` call on one decode step's routing [tokens, k],
    timed alone (the plugin's cost per MoE layer and forward, beside the experts' own)."""
    import torch

    weights = torch.rand(tokens, top_k, device=state.codes.device)  # [T, k]
    expert_ids = torch.randint(0, 8, (tokens, top_k), dtype=torch.int32, device=state.codes.device)
    layer = min(state.tables.layers)
    for _ in range(100):  # warm-up
        torch.ops.modes_vllm.skip_slots(weights, expert_ids, layer)
    start = time.perf_counter()
    for _ in range(calls):
        torch.ops.modes_vllm.skip_slots(weights, expert_ids, layer)
    state.reset()
    return (time.perf_counter() - start) / calls * 1e6


def median(results: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def run_plain(args, model: str) -> dict:
    """Plain vLLM in this process (no plan): the same batches."""
    llm = engine(args, model)
    inputs = prompts(args.prompts, args.prompt_tokens)
    measure(llm, inputs, args.new_tokens)
    return median([measure(llm, inputs, args.new_tokens) for _ in range(args.rounds)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: the bundled model")
    parser.add_argument("--plan", default=str(REPO / "docs/results/plan_88.json"))
    parser.add_argument("--target", type=float, default=None, help="with --shape: skip ratio to bisect to")
    parser.add_argument("--mode", choices=("eager", "compiled"), default="compiled")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the plugin's state in this process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (CPU build)
    work = Path(tempfile.mkdtemp(prefix="vllm-plugin-bench-"))
    model = str(shaped_checkpoint(args.shape, work / "model")) if args.shape else str(BUNDLED)
    if args.plain:
        print(json.dumps(run_plain(args, model)))
        return
    if args.shape:
        args.target = 0.88 if args.target is None else args.target
        args.plan = str(uniform_plan(SHAPES[args.shape]["num_hidden_layers"], work / "plan.json"))
    os.environ["MODES_PLAN"] = args.plan
    child = subprocess.run(  # its log goes to our stderr; its result is its last stdout line
        [sys.executable, *sys.argv, "--plain"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MODES_PLAN": ""},
        check=True,
    )
    plain = json.loads(child.stdout.strip().splitlines()[-1])
    result = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "plain"},
        "plain vllm": plain,
        **run_conditions(args, model),
    }
    base = result["no skipping"]
    for name in ("plain vllm", "plan"):
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            result[name][f"{key}_vs_no_skipping"] = result[name][key] / base[key]
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:  # written whole or not at all
        partial = Path(f"{args.out}.partial")
        partial.write_text(text + "\n")
        partial.replace(args.out)


def machine() -> dict:
    import torch
    import vllm

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    return {"device": device, "cpus": os.cpu_count(), "torch": torch.__version__, "vllm": vllm.__version__}


if __name__ == "__main__":
    main()
