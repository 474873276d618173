"""The weighted sum of rewards, None renormalisation, and the fault policy.

Every expected total is worked out by hand in the test's docstring from

    total_i = (sum_{j applicable} w_j r_ij) * (sum_all w_j) / (sum_{j applicable} w_j)
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest

from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import PolicySpec
from pebr_lightning.rewards.combine import (
    RewardError,
    RewardSet,
    WeightedReward,
    load_rewards,
)
from pebr_lightning.rewards.protocol import RewardOutput
from pebr_lightning.rewards.registry import RewardSpec


class Fixed:
    """Returns the scores it was built with, whatever the completions."""

    def __init__(self, name: str, scores: list, components: dict | None = None) -> None:
        self.name = name
        self.scores = scores
        self.components = components
        self.calls = 0

    def __call__(self, *, completions, samples, **context):
        self.calls += 1
        if self.components is not None:
            return RewardOutput(scores=list(self.scores), components=self.components)
        return list(self.scores)


class Raising:
    """Fails on every batch."""

    name = "broken"

    def __call__(self, *, completions, samples, **context):
        raise ValueError("model weights missing")


class Returning:
    """Returns whatever object it was given, as is."""

    def __init__(self, name: str, output) -> None:
        self.name = name
        self.output = output

    def __call__(self, *, completions, samples, **context):
        return self.output


def batch(n: int) -> tuple[list[str], list[dict]]:
    return [f"completion {i}" for i in range(n)], [{"id": f"s{i}"} for i in range(n)]


def rewards(*items: tuple) -> RewardSet:
    return RewardSet([WeightedReward(*item) for item in items])


def test_stage1_weighted_sum_with_none_renormalised() -> None:
    """Stage 1: 0.4 clip + 0.4 keyword + 0.1 format + 0.1 length.

    s0: 0.4*0.5 + 0.4*0.25 + 0.1*1 + 0.1*1 = 0.2 + 0.1 + 0.1 + 0.1 = 0.5
    s1: keyword None (no keywords). Applicable weights 0.4 + 0.1 + 0.1 = 0.6, their sum
        0.4*1 + 0.1*1 + 0.1*0.5 = 0.55, total = 0.55 * 1.0 / 0.6 = 0.91666...
        (counting None as 0 would have given 0.55)
    s2: every reward None -> None
    s3: all zero -> 0.0 (a zero is a score, not "not applicable")
    """
    stage1 = rewards(
        (Fixed("clip", [0.5, 1.0, None, 0.0]), 0.4),
        (Fixed("keyword", [0.25, None, None, 0.0]), 0.4),
        (Fixed("format", [1, 1, None, 0]), 0.1),
        (Fixed("length", [1.0, 0.5, None, 0.0]), 0.1),
    )
    result = stage1(*batch(4))
    assert result.total[0] == pytest.approx(0.5)
    assert result.total[1] == pytest.approx(0.55 / 0.6)
    assert result.total[2] is None
    assert result.total[3] == 0.0
    assert result.per_reward["keyword"] == [0.25, None, None, 0.0]
    assert result.per_reward["format"] == [1.0, 1.0, None, 0.0]
    assert all(type(v) is float for v in result.per_reward["format"] if v is not None)
    assert result.faults == {"clip": 0, "keyword": 0, "format": 0, "length": 0}


def test_stage2_weighted_sum() -> None:
    """Stage 2: 0.9 accuracy + 0.1 format.

    s0: 0.9*1 + 0.1*1 = 1.0;  s1: 0.9*0 + 0.1*1 = 0.1;  s2: 0.9*1 + 0.1*0 = 0.9
    s3: accuracy None: 0.1*1 * 1.0 / 0.1 = 1.0 (format alone, on the full scale)
    """
    stage2 = rewards(
        (Fixed("accuracy", [1, 0, 1, None]), 0.9), (Fixed("format", [1, 1, 0, 1]), 0.1)
    )
    total = stage2(*batch(4)).total
    assert total == pytest.approx([1.0, 0.1, 0.9, 1.0])


def test_unnormalised_weights_keep_their_scale() -> None:
    """Weights 2 and 1 (sum 3): s0 = 2*0.5 + 1*1 = 2.0; s1: second None -> 2*0.5 * 3/2 = 1.5."""
    total = rewards((Fixed("a", [0.5, 0.5]), 2.0), (Fixed("b", [1.0, None]), 1.0))(*batch(2)).total
    assert total == pytest.approx([2.0, 1.5])


def test_zero_weight_reward_is_logged_but_not_summed() -> None:
    """Stage 1 logs accuracy at weight 0. s0: format 1 alone -> 1.0 regardless of accuracy 0;
    s1: format None, only the weight-0 reward scored -> no reward applies -> None."""
    result = rewards((Fixed("format", [1.0, None]), 1.0), (Fixed("accuracy", [0.0, 1.0]), 0.0))(
        *batch(2)
    )
    assert result.total == [1.0, None]
    assert result.per_reward["accuracy"] == [0.0, 1.0]


def test_components_are_prefixed_with_the_reward_name() -> None:
    keyword = Fixed(
        "keyword", [0.5, 1.0], components={"recall/objects": [0.5, 1], "recall/numbers": [None, 1]}
    )
    result = rewards((keyword, 1.0))(*batch(2))
    assert result.components == {
        "keyword/recall/objects": [0.5, 1.0],
        "keyword/recall/numbers": [None, 1.0],
    }
    assert result.total == [0.5, 1.0]


def test_each_reward_is_called_once_per_batch_with_the_context() -> None:
    seen = {}

    class Spy:
        name = "spy"

        def __call__(self, *, completions, samples, **context):
            seen.update(context, completions=completions, samples=samples)
            return [1.0] * len(completions)

    fixed = Fixed("fixed", [0.0, 0.0, 0.0])
    reward_set = rewards((fixed, 1.0), (Spy(), 1.0))
    completions, samples = batch(3)
    reward_set(completions, samples, global_step=7, images=["i0", "i1", "i2"])
    assert fixed.calls == 1
    assert seen == {
        "global_step": 7,
        "images": ["i0", "i1", "i2"],
        "completions": completions,
        "samples": samples,
    }


# fault kind -> (reward output or raising class, indices made None, words the error names)
FAULTS = {
    "raises": (Raising(), [0, 1, 2], "raised ValueError: model weights missing"),
    "wrong length": (Returning("bad", [1.0, 1.0]), [0, 1, 2], "returned 2 scores for 3"),
    "not a list": (Returning("bad", 0.5), [0, 1, 2], "returned a float"),
    "dict": (Returning("bad", {"s0": 1.0}), [0, 1, 2], "returned a dict"),
    "nan": (Returning("bad", [1.0, math.nan, 0.0]), [1], "id s1: nan is not finite"),
    "inf": (Returning("bad", [1.0, -math.inf, 0.0]), [1], "id s1: -inf is not finite"),
    # finite in float64, inf in the float32 totals: NaN advantages, NaN weights (before)
    "huge": (Returning("bad", [1.0, 1e39, 0.0]), [1], "id s1: 1e+39 is outside the float32"),
    "str": (Returning("bad", [1.0, "0.5", 0.0]), [1], "id s1: str '0.5' is not a number"),
    "bool": (Returning("bad", [1.0, True, 0.0]), [1], "id s1: bool True is not a number"),
    "list value": (Returning("bad", [1.0, [0.5], 0.0]), [1], "id s1: list [0.5] is not a number"),
    "scores not a list": (
        Returning("bad", RewardOutput(scores="abc")),
        [0, 1, 2],
        "RewardOutput.scores of type str",
    ),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_fault_with_raise_policy_names_reward_and_sample(kind: str) -> None:
    reward, _, words = FAULTS[kind]
    reward_set = rewards((Fixed("format", [1.0, 1.0, 1.0]), 0.5), (reward, 0.5, "raise"))
    with pytest.raises(RewardError) as info:
        reward_set(*batch(3))
    message = str(info.value)
    assert f"reward {reward.name!r}" in message
    assert words in message
    assert "s1" in message  # every fault here touches sample s1
    assert "on_error: none" in message


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_fault_with_none_policy_scores_none_and_counts(kind: str) -> None:
    """Format scores f = 1, 0.5, 0 at weight 0.5 of 1. Where the faulty reward's value became
    None, total = 0.5*f * 1/0.5 = f; elsewhere 0.5*f + 0.5*r with its r = 1, -, 0."""
    reward, bad, _ = FAULTS[kind]
    reward_set = rewards((Fixed("format", [1.0, 0.5, 0.0]), 0.5), (reward, 0.5, "none"))
    result = reward_set(*batch(3))
    scores = result.per_reward[reward.name]
    assert [i for i, v in enumerate(scores) if v is None] == bad
    assert result.faults == {"format": 0, reward.name: len(bad)}
    expected = [
        f if i in bad else 0.5 * f + 0.5 * r
        for i, (f, r) in enumerate(zip([1.0, 0.5, 0.0], [1.0, 0.0, 0.0], strict=True))
    ]
    assert result.total == pytest.approx(expected)


def test_a_raising_reward_names_the_first_ids_of_the_batch() -> None:
    completions, samples = batch(8)
    with pytest.raises(RewardError) as info:
        rewards((Raising(), 1.0))(completions, samples)
    assert "batch of 8 samples, ids s0, s1, s2, s3, s4, ..." in str(info.value)
    assert "s5" not in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


def test_ints_are_valid_scores_and_none_is_not_a_fault() -> None:
    result = rewards((Returning("r", [1, 0, None]), 1.0, "raise"))(*batch(3))
    assert result.per_reward["r"] == [1.0, 0.0, None]
    assert [type(v) for v in result.per_reward["r"][:2]] == [float, float]
    assert result.total == [1.0, 0.0, None]


@pytest.mark.parametrize(
    ("components", "bad", "words"),
    [
        ({"recall": [1.0, 1.0]}, 3, "component 'recall' has 2 values for 3"),
        ({"recall": [1.0, math.nan, 1.0]}, 1, "component 'recall', id s1: nan is not finite"),
    ],
)
def test_component_faults(components: dict, bad: int, words: str) -> None:
    def make(policy: str) -> RewardSet:
        output = RewardOutput(scores=[1.0, 1.0, 1.0], components=components)
        return rewards((Returning("kw", output), 1.0, policy))

    with pytest.raises(RewardError, match=rf"reward 'kw'.*{words}"):
        make("raise")(*batch(3))
    result = make("none")(*batch(3))
    assert result.faults == {"kw": bad}
    assert result.components["kw/recall"].count(None) == bad
    assert result.total == [1.0, 1.0, 1.0]  # components are logged, never summed


def test_reward_set_checks_its_configuration() -> None:
    with pytest.raises(PebrError, match="rewards are named 'a' and 'a'"):
        rewards((Fixed("a", []), 1.0), (Fixed("a", []), 1.0))
    # metric keys that differ only in case would be read as one another
    with pytest.raises(PebrError, match="rewards are named 'accuracy' and 'Accuracy'"):
        rewards((Fixed("accuracy", []), 1.0), (Fixed("Accuracy", []), 1.0))
    with pytest.raises(PebrError, match="every reward weight is 0"):
        rewards((Fixed("a", []), 0.0))
    with pytest.raises(PebrError, match="no rewards configured"):
        RewardSet([])
    with pytest.raises(ValueError, match="2 completions but 1 samples"):
        rewards((Fixed("a", [1, 1]), 1.0))(["x", "y"], [{"id": "s0"}])


def test_load_rewards_builds_a_set_from_specs(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "combine_plugin_mod.py").write_text(
        textwrap.dedent(
            """
            class Constant:
                def __init__(self, name, value):
                    self.name, self.value = name, value

                def __call__(self, *, completions, samples, **context):
                    return [self.value] * len(completions)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "combine_plugin_mod", raising=False)
    specs = [
        {
            "class_path": "combine_plugin_mod.Constant",
            "weight": 0.9,
            "init_args": {"name": "acc", "value": 1},
        },
        RewardSpec(
            class_path="combine_plugin_mod.Constant",
            weight=0.1,
            init_args={"name": "fmt", "value": 0},
            on_error="none",
        ),
    ]
    reward_set = load_rewards(specs)
    assert reward_set.names == ["acc", "fmt"]
    assert reward_set.weights == {"acc": 0.9, "fmt": 0.1}
    assert [item.on_error for item in reward_set.rewards] == ["raise", "none"]
    assert reward_set(*batch(2)).total == pytest.approx([0.9, 0.9])
    assert reward_set.to_config()[1] == {
        "class_path": "combine_plugin_mod.Constant",
        "weight": 0.1,
        "init_args": {"name": "fmt", "value": 0},
        "on_error": "none",
    }


class Meddling:
    """Scores 1 and, as a careless plugin might, rewrites every sample's answer."""

    name = "meddling"

    def __call__(self, *, completions, samples, **context):
        for sample in samples:
            sample["answer"] = "changed"
        return [1.0] * len(completions)


def test_a_reward_that_edits_samples_changes_nothing_for_the_rewards_after_it() -> None:
    """Before, a reward editing `samples` in place changed what the next reward graded
    (and the trainer's own records). Each reward now reads its own copy."""
    from pebr_lightning.rewards.accuracy import AccuracyReward

    records = [{"id": "s0", "answer": "3"}, {"id": "s1", "answer": "4"}]
    completions = ["### The final answer is: 3", "### The final answer is: 4"]
    reward_set = rewards((Meddling(), 0.5), (AccuracyReward(), 0.5))
    result = reward_set(completions, records)
    assert result.per_reward["accuracy"] == [1.0, 1.0]
    assert records == [{"id": "s0", "answer": "3"}, {"id": "s1", "answer": "4"}]


class Vandal:
    """Paints the first image black and rewrites and reorders the completions list."""

    name = "vandal"

    def __call__(self, *, completions, samples, images, **context):
        images[0].paste((0, 0, 0), (0, 0, *images[0].size))
        completions[0] = "overwritten"
        completions.reverse()
        return [0.0] * len(samples)


class Witness:
    """Scores 1 where the completion and the image's first pixel are what they were."""

    name = "witness"

    def __init__(self, expected: list[str]) -> None:
        self.expected = expected

    def __call__(self, *, completions, samples, images, **context):
        return [
            float(text == want and image.getpixel((0, 0)) == (200, 100, 50))
            for text, want, image in zip(completions, self.expected, images, strict=True)
        ]


def test_a_reward_that_edits_images_or_completions_changes_nothing_after_it() -> None:
    """Before, only `samples` were copied per reward: one that drew on an image or
    rewrote the completions list changed what the next reward scored, and the images
    the trainer keeps. (The two completions share one image, as a group's members do.)"""
    from PIL import Image

    image = Image.new("RGB", (8, 8), (200, 100, 50))
    completions = ["first", "second"]
    reward_set = rewards((Vandal(), 0.5), (Witness(["first", "second"]), 0.5))
    result = reward_set(completions, [{"id": "s0"}, {"id": "s1"}], images=[image, image])
    assert result.per_reward["witness"] == [1.0, 1.0]
    assert completions == ["first", "second"]
    assert image.getpixel((0, 0)) == (200, 100, 50)


def test_the_trainer_and_make_context_pass_exactly_the_documented_context_keys(tiny_path):
    """CONTEXT_KEYS (protocol.py, docs/plugins.md) is the contract: GRPO's reward phase
    passes those keys, no more and no fewer, and so does the test kit's make_context."""
    from types import SimpleNamespace

    import torch
    from PIL import Image

    from pebr_lightning.models.rollout import Rollout
    from pebr_lightning.modules.grpo import GRPOModule
    from pebr_lightning.rewards.protocol import CONTEXT_KEYS
    from pebr_lightning.testing import make_context, make_samples

    module = GRPOModule(policy=PolicySpec(model=str(tiny_path)), rewards=[{"name": "format"}])
    module.setup("fit")
    seen: dict = {}

    def record(*, completions, samples, **context):
        seen.update(context)
        return SimpleNamespace(total=[0.5] * len(completions))

    module.rewards = record
    ids = module.processor.tokenizer("a b", return_tensors="pt").input_ids  # [1, T]
    rollout = Rollout(
        prompt_ids=ids,
        prompt_mask=torch.ones_like(ids),
        completion_ids=ids.repeat(2, 1),
        completion_mask=torch.ones_like(ids).repeat(2, 1),
        logprobs=torch.zeros(2, ids.shape[1]),
        truncated=torch.tensor([True, True]),
        group_size=2,
        seconds=0.0,
    )
    image = Image.new("RGB", (8, 8))
    scores = module.score(rollout, [{"id": "a"}], [[image]])
    assert scores.rewards.tolist() == [0.5, 0.5]
    assert set(seen) == set(CONTEXT_KEYS)
    assert seen["processor"] is module.processor and seen["images"] == [image, image]
    assert set(make_context(make_samples()[:2])) == set(CONTEXT_KEYS)
