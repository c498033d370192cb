"""Each baseline rule on hand-made router outputs, and its plan through the one engine."""

from __future__ import annotations

import pytest
import torch

import modes
from modes.engine.policies import KReduction, NaeeRule
from modes.engine.rule import ThresholdRule
from modes.plan import PlanError
from tiny_models import TINY_MODELS, build, prompts

TEXT = torch.zeros(3, dtype=torch.long)


def test_k_reduction_keeps_the_top_k_prime_whatever_the_slot_order():
    pi = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.3, 0.2, 0.1], [0.05, 0.05, 0.1, 0.8]])
    skip = KReduction(keep=2).skip_mask(pi, TEXT)
    assert skip.tolist() == [
        [True, False, False, True],  # tie at 0.1: the earlier slot ranks first, both below top-2
        [False, False, True, True],
        [True, True, False, False],
    ]


def test_naee_skips_the_smallest_tail_below_beta_of_the_total():
    pi = torch.tensor([[0.6, 0.25, 0.1, 0.05], [0.3, 0.3, 0.2, 0.2], [0.97, 0.01, 0.01, 0.01]])
    skip = NaeeRule(beta=0.2).skip_mask(pi, TEXT)
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
    assert rule.skip_mask(pi, codes).tolist() == [[False, True], [False, False], [False, False]]


def test_baseline_plans_round_trip_and_apply():
    tiny = next(t for t in TINY_MODELS if t.model_type == "qwen3_vl_moe")
    model = build(tiny)
    info = modes.model_info(model)
    plan = modes.SkipPlan({}, {}, method="k_reduction", parameters={"keep": 1}, model=info)
    assert modes.SkipPlan.from_json(plan.to_json()) == plan
    modes.apply(model, plan)
    with torch.no_grad():
        model(input_ids=prompts(tiny))
    stats = modes.skip_stats(model)
    assert stats["per_modality"]["text"]["ratio"] == pytest.approx(1 - 1 / info.top_k)
    naee = modes.SkipPlan({}, {}, method="naee", parameters={"beta": {"0": 0.3, "1": 0.3}}, model=info)
    modes.apply(model, naee)
    with pytest.raises(PlanError, match="missing \\[1\\]"):
        modes.apply(model, modes.SkipPlan({}, {}, method="naee", parameters={"beta": {"0": 0.3}}, model=info))
    with pytest.raises(PlanError, match="unknown method"):
        modes.SkipPlan({}, {}, method="magic")


def test_renormalize_rescales_kept_weights_to_the_original_sum():
    from modes.engine.tokens import TokenContext
    from modes.engine.wrappers import SkippingExperts

    context = TokenContext(media_ids={}, special_ids=torch.tensor([], dtype=torch.long))
    context.set_all_text(2, torch.device("cpu"))
    rule = ThresholdRule(alpha={"text": 1.0}, tau={"text": 0.2})
    weights = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.4, 0.4, 0.1, 0.1]])
    plain = SkippingExperts(torch.nn.Identity(), layer=0, rule=rule, context=context)
    renormalizing = SkippingExperts(
        torch.nn.Identity(), layer=0, rule=rule, context=context, renormalize=True
    )
    skip, kept = plain.decide(weights)
    assert skip.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert torch.equal(kept, weights)  # off by default: the released code only zeroes skipped slots
    _, rescaled = renormalizing.decide(weights)
    torch.testing.assert_close(rescaled.sum(1), weights.sum(1))
    torch.testing.assert_close(rescaled[0, :2], torch.tensor([0.625, 0.375]))
