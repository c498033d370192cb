"""Per-call token codes and what every MoE layer derives from them."""

from __future__ import annotations

import pytest
import torch

from modes.engine.tokens import OTHER, PAD, CallTokens, TokenContext, modality_code
from modes.engine.wrappers import SlotCounter

TEXT, IMAGE = modality_code("text"), modality_code("visual")


def test_call_tokens_never_skip_special_tokens_or_padding_and_count_no_padding():
    codes = torch.tensor([TEXT, IMAGE, IMAGE, OTHER, PAD, TEXT])
    tokens = CallTokens.of(codes)
    assert tokens.skippable.squeeze(1).tolist() == [True, True, True, False, False, True]
    assert tokens.counted_per_bin.tolist()[TEXT] == 2
    assert tokens.counted_per_bin.tolist()[IMAGE] == 2
    assert tokens.counted_per_bin.tolist()[OTHER] == 1  # padding folded into no bin's count


def test_slot_counter_counts_slots_per_modality():
    tokens = CallTokens.of(torch.tensor([TEXT, IMAGE, OTHER, PAD]))
    skip = torch.tensor([[True, False], [True, True], [False, False], [False, False]])
    counter = SlotCounter()
    counter.add(skip, tokens)
    counter.add(skip, tokens)
    assert counter.total.tolist()[TEXT] == 4 and counter.skipped.tolist()[TEXT] == 2
    assert counter.total.tolist()[IMAGE] == 4 and counter.skipped.tolist()[IMAGE] == 4
    assert counter.total.tolist()[OTHER] == 4 and counter.skipped.tolist()[OTHER] == 0


def test_tokens_are_derived_once_per_call_and_anew_for_the_next():
    context = TokenContext(media_ids={}, special_ids=torch.tensor([7]))
    context.set_from_ids(torch.tensor([[1, 7, 2]]))
    first = context.tokens_for(None, 3)
    assert context.tokens_for(None, 3) is first  # shared by every layer of the call
    context.set_from_ids(torch.tensor([[7, 1]]))
    assert context.tokens_for(None, 2).codes.tolist() == [OTHER, TEXT]
    with pytest.raises(RuntimeError, match="received 3 tokens"):
        context.tokens_for(None, 3)


def test_a_decode_step_codes_its_token_text_unless_it_is_special():
    """Generated tokens are never media, but a generated special token stays special, as a
    continuous-batching forward (which cannot tell generated tokens apart) codes it."""
    context = TokenContext(media_ids={"visual": torch.tensor([5])}, special_ids=torch.tensor([7]))
    context.set_from_ids(torch.tensor([[5], [7], [1]]), decoding=True)
    assert context.tokens_for(None, 3).codes.tolist() == [TEXT, OTHER, TEXT]
    context.set_from_ids(torch.tensor([[5, 7, 1]]))
    assert context.tokens_for(None, 3).codes.tolist() == [IMAGE, OTHER, TEXT]
