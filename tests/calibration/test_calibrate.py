"""Calibration: prefix replay gives the plain per-layer alphas; normalisation; shared mode."""

from __future__ import annotations

import pytest

import modes
from modes.calibration import Importance, calibrate


@pytest.fixture(scope="module")
def samples():
    return modes.load_samples(split="calibration", limit=24)


def test_prefix_replay_matches_plain_forward(small_vlm, samples):
    model, processor = small_vlm
    replayed = calibrate(model, processor, samples, batch_size=8, reuse_prefix=True, progress=False)
    plain = calibrate(model, processor, samples, batch_size=8, reuse_prefix=False, progress=False)
    assert replayed.raw_kl.keys() == plain.raw_kl.keys()
    for layer, by_modality in plain.raw_kl.items():
        for modality, value in by_modality.items():
            assert replayed.raw_kl[layer][modality] == pytest.approx(value, rel=1e-5, abs=1e-12)
    assert not modes.engine.is_patched(model)


def test_alphas_are_normalised_per_modality_and_round_trip(small_vlm, samples, tmp_path):
    model, processor = small_vlm
    importance = calibrate(model, processor, samples, batch_size=8, progress=False)
    assert importance.modalities == ("text", "visual")
    assert set(importance.alphas) == set(modes.model_info(model).moe_layers)
    for modality in importance.modalities:
        assert sum(a[modality] for a in importance.alphas.values()) == pytest.approx(1.0)
        assert all(a[modality] >= 0 for a in importance.alphas.values())
    # the last layer's experts on visual tokens cannot change any answer logit; the knocked
    # forward runs its matmuls on fewer rows, and a CPU may pick another kernel for that shape,
    # so the text rows can move by float32 rounding (logits ~1e-6 apart give a KL ~1e-12 per
    # token): zero up to that noise, and negligible against every layer that matters
    largest = max(kl for by_modality in importance.raw_kl.values() for kl in by_modality.values())
    assert importance.raw_kl[max(importance.alphas)]["visual"] < min(1e-9, 1e-6 * largest)
    again = Importance.load(importance.save(tmp_path / "importance.json"))
    assert again.alphas == importance.alphas and again.mode == "per_modality"


def test_shared_mode_gives_one_alpha_per_layer(small_vlm, samples):
    model, processor = small_vlm
    importance = calibrate(model, processor, samples, mode="shared", batch_size=8, progress=False)
    for alphas in importance.alphas.values():
        assert alphas["text"] == alphas["visual"]
    with pytest.raises(ValueError, match="per_modality"):
        calibrate(model, processor, samples, mode="global")
