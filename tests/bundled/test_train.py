"""The training script runs end to end on a tiny config and writes a checkpoint in Hub layout."""

from __future__ import annotations

import json

import pytest
import torch

import modes
from modes.bundled.train import _training_batch, parse_skill_weights, train
from modes.checkpoints import stores_hub_layout
from modes.data.benchmark import SKILLS


def test_a_few_training_steps_write_a_hub_layout_checkpoint_modes_loads(tmp_path):
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
    assert stores_hub_layout(tmp_path)
    model, processor = modes.load_model(tmp_path)
    report = modes.evaluate(model, processor, modes.load_samples(split="test", limit=8), progress=False)
    assert 0.0 <= report["accuracy"] <= 1.0
    vision = model.model.visual.state_dict()
    second = train(tmp_path / "phase2", steps=2, batch_size=4, init=tmp_path)
    assert second["previous"]["steps"] == 3 and second["vision_steps"] == 0
    continued, _ = modes.load_model(tmp_path / "phase2")
    for name, tensor in continued.model.visual.state_dict().items():  # frozen in the second phase
        assert torch.equal(tensor, vision[name])


def test_skill_weights_choose_the_skills_of_a_training_batch():
    generator = torch.Generator().manual_seed(0)
    only_exists = parse_skill_weights(",".join(f"{s}=0" for s in SKILLS if s != "exists"))
    batch = _training_batch(list(range(16)), generator, only_exists)
    assert {sample.skill for sample in batch} == {"exists"}
    assert len({sample.question for sample in batch}) > 1  # seeds still vary the scenes
    balanced = _training_batch(list(range(16)), generator, None)
    assert [s.skill for s in balanced] == [SKILLS[i % len(SKILLS)] for i in range(16)]


@pytest.mark.parametrize("text", ["exist=2", "exists", "exists=-1", ",".join(f"{s}=0" for s in SKILLS)])
def test_bad_skill_weights_are_rejected_with_the_skill_list(text):
    with pytest.raises(ValueError, match="skill"):
        parse_skill_weights(text)


TINY_PHASE = dict(steps=6, batch_size=2, vision_steps=1, save_every=2, log_every=1,
                  num_hidden_layers=1, num_experts=4, num_experts_per_tok=2)  # fmt: skip


def train_until_killed_after_step_4(out, monkeypatch) -> None:
    """`train(out, **TINY_PHASE)` stopped right after its save at step 4, as a kill would."""
    from modes.bundled import train as training

    save = training.ResumeState.save

    def save_then_stop(self, *args):
        save(self, *args)
        if self.step == 4:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training.ResumeState, "save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(out, **TINY_PHASE)


def test_a_phase_stopped_midway_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed after a save, the same command continues from it and ends where an uninterrupted
    run ends, bit for bit (weights, log); a rerun with other settings is refused."""
    from safetensors.torch import load_file

    train(tmp_path / "whole", **TINY_PHASE)
    train_until_killed_after_step_4(tmp_path / "parts", monkeypatch)
    with pytest.raises(ValueError, match="other settings"):
        train(tmp_path / "parts", **{**TINY_PHASE, "lr": 1e-4})
    train(tmp_path / "parts", **TINY_PHASE)
    whole, parts = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "parts"))
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    logs = [json.loads((tmp_path / n / "training_log.json").read_text())["log"] for n in ("whole", "parts")]
    assert logs[0] == logs[1]
    assert not (tmp_path / "parts" / "resume").exists()  # the finished phase leaves no state behind


def test_a_stopped_phase_exports_a_checkpoint_a_new_phase_starts_from(tmp_path, monkeypatch):
    from modes.bundled.train import export_partial

    train_until_killed_after_step_4(tmp_path / "phase1", monkeypatch)
    summary = export_partial(tmp_path / "phase1", tmp_path / "partial")
    assert (summary["steps_done"], summary["steps"]) == (4, 6)
    second = train(tmp_path / "phase2", steps=2, batch_size=2, init=tmp_path / "partial")
    assert second["previous"]["steps_done"] == 4
