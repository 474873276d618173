"""A reward with spread on random text, for tests of training loops.

The built-in rewards give a random-init model identical scores within a group
(format 0, length 1), so every advantage is exactly 0 and nothing trains. This one
scores the share of vowels among a completion's letters, which differs between
any two random completions.
"""

from __future__ import annotations

from typing import Any


class VowelShareReward:
    """Share of vowels among the letters of the completion (0 when it has no letters)."""

    name = "vowel_share"

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> list[float]:
        scores = []
        for text in completions:
            letters = [c for c in text.lower() if c.isalpha()]
            scores.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
        return scores


class GroupPositionReward:
    """Scores a completion by its position within its group (0, 1/G, 2/G, ...).

    Every group then has spread whatever the text, so a GRPO step always runs its
    full update: for benchmarks that measure that update on random weights, whose
    completions often decode to nothing. Groups are runs of the same sample id.
    """

    name = "group_position"

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> list[float]:
        scores, position, previous = [], 0, None
        for sample in samples:
            position = position + 1 if sample["id"] == previous else 0
            previous = sample["id"]
            scores.append(float(position))
        top = max(scores, default=0.0) or 1.0
        return [s / top for s in scores]
