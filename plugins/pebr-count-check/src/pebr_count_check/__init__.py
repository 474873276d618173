"""pebr-count-check: reward descriptions whose counts match the scene.

An example pebr-lightning reward plugin (see the README for the wiring).
"""

from __future__ import annotations

import re
from typing import Any

from pebr_lightning.rewards.protocol import RewardOutput

__all__ = ["CountCheckReward"]

_NUMBER_WORDS = {
    "no": 0, "zero": 0, "one": 1, "a": 1, "an": 1, "two": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip
_TOTAL = re.compile(r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r")\s+(?:shape|object)s?\b", re.I)
_DESCRIPTION = re.compile(r"###\s*image description:(.*?)(?=###|\Z)", re.I | re.S)


class CountCheckReward:
    """Share of count checks the image description gets right (total + per shape kind).

    score = (checks passed) / (checks made), where the checks are: the stated total
    "N shapes" equals len(sample["shapes"]) (if require_total), and for every kind
    present, mentions of that kind in the description equal its count. None when the
    sample has no `shapes` field.
    """

    name = "count_check"

    def __init__(self, require_total: bool = True) -> None:
        """
        Args:
            require_total: also check the stated total ("3 shapes"); a description
                that states no total then fails that check.
        """
        self.require_total = require_total

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> RewardOutput:
        scores: list[float | None] = []
        total_ok: list[float | None] = []
        for completion, sample in zip(completions, samples, strict=True):
            shapes = sample.get("shapes")
            if not isinstance(shapes, list):
                scores.append(None)
                total_ok.append(None)
                continue
            text = _description(completion)
            checks = []
            if self.require_total:
                checks.append(_stated_total(text) == len(shapes))
                total_ok.append(float(checks[-1]))
            else:
                total_ok.append(None)
            for kind in sorted({s["kind"] for s in shapes}):
                expected = sum(s["kind"] == kind for s in shapes)
                checks.append(len(re.findall(rf"\b{re.escape(kind)}s?\b", text, re.I)) == expected)
            scores.append(sum(checks) / len(checks) if checks else None)
        return RewardOutput(scores=scores, components={"total_ok": total_ok})


def _description(completion: str) -> str:
    match = _DESCRIPTION.search(completion)
    return match.group(1) if match else ""


def _stated_total(text: str) -> int | None:
    match = _TOTAL.search(text)
    if match is None:
        return None
    word = match.group(1).lower()
    return int(word) if word.isdigit() else _NUMBER_WORDS[word]
