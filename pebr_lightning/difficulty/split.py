"""Which split a question goes to, from how many of its k rollouts were correct.

The paper keeps questions the SFT model always solves (Easy) for perception RL,
those it sometimes solves (Medium) for reasoning RL, and leaves the rest (Hard).
"""

from __future__ import annotations

from collections.abc import Iterable

from pebr_lightning.errors import PebrError

SPLITS = ("easy", "medium", "hard")


def check_thresholds(k: int, easy_min: int | None, hard_max: int) -> int:
    """Validate the thresholds for k rollouts; returns easy_min (default k: all correct)."""
    easy = k if easy_min is None else easy_min
    if k < 1:
        raise PebrError(f"sample: k must be >= 1, got {k}")
    if not 0 <= hard_max < easy <= k:
        raise PebrError(
            f"sample: thresholds need 0 <= hard_max < easy_min <= k; got hard_max={hard_max},"
            f" easy_min={easy}, k={k}"
        )
    return easy


def difficulty(correct: int, k: int, easy_min: int | None = None, hard_max: int = 0) -> str:
    """ "easy" when correct >= easy_min (default k), "hard" when correct <= hard_max,
    otherwise "medium"."""
    easy = check_thresholds(k, easy_min, hard_max)
    if not 0 <= correct <= k:
        raise PebrError(f"sample: correct count {correct} is outside 0..{k}")
    if correct >= easy:
        return "easy"
    if correct <= hard_max:
        return "hard"
    return "medium"


def histogram(correct_counts: Iterable[int], k: int) -> list[int]:
    """[k+1]: how many questions had 0, 1, ..., k correct rollouts."""
    bins = [0] * (k + 1)
    for count in correct_counts:
        bins[count] += 1
    return bins


def format_summary(summary: dict) -> str:
    """Counts per split and the histogram of correct rollouts, as plain lines."""
    n = max(summary["questions"], 1)
    lines = [f"{summary['questions']} questions, k = {summary['k']}"]
    lines += [
        f"  {name:<6} {summary['counts'][name]:>6}  ({summary['counts'][name] / n:.1%})"
        for name in SPLITS
    ]
    lines.append(
        "  correct of k: " + "  ".join(f"{i}:{c}" for i, c in enumerate(summary["histogram"]))
    )
    return "\n".join(lines)
