"""Did the description see the picture right? Perception metrics on the synthetic shapes.

Held-out accuracy tells whether the final answer is right; it does not tell whether
the model *perceived* the image, which is what Stage 1 (perception RL) trains. For a
record that carries its ground-truth `shapes` (the synthetic set does, docs/data.md),
the response's "### Image Description:" section is read back into the shapes it
names ("a red circle", "a blue square", ...) and compared with the truth:

- count: the description names exactly as many shapes as the picture has;
- colours: the colours it names, as a multiset, are the picture's colours;
- kinds: the same for the kinds (circle, square, triangle);
- shapes: the (colour, kind) pairs it names, as a multiset, are the picture's;
- shapes_ordered: the same pairs in the same order (the truth runs left to right).

Records without `shapes` (real data) are left out of all of them.

`decomposition_metrics` splits held-out accuracy along the paper's thesis: how often
the description is right (what Stage 1 should raise), and how often the answer is
right given a right description (what Stage 2 should raise), with the accuracy given
a wrong description beside it.

    pebr eval --model M --manifest data/demo/test/manifest.jsonl --out eval/
    (metrics.json gains perception/count, perception/colours, perception/shapes,
    accuracy/desc_right, ...)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pebr_demo.data.synth import COLOURS, SHAPE_KINDS
from pebr_lightning.data.manifest import DEFAULT_TYPE
from pebr_lightning.rewards.answers import description_section

_NAMED_SHAPE = re.compile(
    rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPE_KINDS)})s?\b", re.IGNORECASE
)


def described_shapes(text: str) -> list[tuple[str, str]]:
    """(colour, kind) of every shape the response's description names, in order."""
    return [(c.lower(), k.lower()) for c, k in _NAMED_SHAPE.findall(description_section(text))]


def perception_scores(text: str, shapes: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How the description matches `shapes` (sorted left to right), each 0.0 or 1.0 but
    the last: its shape count ("count"), colour multiset ("colours"), kind multiset
    ("kinds"), (colour, kind) multiset ("shapes") and (colour, kind) sequence
    ("shapes_ordered") are right or not; "placed" is the share of places i where the
    i-th shape named is the picture's i-th, out of the longer of the two lists (a shape
    too many or too few costs its place; 1.0 for an empty picture described as empty)."""
    named = described_shapes(text)
    truth = [(s["colour"], s.get("kind")) for s in shapes]
    longest = max(len(named), len(truth))
    placed = sum(a == b for a, b in zip(named, truth, strict=False)) / longest if longest else 1.0
    return {
        "count": float(len(named) == len(shapes)),
        "colours": float(Counter(c for c, _ in named) == Counter(c for c, _ in truth)),
        "kinds": float(Counter(k for _, k in named) == Counter(k for _, k in truth)),
        "shapes": float(Counter(named) == Counter(truth)),
        "shapes_ordered": float(named == truth),
        "placed": placed,
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


def decomposition_metrics(
    records: Sequence[dict[str, Any]], texts: Sequence[str], correct: Sequence[bool]
) -> dict[str, float]:
    """Held-out accuracy split by whether the description saw the picture right.

    The paper's thesis in two numbers: Stage 1 (perception RL) should raise
    `perception/shapes`, the share of descriptions naming the picture's shapes (colour
    and kind, as a multiset); Stage 2 (reasoning RL) should raise `accuracy/desc_right`,
    the accuracy of the answers given such a right description. Greedy accuracy alone
    mixes the two: a model can answer better because it sees better or because it
    reasons better from what it sees.

    Over the records that carry `shapes` (the others are left out), with `correct[i]`
    whether record i's answer was graded right:

    - "perception/shapes", "perception/shapes_ordered": shares of right descriptions
      (multiset; in order, left to right);
    - "accuracy/desc_right", "accuracy/desc_wrong": accuracy over the records whose
      description names the right shapes (multiset), and over the others;
    - "perception/desc_right_n", "perception/desc_wrong_n": how many records each is
      over;
    - per question type (`type`, "all" when missing): "perception/shapes/<type>",
      "accuracy/desc_right/<type>", "accuracy/desc_wrong/<type>".

    An accuracy over no records is left out (no NaN); empty when no record carries
    `shapes`.
    """
    tally: dict[str, list[int]] = {}  # key -> [hits, total]

    def add(key: str, hit: bool) -> None:
        counts = tally.setdefault(key, [0, 0])
        counts[0] += int(hit)
        counts[1] += 1

    for record, text, ok in zip(records, texts, correct, strict=True):
        if not isinstance(record.get("shapes"), list):
            continue
        scores = perception_scores(text, record["shapes"])
        qtype = record.get("type") or DEFAULT_TYPE
        side = "desc_right" if scores["shapes"] else "desc_wrong"
        for suffix in ("", f"/{qtype}"):
            add(f"perception/shapes{suffix}", scores["shapes"])
            add(f"accuracy/{side}{suffix}", bool(ok))
        add("perception/shapes_ordered", scores["shapes_ordered"])
    if not tally:
        return {}
    values = {key: hits / total for key, (hits, total) in sorted(tally.items())}
    for side in ("desc_right", "desc_wrong"):  # the record count each accuracy is over
        values[f"perception/{side}_n"] = float(tally.get(f"accuracy/{side}", [0, 0])[1])
    return values


def shape_metrics(
    records: Sequence[dict[str, Any]], texts: Sequence[str], correct: Sequence[bool]
) -> dict[str, float]:
    """The perception metrics and the decomposition together: the evaluation metric
    plugin `perception` (entry-point group `pebr_lightning.eval_metrics`), run by every
    greedy evaluation; {} for records without `shapes`."""
    return {
        **perception_metrics(records, texts),
        **decomposition_metrics(records, texts, correct),
    }
