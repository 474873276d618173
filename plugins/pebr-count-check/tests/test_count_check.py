"""Tests an author keeps with a plugin: hand-worked cases + pebr_lightning's contract checks."""

from __future__ import annotations

import pytest
from pebr_count_check import CountCheckReward

from pebr_lightning.testing import check_reward, make_context, make_samples

SCENE = {
    "id": "s1",
    "shapes": [
        {"kind": "circle", "colour": "red"},
        {"kind": "circle", "colour": "blue"},
        {"kind": "square", "colour": "green"},
    ],
}


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        # total 3 right, circle x2 right, square x1 right -> 3/3
        ("3 shapes, left to right: a red circle, a blue circle, a green square.", 1.0),
        # the synthetic set's own order: the shapes first, then their number
        ("left to right: a red circle, a blue circle, a green square. 3 shapes.", 1.0),
        # total wrong (2), circles right, square right -> 2/3
        ("2 shapes: a red circle, a blue circle, a green square.", 2 / 3),
        # no total stated, one circle missing, square right -> 1/3
        ("a red circle and a green square.", 1 / 3),
        # number words count too
        ("three shapes: a red circle, a blue circle, a green square.", 1.0),
    ],
)
def test_hand_worked_scores(description, expected):
    completion = (
        f"### Image Description: {description}\n### Rationales: r\n### The final answer is: 3"
    )
    out = CountCheckReward()(completions=[completion], samples=[SCENE])
    assert out.scores == [pytest.approx(expected)]


def test_sample_without_shapes_is_not_applicable():
    out = CountCheckReward()(completions=["### Image Description: 2 shapes"], samples=[{"id": "x"}])
    assert out.scores == [None]


def test_honours_the_pebr_reward_contract(tmp_path):
    samples = make_samples(n=4, root=tmp_path)
    context = make_context(samples)
    check_reward(CountCheckReward(), samples=samples, context=context)
