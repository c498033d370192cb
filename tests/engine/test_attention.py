"""The attention probe MC-MoE needs: exact received attention, unchanged outputs, clean removal."""

from __future__ import annotations

import pytest
import torch

import modes
from modes.policies import McMoeConfig
from tiny_models import TINY_MODELS, build, prompts

FAMILIES = [t for t in TINY_MODELS if t.model_type in ("qwen3_vl_moe", "qwen3_moe", "mixtral")]


def no_skip_mc_moe(model) -> modes.SkipPlan:
    info = modes.model_info(model)
    beta = {str(layer): 0.0 for layer in info.moe_layers}  # NAEE with beta 0 skips nothing
    return modes.SkipPlan(policy=McMoeConfig(beta=beta), model=info)


def expected_received(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """From transformers' own eager attention probabilities: per layer [B * L]."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # [Q, K]
    sees = causal & mask.bool()[:, None, :] & mask.bool()[:, :, None]  # [B, Q, K]
    received = {}
    for layer, probs in enumerate(attentions):  # [B, H, Q, K]
        total = probs.mean(dim=1).masked_fill(~sees, 0).sum(dim=1)  # [B, K]
        received[layer] = (total / sees.sum(dim=1).clamp_min(1)).reshape(-1)
    return received


@pytest.mark.parametrize("tiny", FAMILIES, ids=str)
def test_probe_records_received_attention_and_changes_no_output(tiny):
    model = build(tiny)
    ids = prompts(tiny)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    expected = expected_received(model, ids, mask)
    text_config = model.config.get_text_config()
    modes.apply(model, no_skip_mc_moe(model))
    seen = {}

    def record(module, args):
        seen[module.layer] = module.context.attention_received[module.layer]

    for wrapper in model._modes_patch.wrappers:
        wrapper.register_forward_pre_hook(record)
    with torch.no_grad():
        probed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(probed, plain)
    assert text_config._attn_implementation.startswith("modes_probe_")
    valid = mask.reshape(-1).bool()
    for layer, received in seen.items():
        torch.testing.assert_close(received[valid], expected[layer][valid], rtol=1e-4, atol=1e-6)
    modes.remove(model)
    assert text_config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)


def test_protection_happens_in_prefill_only_and_generate_still_works():
    tiny = next(t for t in TINY_MODELS if t.model_type == "qwen3_moe")
    model = build(tiny)
    info = modes.model_info(model)
    beta = {str(layer): 10.0 for layer in info.moe_layers}  # NAEE keeps only the top-1 expert
    plan = modes.SkipPlan(policy=McMoeConfig(beta=beta, protect=0.25), model=info)
    ids = prompts(tiny, batch=1, length=12)
    modes.apply(model, plan)
    with torch.no_grad():
        model(input_ids=ids)
    stats = modes.skip_stats(model)
    per_token = info.top_k - 1
    protected_tokens = 3  # ceil(0.25 * 12) per layer keep all k slots
    counted = stats["total_slots"] // info.top_k // len(info.moe_layers)
    assert stats["skipped_slots"] == len(info.moe_layers) * (counted - protected_tokens) * per_token
    modes.reset_stats(model)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 15)
    decode = modes.skip_stats(model)
    # the prefill again protects 3 tokens per layer; the two decode steps protect nothing
    assert decode["skipped_slots"] == stats["skipped_slots"] + 2 * len(info.moe_layers) * per_token
