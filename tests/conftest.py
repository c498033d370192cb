"""Shared fixtures: the bundled model is loaded once per session (tests must not mutate it)."""

from __future__ import annotations

import pytest
import torch

import modes


@pytest.fixture(scope="session")
def bundled():
    """(model, processor) of the shipped checkpoint, float32, eval mode."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return modes.load_model()


@pytest.fixture(scope="session")
def small_vlm(bundled):
    """A random 3-layer Qwen3-VL-MoE with the bundled processor: cheap calibration and search checks."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from modes.bundled.build import model_config

    _, processor = bundled
    torch.manual_seed(0)
    config = model_config(processor.tokenizer, num_hidden_layers=3, num_experts=8, num_experts_per_tok=4)
    return Qwen3VLMoeForConditionalGeneration(config).eval(), processor
