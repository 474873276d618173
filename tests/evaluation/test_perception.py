"""Descriptions read back into shapes: count and colour multiset against the truth."""

from __future__ import annotations

import pytest

from pebr_lightning.data.prompts import render_response
from pebr_lightning.evaluation.perception import (
    described_shapes,
    perception_metrics,
    perception_scores,
)

SHAPES = [
    {"kind": "circle", "colour": "red"},
    {"kind": "square", "colour": "blue"},
    {"kind": "circle", "colour": "red"},
]


def response(description: str) -> str:
    # The answer section names a shape too: only the description may be read.
    return render_response("2", description, "r", ["There is a green triangle."])


def test_described_shapes_reads_only_the_description():
    text = response("left to right: a Red circle, a blue SQUARE, a red circles. 3 shapes.")
    assert described_shapes(text) == [("red", "circle"), ("blue", "square"), ("red", "circle")]
    assert described_shapes("no description header: a red circle") == []


@pytest.mark.parametrize(
    ("description", "count", "colours"),
    [
        ("left to right: a red circle, a blue square, a red circle. 3 shapes.", True, True),
        # right number, wrong kind: colours still right
        ("left to right: a red square, a blue square, a red circle. 3 shapes.", True, True),
        # right number, one colour wrong
        ("left to right: a red circle, a green square, a red circle. 3 shapes.", True, False),
        # a shape missing: both wrong (the stated "3" does not count)
        ("left to right: a red circle, a blue square. 3 shapes.", False, False),
        # one too many
        ("a red circle, a blue square, a red circle, a red circle.", False, False),
    ],
)
def test_perception_scores_hand_worked(description, count, colours):
    assert perception_scores(response(description), SHAPES) == {"count": count, "colours": colours}


def test_metrics_are_shares_over_records_with_shapes():
    records = [
        {"shapes": SHAPES},
        {"shapes": SHAPES},
        {"shapes": [{"kind": "circle", "colour": "red"}]},
        {"id": "real data, no ground truth"},
    ]
    texts = [
        response("a red circle, a blue square, a red circle."),  # count and colours right
        response("a red circle, a green square, a red circle."),  # count right
        response("a blue circle."),  # count right
        response("anything"),
    ]
    metrics = perception_metrics(records, texts)
    assert metrics == {
        "perception/count": 1.0,
        "perception/colours": pytest.approx(1 / 3),
        "perception/n": 3.0,
    }
    assert perception_metrics(records[3:], texts[3:]) == {}
