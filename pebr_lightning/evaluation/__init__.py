"""Evaluation: greedy answers on a manifest, graded by the accuracy reward, by question type."""

from pebr_lightning.evaluation.greedy import evaluate, grade_answers, greedy_answers

__all__ = ["evaluate", "grade_answers", "greedy_answers"]
