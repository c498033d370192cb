"""A plan applied to a model dispatched by accelerate (hooks that load offloaded weights per
call, from CPU memory or from disk) gives the plain model's logits and skip counts."""

from __future__ import annotations

import copy

import pytest
import torch

import modes
from modes.loading import input_device
from plans import uniform_plan

accelerate = pytest.importorskip("accelerate")


def offloaded(model, how: str, folder):
    twin = copy.deepcopy(model)
    if how == "cpu":
        return accelerate.cpu_offload(twin, execution_device=torch.device("cpu"))
    return accelerate.disk_offload(twin, offload_dir=str(folder), execution_device=torch.device("cpu"))


@pytest.mark.parametrize("how", ["cpu", "disk"])
def test_offloaded_model_skips_exactly_like_the_plain_one(bundled, how, tmp_path):
    model, processor = bundled
    samples = modes.load_samples(split="test", limit=8)
    plan = uniform_plan(model, 0.01, processor.tokenizer.all_special_ids)
    from modes.data.encoding import encode_prompts

    inputs = encode_prompts(processor, [s for s in samples if s.image is not None][:4])
    dispatched = offloaded(model, how, tmp_path)
    assert any(p.device.type == "meta" for p in dispatched.parameters())  # weights really offloaded
    assert input_device(dispatched).type == "cpu"
    with torch.no_grad(), modes.applied(model, plan):
        expected = model(**inputs).logits
        expected_stats = modes.skip_stats(model)
    with torch.no_grad(), modes.applied(dispatched, plan):
        got = dispatched(**inputs).logits
        got_stats = modes.skip_stats(dispatched)
    assert 0 < got_stats["ratio"] < 1
    assert got_stats == expected_stats
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    report = modes.evaluate(dispatched, processor, samples, plan=plan, progress=False)
    assert (
        report["answers"] == modes.evaluate(model, processor, samples, plan=plan, progress=False)["answers"]
    )


def test_calibrating_a_dispatched_model_keeps_its_hooks_and_gives_the_plain_alphas(bundled, tmp_path):
    """Prefix replay swaps modules' ``forward`` for a while; accelerate's hooks live there too
    and must be back afterwards (the replay used to delete them)."""
    model, processor = bundled
    samples = modes.load_samples(split="calibration", limit=8)
    dispatched, _ = modes.load_model(device_map="auto", max_memory={"cpu": "20MB"}, offload_folder=tmp_path)
    assert "disk" in dispatched.hf_device_map.values()  # the later layers really offloaded
    hooked = {
        name: module.forward for name, module in dispatched.named_modules() if "forward" in module.__dict__
    }
    assert "model.language_model.layers.0" in hooked  # accelerate wrapped the decoder layers' forward
    got = modes.calibrate(dispatched, processor, samples, batch_size=4, progress=False)
    expected = modes.calibrate(model, processor, samples, batch_size=4, progress=False)
    assert {
        name: m.__dict__.get("forward") for name, m in dispatched.named_modules() if name in hooked
    } == hooked
    for layer, by_modality in expected.alphas.items():
        for modality, alpha in by_modality.items():  # float noise of near-zero KLs, as in test_semantics
            assert got.alphas[layer][modality] == pytest.approx(alpha, rel=2e-3, abs=2e-5)
