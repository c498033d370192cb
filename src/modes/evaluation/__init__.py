"""Evaluation: greedy exact-match accuracy with the realised skip ratio."""

from modes.evaluation.evaluate import evaluate, generate_answers

__all__ = ["evaluate", "generate_answers"]
