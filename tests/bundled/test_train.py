"""The training script runs end to end on a tiny config and writes a loadable checkpoint."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForImageTextToText

import modes
from modes.bundled.train import train


def test_a_few_training_steps_write_a_checkpoint_the_auto_classes_load(tmp_path):
    summary = train(
        tmp_path,
        steps=3,
        batch_size=4,
        vision_steps=2,
        num_hidden_layers=1,
        num_experts=4,
        num_experts_per_tok=2,
    )
    assert summary["steps"] == 3
    log = json.loads((tmp_path / "training_log.json").read_text())["log"]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in log)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    processor = modes.load_processor(tmp_path)
    report = modes.evaluate(model, processor, modes.load_samples(split="test", limit=8), progress=False)
    assert 0.0 <= report["accuracy"] <= 1.0
    vision = model.model.visual.state_dict()
    second = train(tmp_path / "phase2", steps=2, batch_size=4, init=tmp_path)
    assert second["previous"]["steps"] == 3 and second["vision_steps"] == 0
    continued = AutoModelForImageTextToText.from_pretrained(tmp_path / "phase2", dtype=torch.float32)
    for name, tensor in continued.model.visual.state_dict().items():  # frozen in the second phase
        assert torch.equal(tensor, vision[name])
