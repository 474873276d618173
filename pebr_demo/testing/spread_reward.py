"""A reward with spread on random text, for tests of training loops.

The built-in rewards give a random-init model identical scores within a group
(format 0, length 1), so every advantage is exactly 0 and nothing trains. This one
scores the share of vowels among a completion's letters, which differs between
any two random completions.
"""

from __future__ import annotations

from typing import Any


class VowelShareReward:
    """Share of vowels among the letters of the completion (0 when it has no letters),
    or minus that share with `negate`: the same signal pointing the other way, so a test
    can tell a loop that optimises from one that drifts."""

    name = "vowel_share"

    def __init__(self, negate: bool = False) -> None:
        """
        Args:
            negate: score minus the vowel share, so that maximising it lowers the share.
        """
        self.negate = negate

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> list[float]:
        scores = [_vowel_share(_letters(text)) for text in completions]
        return [-s for s in scores] if self.negate else scores


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


class LeadingVowelReward:
    """A vowel as the first letter and consonants after it: 1[first letter is a vowel]
    x (1 - vowel share of the letters after it); 0 with no letters.

    Only a policy that treats the first position differently from the others scores
    high: vowels everywhere or consonants everywhere both score 0. That makes it a
    check of log-prob alignment: the first token is chosen by the prompt's last
    state, and a loss whose log-probs are misaligned by one token never credits that
    state, so it cannot learn the first position (a bag-of-tokens reward like
    `VowelShareReward` is raised by a misaligned loss too).
    """

    name = "leading_vowel"

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> list[float]:
        scores = []
        for text in completions:
            letters = _letters(text)
            leads = bool(letters) and letters[0] in "aeiou"
            scores.append(1.0 - _vowel_share(letters[1:]) if leads else 0.0)
        return scores


def _letters(text: str) -> list[str]:
    return [c for c in text.lower() if c.isalpha()]


def _vowel_share(letters: list[str]) -> float:
    """Share of vowels among `letters`; 0 for none."""
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0
