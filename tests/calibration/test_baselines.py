"""The baselines' calibrators on every family: NAEE's beta (also MC-MoE's, and DiEP's gamma1)
read the routing however the family hands it to its experts (positionally, by name as GPT-OSS
does), each baseline reaches its target by bisection, and DiEP's table covers every layer."""

from __future__ import annotations

import pytest
import torch

import modes
from modes.adapters import UnsupportedModelError
from modes.calibration import CalibrationSet
from modes.calibration.baselines import median_top2_ratio, scaled_to_target
from modes.calibration.kl import CalibrationBatch
from modes.calibration.similarity import expert_similarity
from modes.policies import DiepConfig, McMoeConfig, NaeeConfig
from tiny_models import TINY_MODELS, TinyModel, build, call_kwargs, prompts

FAMILIES = [pytest.param(tiny, id=tiny.model_type) for tiny in TINY_MODELS]


def calibration_of(tiny: TinyModel) -> CalibrationSet:
    """Two batches of random prompts, the first left-padded, scoring the last two positions."""
    batches = []
    for seed in (1, 2):
        ids = prompts(tiny, batch=3, length=12, seed=seed)
        mask = torch.ones_like(ids)
        if seed == 1:
            ids[0, :3], mask[0, :3] = 0, 0
        scored = torch.zeros_like(ids, dtype=torch.bool)
        scored[:, -3:-1] = True
        batches.append(CalibrationBatch(call_kwargs(tiny, ids, mask), scored))
    return CalibrationSet(batches, "modes", samples=(), batch_size=3, fingerprint=tiny.model_type)


def routing_weights_seen(model) -> dict[int, list[torch.Tensor]]:
    """An independent reading: each experts module's routing weights, positional or named."""
    seen: dict[int, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name.endswith("experts") and hasattr(module, "has_gate"):
            layer = int(name.split(".layers.")[1].split(".")[0])

            def hook(module, args, kwargs, layer=layer):
                weights = (
                    args[2] if len(args) > 2 else kwargs.get("routing_weights", kwargs.get("top_k_weights"))
                )
                seen.setdefault(layer, []).append(weights.detach().float())

            module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("tiny", FAMILIES)
def test_baselines_calibrate_on_every_family(tiny):
    model = build(tiny)
    calibration = calibration_of(tiny)
    info = modes.model_info(model)
    if info.top_k < 2:
        with pytest.raises(UnsupportedModelError, match="top-k >= 2"):
            median_top2_ratio(model, calibration)
        return
    betas = median_top2_ratio(model, calibration)
    assert set(betas) == set(info.moe_layers)
    reference_model = build(tiny)
    seen = routing_weights_seen(reference_model)
    with torch.no_grad():
        for batch in calibration.batches:
            reference_model(**batch.inputs, use_cache=False)
    for layer, weights in seen.items():
        top = torch.cat(weights).topk(2, dim=1).values  # [T, 2]
        assert betas[layer] == pytest.approx(float((top[:, 1] / top[:, 0]).median()), rel=1e-6)

    configs = {
        "naee": lambda scale: NaeeConfig(betas, scale),
        "mc_moe": lambda scale: McMoeConfig(betas, scale, protect=0.02),
    }
    if not modes.adapters.spec_for(tiny.model_type).dense_router:
        tables = expert_similarity(model, calibration.batches, tokens_per_layer=16)
        assert set(tables) == {str(layer) for layer in info.moe_layers}
        configs["diep"] = lambda scale: DiepConfig(betas, tables, scale)
    sites = modes.engine.moe_sites(model)
    decoder_layers = modes.engine.decoder_layers(model, [site.name for site in sites])
    if any(getattr(decoder_layers[site.layer], "self_attn", None) is None for site in sites):
        # a MoE layer with linear attention has no attention scores for MC-MoE to protect by
        with pytest.raises(UnsupportedModelError, match="token protection"):
            scaled_to_target(model, None, calibration, configs.pop("mc_moe"), 0.4, info)
        assert not modes.engine.is_patched(model)  # the refused apply left nothing behind
    for name, config_at in configs.items():
        plan = scaled_to_target(model, None, calibration, config_at, 0.4, info)
        assert plan.achieved_ratio >= 0.4, name
        assert not modes.engine.is_patched(model)
