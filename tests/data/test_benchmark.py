"""The synthetic benchmark: deterministic, balanced, disjoint splits, covered by the tokenizer."""

from __future__ import annotations

from collections import Counter

from modes.bundled.build import build_tokenizer
from modes.data.benchmark import (
    IMAGE_SKILLS,
    SKILLS,
    SPLITS,
    TEXT_SKILLS,
    TOKENS_PER_SIDE,
    generate_split,
    make_sample,
    token_labels,
)


def test_samples_are_deterministic():
    first, second = make_sample(12345), make_sample(12345)
    assert (first.question, first.answer, first.skill) == (second.question, second.answer, second.skill)
    assert first.image.tobytes() == second.image.tobytes()


def test_test_split_is_balanced_and_large_enough():
    test = generate_split("test")
    assert len(test) >= 1600
    counts = Counter(s.skill for s in test)
    assert set(counts) == set(SKILLS) and len(SKILLS) >= 8
    assert max(counts.values()) - min(counts.values()) <= 1
    assert all((s.image is None) == (s.skill in TEXT_SKILLS) for s in test)
    assert "count_plus" in IMAGE_SKILLS  # the skill that needs both modalities
    assert "relation" in IMAGE_SKILLS  # relations between two objects


def test_multi_step_text_skills_answer_with_two_or_more_tokens():
    for skill in ("transfer", "sequence"):
        assert skill in TEXT_SKILLS
        answers = [make_sample(seed, skill).answer for seed in range(50)]
        assert all(len(answer.split()) >= 2 for answer in answers), skill


def test_relation_answers_follow_the_scene():
    """'is the A left of the B' is yes exactly when A's grid column is smaller (and so on), and A
    and B each name one object of the scene."""
    from modes.data import benchmark

    for seed in range(200):
        rng = benchmark.random.Random(seed)
        scene = benchmark._random_scene(rng)
        while len(scene.unique_objects()) < 2:  # as make_sample does: two objects must be named
            scene = benchmark._random_scene(rng)
        question, answer = benchmark._relation(scene, rng)
        assert (question, answer) == (
            make_sample(seed, "relation").question,
            make_sample(seed, "relation").answer,
        )
        assert sum(" ".join(obj) in question for obj in scene.cells.values()) == 2
        words = question.removeprefix("is the ").removesuffix(" ?").split()
        relation = next(
            r for r in ("left of", "right of", "above", "below") if f" {r} " in f" {' '.join(words)} "
        )
        first, _, second = " ".join(words).partition(f" {relation} the ")
        cell = {" ".join(obj): c for c, obj in scene.cells.items()}
        (row_a, col_a), (row_b, col_b) = divmod(cell[first], 3), divmod(cell[second], 3)
        holds = {"left of": col_a < col_b, "right of": col_a > col_b, "above": row_a < row_b,
                 "below": row_a > row_b}[relation]  # fmt: skip
        assert answer == ("yes" if holds else "no"), (question, scene)


def test_relation_answers_are_yes_half_the_time():
    """A model that always says "no" must not pass for one that compares positions."""
    answers = [make_sample(seed, "relation").answer for seed in range(400)]
    assert 0.45 <= answers.count("yes") / len(answers) <= 0.55


def test_each_visual_token_is_labelled_with_the_object_of_its_grid_cell():
    image, colors, shapes = token_labels(7)
    assert image.size == (192, 192) and len(colors) == len(shapes) == TOKENS_PER_SIDE**2 == 36
    grid = [colors[i : i + TOKENS_PER_SIDE] for i in range(0, 36, TOKENS_PER_SIDE)]
    for row in range(0, TOKENS_PER_SIDE, 2):  # each object spans a 2 x 2 block of tokens
        for col in range(0, TOKENS_PER_SIDE, 2):
            block = {grid[row][col], grid[row][col + 1], grid[row + 1][col], grid[row + 1][col + 1]}
            assert len(block) == 1


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
