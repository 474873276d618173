"""Difficulty thresholds and grading, on hand-built cases."""

from __future__ import annotations

import pytest

from pebr_lightning.difficulty.sampler import tally
from pebr_lightning.difficulty.split import difficulty, histogram
from pebr_lightning.errors import PebrError
from pebr_lightning.rewards.accuracy import AccuracyReward


@pytest.mark.parametrize(
    ("correct", "easy_min", "hard_max", "expected"),
    [
        (8, None, 0, "easy"),  # paper default: easy = 8/8
        (7, None, 0, "medium"),
        (1, None, 0, "medium"),
        (0, None, 0, "hard"),  # paper default: hard = 0/8
        (6, 6, 0, "easy"),
        (5, 6, 0, "medium"),
        (2, 6, 2, "hard"),
        (3, 6, 2, "medium"),
    ],
)
def test_thresholds(correct, easy_min, hard_max, expected):
    assert difficulty(correct, 8, easy_min, hard_max) == expected


@pytest.mark.parametrize(("easy_min", "hard_max"), [(3, 3), (9, 0), (4, -1)])
def test_inconsistent_thresholds_are_refused(easy_min, hard_max):
    with pytest.raises(PebrError, match="hard_max < easy_min <= k"):
        difficulty(1, 8, easy_min, hard_max)


def test_histogram_counts_each_number_of_correct_rollouts():
    assert histogram([0, 4, 4, 2, 0, 4], 4) == [2, 0, 1, 0, 3]


def test_tally_grades_each_questions_own_completions():
    """k = 3. Question a (answer "B" of choices 1/2/3): "B" right, "C" wrong, "2" (the
    text of option B) right -> 2 correct. Question b (answer "4"): "4" and "4.0"
    right (equal numbers), "five" wrong -> 2. A question without a usable gold answer
    grades nothing: 0 correct, 3 ungraded."""
    records = [
        {"id": "a", "answer": "B", "choices": ["1", "2", "3"]},
        {"id": "b", "answer": "4"},
        {"id": "c", "answer": ""},
    ]
    said = ["B", "C", "2", "4", "4.0", "five", "1", "2", "3"]
    texts = [f"### The final answer is: {answer}" for answer in said]
    lines = tally(records, texts, 3, AccuracyReward())
    assert [(x["id"], x["correct"], x["ungraded"]) for x in lines] == [
        ("a", 2, 0),
        ("b", 2, 0),
        ("c", 0, 3),
    ]
