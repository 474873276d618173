"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear 0 -> 1 over `warmup_steps`, then cosine 1 -> `min_ratio`.

    warmup_cosine(0, 100, 10) == 0.0; (10, 100, 10) == 1.0; (100, 100, 10) == min_ratio.
    Steps past `total_steps` stay at `min_ratio`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
