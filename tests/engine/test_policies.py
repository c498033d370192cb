"""Each baseline rule on hand-made router outputs, and its plan through the one engine."""

from __future__ import annotations

import pytest
import torch

import modes
from modes.engine.rules import (
    DiepRule,
    KReduction,
    McMoeRule,
    NaeeRule,
    Routing,
    ThresholdRule,
    protected_tokens,
)
from modes.engine.tokens import PAD
from modes.errors import PlanError
from modes.policies import DiepConfig, KReductionConfig, NaeeConfig
from tiny_models import TINY_MODELS, build, prompts


def test_k_reduction_keeps_the_top_k_prime_whatever_the_slot_order():
    pi = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.3, 0.2, 0.1], [0.05, 0.05, 0.1, 0.8]])
    skip = KReduction(keep=2).skip_mask(Routing.of(pi))
    assert skip.tolist() == [
        [True, False, False, True],  # tie at 0.1: the earlier slot ranks first, both below top-2
        [False, False, True, True],
        [True, True, False, False],
    ]


def test_naee_skips_the_smallest_tail_below_beta_of_the_total():
    pi = torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.3, 0.3, 0.2, 0.2], [0.97, 0.01, 0.01, 0.01]])
    skip = NaeeRule(beta=0.2).skip_mask(Routing.of(pi))
    # row 0: tails from rank 2 = 0.40, 0.15, 0.05 -> ranks 3, 4 are below 0.2
    # row 1: tails 0.7, 0.4, 0.2 -> nothing strictly below 0.2
    # row 2: tails 0.03 ... -> ranks 2..4, never the top-1
    assert skip.tolist() == [
        [False, False, True, True],
        [False, False, False, False],
        [False, True, True, True],
    ]


def test_modes_rule_uses_the_modality_of_each_token():
    rule = ThresholdRule(alpha={"text": 0.5, "visual": 2.0}, tau={"text": 0.1, "visual": 0.1})
    pi = torch.tensor([[0.3, 0.15], [0.3, 0.15], [0.01, 0.01]])
    codes = torch.tensor([0, 1, 3])  # text, visual, special
    assert rule.skip_mask(Routing.of(pi, codes)).tolist() == [[False, True], [False, False], [False, False]]


def test_baseline_plans_round_trip_and_apply():
    tiny = next(t for t in TINY_MODELS if t.model_type == "qwen3_vl_moe")
    model = build(tiny)
    info = modes.model_info(model)
    plan = modes.SkipPlan(policy=KReductionConfig(keep=1), model=info)
    assert modes.SkipPlan.from_json(plan.to_json()) == plan
    modes.apply(model, plan)
    with torch.no_grad():
        model(input_ids=prompts(tiny))
    stats = modes.skip_stats(model)
    assert stats["per_modality"]["text"]["ratio"] == pytest.approx(1 - 1 / info.top_k)
    naee = modes.SkipPlan(policy=NaeeConfig(beta={0: 0.3, 1: 0.3}), model=info)
    modes.apply(model, naee)
    with pytest.raises(PlanError, match="missing \\[1\\]"):
        modes.apply(model, modes.SkipPlan(policy=NaeeConfig(beta={0: 0.3}), model=info))
    with pytest.raises(PlanError, match="unknown method"):
        modes.SkipPlan.from_json({**plan.to_json(), "policy": {"name": "magic"}})


def test_renormalize_rescales_kept_weights_to_the_original_sum():
    from modes.engine.tokens import TokenContext
    from modes.engine.wrappers import SkippingExperts

    context = TokenContext(media_ids={}, special_ids=torch.tensor([], dtype=torch.long))
    context.set_all_text(1, 2, torch.device("cpu"))
    rule = ThresholdRule(alpha={"text": 1.0}, tau={"text": 0.2})
    weights = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.4, 0.4, 0.1, 0.1]])
    plain = SkippingExperts(torch.nn.Identity(), layer=0, rule=rule, context=context)
    renormalizing = SkippingExperts(
        torch.nn.Identity(), layer=0, rule=rule, context=context, renormalize=True
    )
    skip, kept = plain.decide(torch.zeros(2, 1), torch.zeros(2, 4, dtype=torch.long), weights)
    assert skip.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert torch.equal(kept, weights)  # off by default: the released code only zeroes skipped slots
    _, rescaled = renormalizing.decide(torch.zeros(2, 1), torch.zeros(2, 4, dtype=torch.long), weights)
    torch.testing.assert_close(rescaled.sum(1), weights.sum(1))
    torch.testing.assert_close(rescaled[0, :2], torch.tensor([0.625, 0.375]))


def test_mc_moe_protects_each_sequences_most_important_tokens_in_prefill():
    # two sequences of 3 tokens (the first row is padding), every token's NAEE rule skips 2 slots
    pi = torch.tensor([[0.9, 0.05, 0.03, 0.02]]).repeat(6, 1)
    codes = torch.tensor([PAD, 0, 1, 0, 0, 0])
    hidden = torch.tensor([[9.0], [1.0], [2.0], [1.0], [1.0], [1.0]])  # ||x||_1
    received = torch.tensor([1.0, 0.5, 0.4, 0.1, 0.3, 0.2])  # importance 9 (pad), .5, .8, .1, .3, .2
    sequence = torch.tensor([0, 0, 0, 1, 1, 1])
    routing = Routing(pi, torch.arange(4).expand(6, 4), codes, hidden, received, sequence)
    # 2% of 2 (or 3) valid tokens rounds up to one per sequence: the visual token of sequence 0
    # (0.8 beats 0.5; padding never counts) and the second token of sequence 1 (0.3)
    assert protected_tokens(routing, 0.02).tolist() == [False, False, True, False, True, False]
    assert protected_tokens(routing, 0.5).tolist() == [
        False,
        False,
        True,
        False,
        True,
        True,
    ]  # 1 of 2, 2 of 3
    skip = McMoeRule(beta=0.1).skip_mask(routing)
    naee = NaeeRule(beta=0.1).skip_mask(routing)
    assert naee.sum(1).tolist() == [2] * 6
    assert skip.sum(1).tolist() == [2, 2, 0, 2, 0, 2]
    decode = Routing(pi, routing.index, codes, hidden)  # no attention scores: plain NAEE
    assert torch.equal(McMoeRule(beta=0.1).skip_mask(decode), naee)


def test_diep_scales_the_threshold_by_the_similarity_of_each_expert_to_the_top_one():
    gamma2 = torch.ones(4, 4)
    gamma2[2, 3] = 3.0  # expert 3 is much like expert 2
    gamma2[2, 1] = 0.1  # expert 1 is unlike expert 2
    pi = torch.tensor([[0.1, 0.5, 0.25, 0.15], [0.5, 0.1, 0.25, 0.15]])
    index = torch.tensor([[1, 2, 3, 0], [2, 1, 3, 0]])  # top-1 is expert 2 in both rows
    skip = DiepRule(gamma1=0.4, gamma2=gamma2).skip_mask(Routing(pi, index, torch.zeros(2, dtype=torch.long)))
    # thresholds relative to the top weight 0.5: expert 1 -> 0.02, expert 3 -> 0.6, expert 0 -> 0.2
    assert skip.tolist() == [[False, False, True, True], [False, False, True, True]]
    unlike = DiepRule(gamma1=0.4, gamma2=torch.ones(4, 4)).skip_mask(
        Routing(pi, index, torch.zeros(2, dtype=torch.long))
    )
    assert unlike.tolist() == [[True, False, False, True], [False, True, False, True]]


def test_diep_plan_checks_its_table_against_the_model():
    tiny = next(t for t in TINY_MODELS if t.model_type == "qwen3_vl_moe")
    model = build(tiny)
    info = modes.model_info(model)
    table = torch.ones(info.num_experts, info.num_experts).tolist()
    layers = {str(layer): 0.5 for layer in info.moe_layers}
    plan = modes.SkipPlan(policy=DiepConfig(gamma1=layers, cka=dict.fromkeys(layers, table)), model=info)
    assert modes.SkipPlan.from_json(plan.to_json()) == plan
    modes.apply(model, plan)
    with torch.no_grad():
        model(input_ids=prompts(tiny))
    assert modes.skip_stats(model)["ratio"] > 0
    modes.remove(model)
    small = torch.ones(2, 2).tolist()
    with pytest.raises(PlanError, match=f"tables have \\[2\\] experts but the model has {info.num_experts}"):
        wrong = DiepConfig(gamma1=layers, cka=dict.fromkeys(layers, small))
        modes.apply(model, modes.SkipPlan(policy=wrong, model=info))
    with pytest.raises(PlanError, match="one \\[E x E\\] table for each"):
        DiepConfig(gamma1=layers, cka={})
