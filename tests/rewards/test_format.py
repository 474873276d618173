"""The format reward: the paper's four headers, and the <think>/<answer> layout."""

from __future__ import annotations

import pickle

import pytest

from pebr_demo.data.synth import make_record
from pebr_lightning.data.prompts import record_response
from pebr_lightning.rewards.format import PEBR_HEADERS, FormatReward

FULL = (
    "### Image Description: two circles\n### Rationales: count them\n"
    "### Let's think step by step.\n### Step 1: there are 2\n### The final answer is: 2"
)


def score(reward: FormatReward, text: str) -> float | None:
    return reward(completions=[text], samples=[{"answer": "2"}])[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (FULL, 1.0),
        (FULL.lower(), 1.0),
        (FULL.upper(), 1.0),
        (FULL.replace("### ", "###"), 1.0),  # no space after ###
        (FULL.replace("### ", "###  \t"), 1.0),  # more whitespace after ###
        (FULL.replace("### ", "###\n"), 1.0),
        (FULL.replace("\n", " "), 1.0),  # headers need not start a line
        (FULL.replace("### Let's think step by step.\n", ""), 1.0),  # not required
        # order is not checked, as in the paper
        ("### The final answer is: 2 ### Step 1: a ### Rationales: ### Image Description:", 1.0),
        (FULL.replace("### Image Description:", "Image Description:"), 0.0),
        (FULL.replace("### Image Description:", "## Image Description:"), 0.0),
        (FULL.replace("### Rationales:", "### Rationale:"), 0.0),
        (FULL.replace("### Step 1:", "### Step 2:"), 0.0),
        (FULL.replace("### The final answer is:", "The answer is:"), 0.0),
        (FULL.replace("Description:", "Description"), 0.0),  # the colon is part of it
        (FULL.replace("Image Description", "Image  Description"), 0.0),  # inner spacing kept
        ("", 0.0),
    ],
)
def test_pebr_mode(text: str, expected: float) -> None:
    assert score(FormatReward(), text) == expected


@pytest.mark.parametrize(
    ("headers", "text", "expected"),
    [
        (["### Answer:"], "### answer: 3", 1.0),
        (["### Answer:"], FULL, 0.0),
        (["### Image Description:", "### The final answer is:"], FULL, 1.0),
        ("### Step 1:", "###step 1: go", 1.0),  # a single header string
    ],
)
def test_custom_headers(headers: list[str] | str, text: str, expected: float) -> None:
    assert score(FormatReward(headers=headers), text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("  \n<think>\nreason\n</think>\n\n<answer> 3 </answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<think>a</think> so <answer>b</answer>", 0.0),  # text between
        ("Sure! <think>a</think><answer>b</answer>", 0.0),  # text before
        ("<think>a</think><answer>b</answer> done", 0.0),  # text after
        ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
        ("<think>a</think>", 0.0),
        ("<answer>b</answer>", 0.0),
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),
        ("<think>a<think>b</think><answer>c</answer>", 0.0),
        ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),
        (FULL, 0.0),
    ],
)
def test_think_mode(text: str, expected: float) -> None:
    assert score(FormatReward(mode="think"), text) == expected


def test_default_headers_are_the_papers_four() -> None:
    assert PEBR_HEADERS == (
        "### Image Description:",
        "### Rationales:",
        "### Step 1:",
        "### The final answer is:",
    )


def test_sft_targets_of_synthetic_records_pass() -> None:
    texts = [record_response(make_record(i, seed=0)) for i in range(8)]
    assert FormatReward()(completions=texts, samples=[{}] * 8) == [1.0] * 8


def test_batch_ignores_unknown_context() -> None:
    out = FormatReward()(
        completions=[FULL, "nothing", FULL],
        samples=[{}, {}, {}],
        tokenizer=None,
        global_step=3,
        something_new=object(),
    )
    assert out == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("mode", "expected"), [("pebr", [1.0, 0.0, 1.0]), ("think", [0.0, 1.0, 0.0])]
)
def test_pickle_round_trip(mode: str, expected: list[float]) -> None:
    reward = FormatReward(mode=mode, headers=["### Step 1:"])
    texts = [FULL, "<think>a</think><answer>b</answer>", "### step 1: x"]
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.name == "format"
    assert reward(completions=texts, samples=[{}] * 3) == expected
    assert copy(completions=texts, samples=[{}] * 3) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"mode": "xml"}, "mode"), ({"headers": []}, "header")]
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FormatReward(**kwargs)
