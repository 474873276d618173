"""Descriptions read back into shapes: count, colour and shape multisets, order, against
the truth; accuracy split by whether the description was right."""

from __future__ import annotations

import pytest

from pebr_demo.evaluation.perception import (
    decomposition_metrics,
    described_shapes,
    perception_metrics,
    perception_scores,
)
from pebr_lightning.data.prompts import render_response

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


RIGHT = "left to right: a red circle, a blue square, a red circle. 3 shapes."
OUT_OF_ORDER = "left to right: a blue square, a red circle, a red circle. 3 shapes."
WRONG_KIND = "left to right: a red square, a blue square, a red circle. 3 shapes."
WRONG_COLOUR = "left to right: a red circle, a green square, a red circle. 3 shapes."
MISSING = "left to right: a red circle, a blue square. 3 shapes."
EXTRA = "a red circle, a blue square, a red circle, a red circle."


@pytest.mark.parametrize(
    ("description", "count", "colours", "kinds", "shapes", "in_order", "placed"),
    [
        (RIGHT, True, True, True, True, True, 1.0),
        # the right shapes out of order: the multisets are right, the sequence is not
        # (only the third place holds its shape)
        (OUT_OF_ORDER, True, True, True, True, False, 1 / 3),
        # right number, wrong kind (a red square for a red circle): colours still right
        (WRONG_KIND, True, True, False, False, False, 2 / 3),
        # right number, one colour wrong: kinds still right
        (WRONG_COLOUR, True, False, True, False, False, 2 / 3),
        # a shape missing: all wrong (the stated "3" does not count)
        (MISSING, False, False, False, False, False, 2 / 3),
        # one too many: three places right out of the four named
        (EXTRA, False, False, False, False, False, 3 / 4),
    ],
)
def test_perception_scores_hand_worked(
    description, count, colours, kinds, shapes, in_order, placed
):
    assert perception_scores(response(description), SHAPES) == {
        "count": count,
        "colours": colours,
        "kinds": kinds,
        "shapes": shapes,
        "shapes_ordered": in_order,
        "placed": pytest.approx(placed),
    }


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


def test_decomposition_splits_accuracy_by_right_description():
    """Hand-worked. With shapes (r0-r4):

    | rec | type  | description           | shapes | in order | answer |
    | r0  | count | right                 | yes    | yes      | right  |
    | r1  | count | right, out of order   | yes    | no       | wrong  |
    | r2  | colour| a wrong kind          | no     | no       | right  |
    | r3  | colour| a shape missing       | no     | no       | wrong  |
    | r4  | (all) | right (one shape)     | yes    | yes      | right  |

    r5 has no `shapes`: left out everywhere (it would add a wrong description of type
    count, right answer, making accuracy/desc_wrong/count appear).

    perception/shapes = 3/5, shapes_ordered = 2/5; desc right r0, r1, r4: accuracy
    2/3 over 3; desc wrong r2, r3: accuracy 1/2 over 2. Per type: count r0, r1:
    shapes 1, acc | right 1/2, no wrong side; colour r2, r3: shapes 0, acc | wrong
    1/2, no right side; all (r4, no `type`): shapes 1, acc | right 1.
    """
    records = [
        {"type": "count", "shapes": SHAPES},
        {"type": "count", "shapes": SHAPES},
        {"type": "colour", "shapes": SHAPES},
        {"type": "colour", "shapes": SHAPES},
        {"shapes": [{"kind": "square", "colour": "blue"}]},
        {"type": "count", "id": "real data, no ground truth"},
    ]
    texts = [RIGHT, OUT_OF_ORDER, WRONG_KIND, MISSING, "a blue square.", "anything"]
    correct = [True, False, True, False, True, True]
    metrics = decomposition_metrics(records, [response(t) for t in texts], correct)
    assert metrics == {
        "perception/shapes": pytest.approx(3 / 5),
        "perception/shapes_ordered": pytest.approx(2 / 5),
        "accuracy/desc_right": pytest.approx(2 / 3),
        "accuracy/desc_wrong": pytest.approx(1 / 2),
        "perception/desc_right_n": 3.0,
        "perception/desc_wrong_n": 2.0,
        "perception/shapes/count": 1.0,
        "accuracy/desc_right/count": pytest.approx(1 / 2),
        "perception/shapes/colour": 0.0,
        "accuracy/desc_wrong/colour": pytest.approx(1 / 2),
        "perception/shapes/all": 1.0,
        "accuracy/desc_right/all": 1.0,
    }


def test_decomposition_leaves_out_a_side_without_records():
    """Every description wrong (a kind wrong, a shape missing): accuracy/desc_right is
    over no record, so it is absent (not NaN) and its count 0; accuracy/desc_wrong is
    the plain accuracy, 1/2. No record with `shapes`: nothing at all."""
    records = [{"type": "count", "shapes": SHAPES}] * 2
    texts = [response(WRONG_KIND), response(MISSING)]
    metrics = decomposition_metrics(records, texts, [True, False])
    assert metrics == {
        "perception/shapes": 0.0,
        "perception/shapes_ordered": 0.0,
        "accuracy/desc_wrong": pytest.approx(1 / 2),
        "perception/desc_right_n": 0.0,
        "perception/desc_wrong_n": 2.0,
        "perception/shapes/count": 0.0,
        "accuracy/desc_wrong/count": pytest.approx(1 / 2),
    }
    assert decomposition_metrics([{"id": "x"}], [response(RIGHT)], [True]) == {}
