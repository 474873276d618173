"""The scene reward: does the image description name the picture's shapes right?

For data that carries its ground truth, as the embedded synthetic shapes do (each
record's `shapes`: kind, colour, position), the description section of a response is
read back into the shapes it names (evaluation/perception.py, the same reading as
`pebr eval`'s perception metrics) and scored:

    score = (count right + colours right + kinds right + placed) / 4

count right: it names exactly as many shapes as the picture has; colours right: the
colours it names, as a multiset, are the picture's; kinds right: the same for the
kinds (circle, square, triangle); placed: the share of places, left to right, where
the description names the picture's shape there with its colour and kind, out of the
longer of the two lists (so a shape too many or too few costs its place). Kinds were
where the tiny model's descriptions went wrong most (docs/RESULTS.md), and the corner
questions need them. The first three terms are all or nothing per description; once
a model reads small scenes right they are 1 for most samples and the reward stops
telling a better description of a large scene from a worse one, so `placed` gives
one share per shape. Unlike the paper's keyword reward,
which counts only the reference keywords a response finds (recall), naming a shape
that is not there costs here. Samples without `shapes` (real datasets) score None,
not applicable.

Why the demo's Stage 1 uses it: with the paper's rewards alone the tiny policy learnt
to list one shape too many (more names, more keyword hits), and its held-out count
accuracy fell (docs/RESULTS.md). Try it: `pebr rewards check scene`.
"""

from __future__ import annotations

from typing import Any

from pebr_demo.evaluation.perception import perception_scores
from pebr_lightning.rewards.protocol import RewardOutput


class SceneReward:
    """Scores the description against the record's `shapes`: right count, colours,
    kinds, and the share of shapes named in their place.

    score = (count right + colours right + kinds right + placed) / 4, the first three 0
    or 1, placed in [0, 1]; None for a sample without a `shapes` list. Components:
    `count`, `colours`, `kinds` and `placed` (None alike).
    """

    name = "scene"

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> RewardOutput:
        scores: list[float | None] = []
        parts: dict[str, list[float | None]] = {
            "count": [],
            "colours": [],
            "kinds": [],
            "placed": [],
        }
        for text, sample in zip(completions, samples, strict=True):
            shapes = sample.get("shapes")
            if not isinstance(shapes, list):
                scores.append(None)
                for values in parts.values():
                    values.append(None)
                continue
            if not all(
                isinstance(s, dict)
                and isinstance(s.get("colour"), str)
                and isinstance(s.get("kind"), str)
                for s in shapes
            ):
                raise ValueError(
                    f"scene reward: sample {sample.get('id', '?')}: every entry of `shapes` "
                    "must be an object with 'colour' and 'kind' strings (the synthetic layout)"
                )
            right = perception_scores(text, shapes)
            scores.append(sum(right[key] for key in parts) / len(parts))
            for key, values in parts.items():
                values.append(right[key])
        return RewardOutput(scores=scores, components=parts)
