"""SkipPlan: JSON round trip, validation of its own data and of the model it is applied to."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import modes
from modes import PlanError, SkipPlan
from tiny_models import TINY_MODELS, build

QWEN3_MOE = next(t for t in TINY_MODELS if t.model_type == "qwen3_moe")


def plan_for(network, **overrides) -> SkipPlan:
    info = modes.model_info(network)
    fields = dict(
        importance={layer: {"text": 0.5} for layer in info.moe_layers},
        thresholds={"text": 0.1},
        model=info,
        target_ratio=0.5,
        achieved_ratio=0.49,
        provenance={"samples": 8},
    )
    return SkipPlan(**{**fields, **overrides})


def test_json_round_trip(tmp_path):
    plan = plan_for(build(QWEN3_MOE), renormalize=True)
    path = plan.save(tmp_path / "plan.json")
    loaded = SkipPlan.load(path)
    assert loaded == plan
    assert json.loads(path.read_text())["format_version"] == 2
    assert not list(tmp_path.glob(".*tmp")), "atomic write leaves no temporary file"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"thresholds": {"text": -0.1}}, "finite and >= 0"),
        ({"thresholds": {"text": float("nan")}}, "finite and >= 0"),
        ({"thresholds": {"smell": 0.1}}, "unknown modality 'smell'"),
        ({"thresholds": {}}, "no thresholds"),
        ({"importance": {0: {"text": float("inf")}, 1: {"text": 0.1}}}, "finite"),
        (
            {"importance": {0: {"text": 0.5}, 1: {"text": 0.5}}, "thresholds": {"text": 0.1, "visual": 0.1}},
            "no alpha",
        ),
        ({"importance": {0: {"text": "high"}, 1: {"text": 0.1}}}, "must be a number"),
    ],
)
def test_malformed_plans_are_refused_with_the_reason(fields, message):
    with pytest.raises(PlanError, match=message):
        plan_for(build(QWEN3_MOE), **fields)


def test_load_refuses_other_files_and_versions(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        SkipPlan.load(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(PlanError, match="not a modes plan"):
        SkipPlan.load(path)
    data = plan_for(build(QWEN3_MOE)).to_json() | {"format_version": 99}
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="format_version 99"):
        SkipPlan.load(path)


def test_plan_for_another_model_is_refused():
    model = build(QWEN3_MOE)
    with pytest.raises(PlanError, match="missing \\[1\\]"):
        modes.apply(model, plan_for(model, importance={0: {"text": 0.5}}, model=None))
    other = modes.ModelInfo("mixtral", (0, 1), 8, 4)
    with pytest.raises(PlanError, match="model_type='mixtral'"):
        modes.apply(model, plan_for(model, model=other))
    bigger = modes.ModelInfo("qwen3_moe", (0, 1), 16, 4)
    with pytest.raises(PlanError, match="num_experts=16"):
        modes.apply(model, plan_for(model, model=bigger))
    assert not modes.engine.is_patched(model)


def test_unsupported_model_names_the_supported_ones():
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(modes.UnsupportedModelError, match=r"'llama'.*qwen3_vl_moe"):
        modes.apply(model, SkipPlan(importance={0: {"text": 1.0}}, thresholds={"text": 0.1}))


def test_apply_twice_replaces_and_models_do_not_share_state():
    first, second = build(QWEN3_MOE), build(QWEN3_MOE)
    modes.apply(first, plan_for(first, thresholds={"text": 1.0}))
    modes.apply(first, plan_for(first, thresholds={"text": 0.0}))
    modes.apply(second, plan_for(second, thresholds={"text": 1.0}))
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        first(input_ids=ids)
        second(input_ids=ids)
    assert modes.skip_stats(first)["ratio"] == 0.0
    assert modes.skip_stats(second)["ratio"] == 1.0
    modes.remove(first)
    with pytest.raises(ValueError, match="not patched"):
        modes.remove(first)


def test_format_1_files_still_load():
    """Plans written before policies were typed: MoDES fields at the top, baselines as method +
    parameters."""
    model = build(QWEN3_MOE)
    info = modes.model_info(model)
    modes_v1 = {
        "format": "modes.SkipPlan", "format_version": 1, "model": info.to_json(),
        "thresholds": {"text": 0.1}, "importance": {"0": {"text": 0.5}, "1": {"text": 0.5}},
        "renormalize": False, "method": "modes", "parameters": {}, "target_ratio": 0.5,
        "achieved_ratio": 0.49, "provenance": {"samples": 8},
    }  # fmt: skip
    plan = SkipPlan.from_json(modes_v1)
    expected = plan_for(model)
    expected.target_of = modes.TargetOf.ALL  # format 1 had no target_of: its ratios were of all slots
    assert plan == expected
    naee_v1 = {**modes_v1, "thresholds": {}, "importance": {}, "method": "naee",
               "parameters": {"beta": {"0": 0.3, "1": 0.3}, "scale": 2.0}}  # fmt: skip
    naee = SkipPlan.from_json(naee_v1)
    assert naee.policy == modes.policies.NaeeConfig({0: 0.3, 1: 0.3}, 2.0)
    modes.apply(model, naee)
    assert modes.engine.is_patched(model)
    assert SkipPlan.from_json(naee.to_json()) == naee  # and written back as format 2


def test_target_of_speaks_one_vocabulary(tmp_path):
    """A plan's target is of the skippable slots unless it says otherwise, as a search's is;
    files written before the key existed meant all slots; a wrong word is refused on load."""
    plan = modes.SkipPlan({0: {"text": 1.0}}, {"text": 0.1}, target_ratio=0.5)
    assert plan.target_of is modes.TargetOf.SKIPPABLE and plan.target_of == "skippable"
    data = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert data["target_of"] == "skippable"
    del data["target_of"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert modes.SkipPlan.load(tmp_path / "old.json").target_of is modes.TargetOf.ALL
    data["target_of"] = "most"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(modes.PlanError, match="target_of must be one of"):
        modes.SkipPlan.load(tmp_path / "bad.json")
    ratios = modes.SkipRatios(skippable=0.8, all=0.7)
    assert (ratios.of("skippable"), ratios.of(modes.TargetOf.ALL)) == (0.8, 0.7)
