"""The synthetic benchmark: deterministic, balanced, disjoint splits, covered by the tokenizer."""

from __future__ import annotations

from collections import Counter

from modes.bundled.build import build_tokenizer
from modes.data.benchmark import IMAGE_SKILLS, SKILLS, SPLITS, TEXT_SKILLS, generate_split, make_sample


def test_samples_are_deterministic():
    first, second = make_sample(12345), make_sample(12345)
    assert (first.question, first.answer, first.skill) == (second.question, second.answer, second.skill)
    assert first.image.tobytes() == second.image.tobytes()


def test_test_split_is_balanced_and_large_enough():
    test = generate_split("test")
    assert len(test) >= 1500
    counts = Counter(s.skill for s in test)
    assert set(counts) == set(SKILLS) and len(SKILLS) >= 6
    assert max(counts.values()) - min(counts.values()) <= 1
    assert all((s.image is None) == (s.skill in TEXT_SKILLS) for s in test)
    assert "count_plus" in IMAGE_SKILLS  # the skill that needs both modalities


def test_splits_use_disjoint_seeds():
    ranges = [range(first, first + count) for first, count in SPLITS.values()]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            assert a.stop <= b.start or b.stop <= a.start
    assert SPLITS["calibration"][1] == 1024


def test_tokenizer_covers_every_question_and_answer():
    tokenizer = build_tokenizer()
    for sample in generate_split("calibration", limit=400):
        ids = tokenizer(f"{sample.question} {sample.answer}", add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, sample
