"""The engine-free routing core gives `modes.apply`'s own skip decisions, token by token, for
random plans, in prefill (text, visual and special tokens) and in cached decoding; it imports
no transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modes
from modes.adapters.registry import MODALITIES as ENGINE_MODALITIES
from modes.data.encoding import encode_prompts
from modes.routing import MODALITIES, RoutingTables, route
from plans import random_plan


def test_the_core_imports_no_transformers():
    code = "import sys, modes.routing; print('transformers' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
    assert MODALITIES == ENGINE_MODALITIES


def recorded_calls(model, plan, inputs, new_tokens: int):
    """Per model call: its flattened token ids, padding mask, whether it decodes, and each MoE
    layer's (expert ids, weights, skip mask) as the engine decided them."""
    calls = []

    def record_call(module, args, kwargs):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        valid = (
            mask[:, -ids.shape[1] :].bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        )
        calls.append(
            {"ids": ids.reshape(-1), "valid": valid.reshape(-1), "decode": len(calls) > 0, "layers": []}
        )

    modes.apply(model, plan)
    for wrapper in modes.engine.patch._patch_of(model).wrappers:
        decide = wrapper.decide

        def recording(hidden, index, weights, decide=decide, layer=wrapper.layer):
            skip, kept = decide(hidden, index, weights)
            calls[-1]["layers"].append((layer, index.clone(), weights.clone(), skip.clone()))
            return skip, kept

        wrapper.decide = recording
    handle = model.register_forward_pre_hook(record_call, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        handle.remove()
        modes.remove(model)
    return calls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_gives_the_engines_skip_decisions(bundled, seed):
    model, processor = bundled
    samples = modes.load_samples(split="test", limit=12)
    inputs = encode_prompts(processor, [s for s in samples if s.image is not None][:3])
    plan = random_plan(model, processor, seed)
    config = model.config
    tables = RoutingTables.from_plan(
        plan.to_json(), {"visual": [config.image_token_id, config.video_token_id]}
    )
    calls = recorded_calls(model, plan, inputs, new_tokens=3)
    seen_codes, skipped = set(), 0
    for call in calls:
        decode = torch.full_like(call["ids"], call["decode"], dtype=torch.bool)
        seen_codes |= set(tables.token_codes(call["ids"], decode)[call["valid"]].tolist())
        for layer, index, weights, skip in call["layers"]:
            kept_weights, kept_ids = route(
                tables, layer, call["ids"], weights=weights, expert_ids=index, decode=decode
            )
            valid = call["valid"]  # padding: never skipped by the engine, and engines have none
            assert torch.equal(kept_ids[valid] == -1, skip[valid]), (layer, call["decode"])
            assert torch.equal(kept_weights[valid], weights.masked_fill(skip, 0)[valid])
            skipped += int(skip[valid].sum())
    assert seen_codes == {0, 1, 3} and skipped > 0  # text, visual and special tokens all met
    assert any(call["decode"] for call in calls)


def test_route_from_router_logits_matches_the_model_routers_top_k():
    tables = RoutingTables.from_plan(
        {
            "format_version": 2,
            "policy": {"name": "modes", "importance": {"0": {"text": 0.5}}, "thresholds": {"text": 0.1}},
        },
        {"visual": [7]},
        special_ids=[1],
    )
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    token_ids = torch.tensor([3, 7, 1, 4, 5])
    weights, ids = route(tables, 0, token_ids, router_logits=logits, top_k=4)
    top = torch.softmax(logits, -1).topk(4)
    expected = top.values / top.values.sum(-1, keepdim=True)
    skip = 0.5 * expected < 0.1
    skip[1:3] = False  # the visual token has no threshold, the special one is never skipped
    assert torch.equal(ids == -1, skip) and torch.allclose(weights, expected.masked_fill(skip, 0))
    with pytest.raises(ValueError, match="MoDES plans"):
        RoutingTables.from_plan({"policy": {"name": "naee"}}, {})


def test_the_vllm_plugin_vendors_this_routing_core_unchanged():
    """One source of truth: integrations/vllm ships src/modes/routing.py byte for byte
    (refresh with `make vendor-routing`)."""
    root = Path(__file__).resolve().parents[1]
    vendored = root / "integrations/vllm/src/modes_vllm/routing.py"
    assert vendored.read_bytes() == (root / "src/modes/routing.py").read_bytes()
