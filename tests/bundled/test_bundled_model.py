"""The shipped checkpoint loads offline through the transformers auto classes and keeps its accuracy."""

from __future__ import annotations

import json

import torch
from transformers import AutoConfig, AutoModelForImageTextToText

import modes
from modes.checkpoints import hub_layout_loading

SLICE = 200


def test_bundled_checkpoint_loads_offline_with_auto_classes(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = modes.bundled_model_path()
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen3_vl_moe"
    text = config.text_config
    assert text.num_hidden_layers >= 12 and text.num_experts >= 32 and text.num_experts_per_tok == 8
    with hub_layout_loading(path):  # square experts in Hub layout: tests/test_checkpoints.py
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert (path / "model.safetensors").stat().st_size <= 30 * 2**20


def test_the_card_places_the_model_in_the_regime_modes_targets():
    """Many MoE layers, many redundant visual tokens, few special tokens (measured on the test split)."""
    regime = json.loads((modes.bundled_model_path() / "eval_results.json").read_text())["regime"]
    assert regime["moe_layers"] >= 12 and regime["experts"] >= 32 and regime["top_k"] == 8
    assert regime["visual_tokens_per_image"] >= 36
    assert regime["visual_share_of_skippable_slots"] >= 0.5
    assert regime["special_share_of_all_slots"] <= 0.15


def test_accuracy_on_a_fixed_slice_matches_the_model_card(bundled):
    model, processor = bundled
    card = json.loads((modes.bundled_model_path() / "eval_results.json").read_text())
    report = modes.evaluate(model, processor, modes.load_samples(split="test", limit=SLICE), progress=False)
    assert abs(report["accuracy"] - card["slice_200"]["accuracy"]) <= 0.02
