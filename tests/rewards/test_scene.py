"""The scene reward, by hand-worked cases, on the synthetic data's own references, and
against the reward contract."""

from __future__ import annotations

import json

import pytest

from pebr_demo.data.synth import write_dataset
from pebr_demo.rewards.scene import SceneReward
from pebr_lightning.data.prompts import record_response
from pebr_lightning.testing import check_reward, make_context, make_samples

SCENE = {
    "id": "s1",
    "shapes": [
        {"kind": "circle", "colour": "red"},
        {"kind": "circle", "colour": "blue"},
        {"kind": "square", "colour": "green"},
    ],
}


def response(description: str) -> str:
    return f"### Image Description: {description}\n### Rationales: r\n### The final answer is: 3"


@pytest.mark.parametrize(
    ("description", "count", "colours", "kinds", "placed"),
    [
        ("left to right: a red circle, a blue circle, a green square. 3 shapes.", 1, 1, 1, 1),
        # one shape too many: what keyword recall alone rewards, and this does not; the
        # three named in place count 3 of the 4 places
        (
            "left to right: a red circle, a blue circle, a green square, a red circle.",
            0,
            0,
            0,
            3 / 4,
        ),
        # the right number, one colour wrong: 2 of 3 in place
        ("left to right: a red circle, a red circle, a green square.", 1, 0, 1, 2 / 3),
        # the right shapes in another order: the multisets are right, 1 of 3 in place
        ("left to right: a green square, a blue circle, a red circle.", 1, 1, 1, 1 / 3),
        # one missing: the first is in place, the second is not the picture's second
        ("left to right: a red circle, a green square.", 0, 0, 0, 1 / 3),
        # right count and colours, one kind wrong
        ("left to right: a red circle, a blue triangle, a green square.", 1, 1, 0, 2 / 3),
        # no description of shapes at all
        ("nothing to see.", 0, 0, 0, 0),
    ],
)
def test_hand_worked_scores(description, count, colours, kinds, placed) -> None:
    out = SceneReward()(completions=[response(description)], samples=[SCENE])
    assert out.scores == [pytest.approx((count + colours + kinds + placed) / 4)]
    assert out.components == {
        "count": [count],
        "colours": [colours],
        "kinds": [kinds],
        "placed": [pytest.approx(placed)],
    }


def test_only_the_description_section_counts() -> None:
    text = (
        "### Image Description: a red circle, a blue circle, a green square.\n"
        "### Rationales: a yellow triangle would not matter here\n### The final answer is: 3"
    )
    assert SceneReward()(completions=[text], samples=[SCENE]).scores == [1.0]


def test_the_synthetic_reference_response_scores_one(tmp_path) -> None:
    manifest = write_dataset(tmp_path / "data", n=200, seed=3)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    out = SceneReward()(completions=[record_response(r) for r in records], samples=records)
    assert out.scores == [1.0] * len(records)


def test_without_shapes_it_is_not_applicable() -> None:
    out = SceneReward()(completions=[response("a red circle.")], samples=[{"id": "real-1"}])
    assert out.scores == [None]
    assert out.components == {"count": [None], "colours": [None], "kinds": [None], "placed": [None]}


def test_malformed_shapes_name_the_sample() -> None:
    with pytest.raises(ValueError, match=r"sample bad-7: every entry of `shapes`"):
        SceneReward()(completions=[response("x")], samples=[{"id": "bad-7", "shapes": ["red"]}])


def test_honours_the_reward_contract(tmp_path) -> None:
    samples = make_samples(n=4, root=tmp_path)
    check_reward(SceneReward(), samples=samples, context=make_context(samples))
