"""One vLLM engine on the bundled model, run on a reference file's prompts (vLLM's venv).

``python run_vllm.py REFERENCE.json OUT.json --mode eager|compiled --decisions S``, with or
without ``MODES_PLAN`` in the environment. Writes, per sample, vLLM's prompt and generated token
ids and the logprob of each generated token (all samples in one batched ``generate``), and, with
a plan, the kept experts per forward, MoE layer and token of the first S samples run one at a
time, and the plugin's slot counts of the batched run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the plugin's state in this process
os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "modes-vllm-cache"))


def prompts(reference: dict) -> list[dict]:
    from PIL import Image

    inputs = []
    for sample in reference["samples"]:
        item = {"prompt": sample["prompt"]}
        if sample["image_png"]:
            image = Image.open(io.BytesIO(base64.b64decode(sample["image_png"]))).convert("RGB")
            item["multi_modal_data"] = {"image": image}
        inputs.append(item)
    return inputs


def forwards_of(record: list, layers: int) -> list[dict[int, list[list[int]]]]:
    """Records (layer, kept [T, k], expert ids [T, k]) grouped into forwards (every MoE layer once each)."""
    forwards = []
    for position, (layer, kept, expert_ids) in enumerate(record):
        if position % layers == 0:
            forwards.append({})
        forwards[-1][layer] = [
            sorted(i for i, k in zip(row, keep, strict=True) if k)
            for row, keep in zip(expert_ids.tolist(), kept.tolist(), strict=True)
        ]
    return forwards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reference")
    parser.add_argument("out")
    parser.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--decisions", type=int, default=8)
    parser.add_argument("--model", default=None, help="checkpoint (default: modes' bundled one)")
    args = parser.parse_args()
    import modes_vllm.skipping as skipping
    from vllm import LLM, SamplingParams

    reference = json.loads(Path(args.reference).read_text())
    model = args.model or str(Path(__file__).resolve().parents[3] / "src/modes/bundled/checkpoint")
    llm = LLM(
        model=model,
        dtype="float32",
        max_model_len=512,
        enforce_eager=args.mode == "eager",
        enable_prefix_caching=False,
        limit_mm_per_prompt={"image": 1, "video": 0},
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=reference["max_new_tokens"], logprobs=0)
    inputs = prompts(reference)
    state = skipping.active_state()
    result: dict = {"samples": [], "forwards": [], "slot_counts": None}
    for item in inputs[: args.decisions]:  # with or without a plan: both engines run the same steps
        if state is not None:
            state.record = []
        llm.generate([item], params, use_tqdm=False)
        if state is not None:
            result["forwards"].append(forwards_of(state.record, len(state.tables.layers)))
    if state is not None:
        state.record = None
        state.reset()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        steps = zip(completion.logprobs, completion.token_ids, strict=True)
        logprobs = [step[token].logprob for step, token in steps]
        result["samples"].append(
            {
                "prompt_token_ids": list(output.prompt_token_ids),
                "token_ids": list(completion.token_ids),
                "logprobs": logprobs,
            }
        )
    if state is not None:
        result["slot_counts"] = state.stats()
    result["additional_config"] = dict(llm.llm_engine.vllm_config.additional_config)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
