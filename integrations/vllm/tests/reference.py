"""What the transformers engine does, for the plugin's tests to compare vLLM against.

Runs in modes' own environment (transformers >= 5.23; vLLM's venv has an older one), called by
the tests as ``python reference.py OUT.json --plan PLAN --samples N --decisions S``. For the first
N test-split samples of the bundled model it writes the prompt (text and PNG image) and the
greedy answer under ``modes.apply(plan)``, one sample at a time, and for the first S samples each
forward's kept experts per MoE layer and token. ``--random-plan FILE`` first writes a seeded
random MoDES plan to FILE and uses it.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch

import modes
from modes.data.encoding import encode_prompts, prompt_text
from modes.engine.patch import _patch_of

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))  # modes' test helpers
from plans import random_plan

MAX_NEW_TOKENS = 8


def kept_sets(index: torch.Tensor, skip: torch.Tensor) -> list[list[int]]:
    """Per token, the sorted expert ids it keeps (index [T, k], skip [T, k])."""
    return [
        sorted(i for i, s in zip(row, gone, strict=True) if not s)
        for row, gone in zip(index.tolist(), skip.tolist(), strict=True)
    ]


def answer(model: Any, processor: Any, sample: Any, record: bool) -> dict[str, Any]:
    """Greedy answer of one sample and, with ``record``, per forward the kept experts per layer."""
    forwards: list[dict[int, list[list[int]]]] = []
    wrappers = _patch_of(model).wrappers if record else []
    originals = [w.decide for w in wrappers]

    def recording(hidden, index, weights, decide, layer):
        skip, kept = decide(hidden, index, weights)
        if layer == min(w.layer for w in wrappers):
            forwards.append({})
        forwards[-1][layer] = kept_sets(index, skip)
        return skip, kept

    if record:
        for wrapper, decide in zip(wrappers, originals, strict=True):
            wrapper.decide = lambda h, i, w, decide=decide, layer=wrapper.layer: recording(
                h, i, w, decide, layer
            )
    try:
        inputs = encode_prompts(processor, [sample])
        tokenizer = processor.tokenizer
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
    finally:
        for wrapper, decide in zip(wrappers, originals, strict=True):
            wrapper.decide = decide
    prompt_ids = inputs["input_ids"][0].tolist()
    generated = output[0, len(prompt_ids) :].tolist()
    return {"prompt_token_ids": prompt_ids, "token_ids": generated, "forwards": forwards if record else None}


def png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--plan", help="plan file (default: none, the unpatched model)")
    parser.add_argument("--random-plan", help="write a seeded random plan here and use it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--decisions", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, processor = modes.load_model()
    if args.random_plan:
        plan = random_plan(model, processor, args.seed)
        plan.save(args.random_plan)
    else:
        plan = modes.SkipPlan.load(args.plan) if args.plan else None
    samples = modes.load_samples(split="test", limit=args.samples)
    if plan is not None:
        modes.apply(model, plan)
    records = []
    for position, sample in enumerate(samples):
        record = plan is not None and position < args.decisions
        result = answer(model, processor, sample, record)
        records.append(
            {
                "id": sample.id,
                "prompt": prompt_text(processor, sample),
                "image_png": png(sample.image) if sample.image is not None else None,
                **result,
            }
        )
    counts = (
        {}
        if plan is None
        else {
            layer: {"skipped": skipped.tolist(), "routed": total.tolist()}
            for layer, (skipped, total) in modes.engine.patch.slot_counts(model).items()
        }
    )
    Path(args.out).write_text(
        json.dumps({"max_new_tokens": MAX_NEW_TOKENS, "samples": records, "slot_counts": counts})
    )


if __name__ == "__main__":
    main()
