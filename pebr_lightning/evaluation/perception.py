"""Did the description see the picture right? Perception metrics on the synthetic shapes.

Held-out accuracy tells whether the final answer is right; it does not tell whether
the model *perceived* the image, which is what Stage 1 (perception RL) trains. For a
record that carries its ground-truth `shapes` (the synthetic set does, docs/data.md),
the response's "### Image Description:" section is read back into the shapes it
names ("a red circle", "a blue square", ...) and compared with the truth:

- count: the description names exactly as many shapes as the picture has;
- colours: the colours it names, as a multiset, are the picture's colours.

Records without `shapes` (real data) are left out of both.

    pebr eval --model M --manifest data/demo/test/manifest.jsonl --out eval/
    (metrics.json gains perception/count and perception/colours)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pebr_lightning.data.synth import COLOURS, SHAPE_KINDS
from pebr_lightning.rewards.answers import description_section

_NAMED_SHAPE = re.compile(
    rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPE_KINDS)})s?\b", re.IGNORECASE
)


def described_shapes(text: str) -> list[tuple[str, str]]:
    """(colour, kind) of every shape the response's description names, in order."""
    return [(c.lower(), k.lower()) for c, k in _NAMED_SHAPE.findall(description_section(text))]


def perception_scores(text: str, shapes: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """Whether the description's shape count and colour multiset match `shapes`."""
    named = described_shapes(text)
    return {
        "count": len(named) == len(shapes),
        "colours": Counter(c for c, _ in named) == Counter(s["colour"] for s in shapes),
    }


def perception_metrics(records: Sequence[dict[str, Any]], texts: Sequence[str]) -> dict[str, float]:
    """{"perception/count", "perception/colours", "perception/n"} over the records that
    carry `shapes`; empty when none does."""
    scored = [
        perception_scores(text, record["shapes"])
        for record, text in zip(records, texts, strict=True)
        if isinstance(record.get("shapes"), list)
    ]
    if not scored:
        return {}
    n = len(scored)
    return {
        "perception/count": sum(s["count"] for s in scored) / n,
        "perception/colours": sum(s["colours"] for s in scored) / n,
        "perception/n": float(n),
    }
