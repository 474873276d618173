"""The plugin-author kit: it passes a reward that keeps the contract and fails each breach."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image

from pebr_lightning.rewards.checks import RULES
from pebr_lightning.rewards.protocol import CONTEXT_KEYS, RewardOutput
from pebr_lightning.testing import (
    check_context_keys,
    check_deterministic,
    check_lengths,
    check_no_mutation,
    check_pickle,
    check_reward,
    check_values,
    make_batch,
    make_context,
    make_samples,
    run_checks,
)


class Good:
    """Share of the answer's characters found in the completion, with a component."""

    name = "good"

    def __call__(self, *, completions, samples, **context):
        scores = [float(s["answer"] in c) for c, s in zip(completions, samples, strict=True)]
        lengths = [len(c) for c in completions]
        return RewardOutput(scores=scores, components={"chars": lengths})


class Mutating(Good):
    name = "mutating"

    def __call__(self, *, completions, samples, **context):
        samples[0]["answer"] = "changed"
        return [0.0] * len(completions)


class Counting(Good):
    """A different score on every call."""

    name = "counting"

    def __init__(self) -> None:
        self.counter = itertools.count()

    def __call__(self, *, completions, samples, **context):
        step = next(self.counter)
        return [float(step)] * len(completions)


class HoldsLambda(Good):
    name = "lambda"

    def __init__(self) -> None:
        self.score = lambda text: 1.0

    def __call__(self, *, completions, samples, **context):
        return [self.score(c) for c in completions]


class WrongLength(Good):
    name = "short"

    def __call__(self, *, completions, samples, **context):
        return [1.0] * (len(completions) - 1)


class NaNScores(Good):
    name = "nan"

    def __call__(self, *, completions, samples, **context):
        return [float("nan")] * len(completions)


class StrictContext(Good):
    """Names every context key it knows and takes no others."""

    name = "strict"

    def __call__(
        self,
        *,
        completions,
        samples,
        images,
        image_lists,
        tokenizer,
        processor,
        global_step,
        device,
    ):
        return [1.0] * len(completions)


class ReadsContext(Good):
    """Scores depend on how many context keys it got: it does not ignore unknown ones."""

    name = "reads"

    def __call__(self, *, completions, samples, **context):
        return [float(len(context))] * len(completions)


class BadComponents(Good):
    name = "components"

    def __call__(self, *, completions, samples, **context):
        return RewardOutput(scores=[1.0] * len(completions), components={"x": [1.0]})


class Raising(Good):
    name = "raising"

    def __call__(self, *, completions, samples, **context):
        raise RuntimeError("no model")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    samples = make_samples(n=3, seed=0, root=tmp_path_factory.mktemp("kit"))
    batch = make_batch(samples)
    return batch, make_context(batch.samples)


def fresh(prepared: tuple) -> tuple:
    """(samples, completions, context): a copy of the shared batch that a test may spoil."""
    batch, context = prepared
    return copy.deepcopy(batch.samples), list(batch.completions), dict(context)


@pytest.fixture
def args(prepared) -> tuple:
    return fresh(prepared)


def test_make_samples_writes_images_and_absolute_paths(tmp_path: Path) -> None:
    samples = make_samples(n=2, seed=3, root=tmp_path)
    assert [s["id"] for s in samples] == ["shapes-3-000000", "shapes-3-000001"]
    for sample in samples:
        path = Path(sample["image"])
        assert path.is_absolute() and path.is_file()
        assert tmp_path in path.parents


def test_make_batch_adds_the_edge_cases(prepared) -> None:
    batch, _ = prepared
    assert batch.labels == ["reference"] * 3 + ["empty", "no sections", "very long"]
    assert len(batch.samples) == len(batch.completions) == 6
    assert batch.completions[0].startswith("### Image Description:")
    assert batch.completions[0].endswith(f"### The final answer is: {batch.samples[0]['answer']}")
    assert batch.completions[3] == ""
    assert "###" not in batch.completions[4]
    assert len(batch.completions[5]) > 20_000
    assert [s["id"] for s in batch.samples[3:]] == [s["id"] for s in batch.samples[:3]]
    assert batch.sources == [0, 1, 2, 0, 1, 2]


def test_make_context_has_every_context_key(prepared) -> None:
    batch, context = prepared
    assert set(context) == set(CONTEXT_KEYS)  # images, image_lists, tokenizer, processor, ...
    assert len(context["images"]) == len(batch.samples)
    assert [own[0] for own in context["image_lists"]] == context["images"]
    assert all(isinstance(im, Image.Image) and im.size == (112, 112) for im in context["images"])
    assert context["tokenizer"](batch.completions[0])["input_ids"]
    assert context["global_step"] == 0
    assert context["device"] == torch.device("cpu")


def test_check_reward_passes_a_good_reward_with_default_batch() -> None:
    report = check_reward(Good())
    assert report.ok
    assert report.passed == list(RULES)
    scores = report.output.scores
    assert scores[:5] == [1.0] * 4 + [0.0]  # 4 reference responses hold the answer, "" does not


class UsesImages(Good):
    """Mean brightness of each sample's image; insists on one image per completion."""

    name = "images"

    def __call__(self, *, completions, samples, images, **context):
        assert len(images) == len(completions) == len(samples)
        return [sum(im.convert("L").getdata()) / (255 * 112 * 112) for im in images]


def test_a_context_made_for_the_samples_is_extended_to_the_edge_cases(prepared) -> None:
    batch, _ = prepared
    samples = copy.deepcopy(batch.samples[:3])
    report = check_reward(UsesImages(), samples=samples, context=make_context(samples))
    scores = report.output
    assert len(scores) == 6
    assert scores[3:] == scores[:3]  # edge cases 0, 1, 2 reuse images of samples 0, 1, 2
    assert len(set(scores[:3])) == 3


def test_a_plain_list_is_fine_too(args) -> None:
    class Plain:
        name = "plain"

        def __call__(self, *, completions, samples, **context):
            return [1, None] * (len(completions) // 2)

    # A class defined in a function cannot be pickled: check the other rules one by one.
    for check in (check_lengths, check_values, check_no_mutation, check_deterministic):
        check(Plain(), *args)
    check_context_keys(Plain(), *args)


@pytest.mark.parametrize(
    ("reward", "rule", "words"),
    [
        (Mutating(), RULES[3], "changed samples[0] (keys answer)"),
        (Counting(), RULES[6], "deterministic: score 0: 0.0, then 2.0"),
        (HoldsLambda(), RULES[5], "pickling failed"),
        (WrongLength(), RULES[1], "returned 5 scores for 6 completions"),
        (NaNScores(), RULES[2], "score 0: nan is not finite"),
        (StrictContext(), RULES[4], "unexpected keyword argument 'pebr_check_unknown_key'"),
        (ReadsContext(), RULES[4], "score 0: 6.0, then 7.0"),
        (BadComponents(), RULES[1], "component 'x' has 1 values for 6 completions"),
    ],
    ids=lambda v: v.name if hasattr(v, "name") else None,
)
def test_check_reward_fails_each_breach(prepared, reward, rule: str, words: str) -> None:
    with pytest.raises(AssertionError) as info:
        check_reward(reward, *fresh(prepared))
    message = str(info.value)
    assert f"reward {reward.name!r} breaks the reward contract" in message
    assert f"FAIL  {rule}: " in message
    assert words in message
    failed = [r.name for r in run_checks(type(reward)(), *fresh(prepared)).failures]
    # A reward whose score changes on every call also fails the unknown-context-key rule.
    assert failed == ([RULES[4], rule] if reward.name == "counting" else [rule])


def test_a_raising_reward_fails_the_call_and_skips_the_rest(args) -> None:
    report = run_checks(Raising(), *args)
    assert [(r.name, r.status) for r in report.results] == [("call", "FAIL")] + [
        (rule, "SKIP") for rule in RULES[1:]
    ]
    assert "RuntimeError: no model" in report.results[0].message
    assert not report.ok


@pytest.mark.parametrize(
    ("check", "reward", "words"),
    [
        (check_lengths, WrongLength(), "returned 5 scores"),
        (check_values, NaNScores(), "nan is not finite"),
        (check_no_mutation, Mutating(), "changed samples[0]"),
        (check_context_keys, StrictContext(), "unexpected keyword argument"),
        (check_pickle, HoldsLambda(), "pickling failed with"),
        (check_deterministic, Counting(), "then"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_individual_checks_raise_assertion_errors(args, check, reward, words: str) -> None:
    with pytest.raises(AssertionError, match=words.replace("[", r"\[").replace("]", r"\]")):
        check(reward, *args)
    check(Good(), *args)  # and the good reward passes the same check


def test_check_pickle_returns_a_working_copy(args) -> None:
    clone = check_pickle(Good(), *args)
    assert isinstance(clone, Good)


def test_group_position_reward_spreads_every_group():
    from pebr_demo.testing.spread_reward import GroupPositionReward

    samples = [{"id": "a"}] * 3 + [{"id": "b"}] * 3
    scores = GroupPositionReward()(completions=[""] * 6, samples=samples)
    assert scores == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
