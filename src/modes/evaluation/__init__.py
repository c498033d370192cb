"""Evaluation: greedy exact-match accuracy with the realised skip ratios, and comparisons."""

from modes.evaluation.compare import compare
from modes.evaluation.evaluate import evaluate, generate_answers

__all__ = ["compare", "evaluate", "generate_answers"]
