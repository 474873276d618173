"""Final-answer and description extraction shared by the rewards."""

from __future__ import annotations

import pytest

from pebr_lightning.data.prompts import render_response
from pebr_lightning.rewards.answers import description_section, extract_final_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("### Step 1: so 3.\n### The final answer is: 3", "3"),
        ("### The final answer is:   3  \nthanks", "3"),
        ("### the FINAL answer IS: (B)", "(B)"),
        ("The final answer is: 2\n### The final answer is: 5", "5"),  # the last one wins
        ("The final answer is:\n7", ""),  # rest of the line only, as the paper
        ("The final answer is: 4 <answer>9</answer>", "4 <answer>9</answer>"),
        ("<think>x</think><answer> 1 </answer><answer>\n2\n</answer>", "2"),
        ("<ANSWER>yes</ANSWER>", "yes"),
        ("  just 42 \n", "just 42"),
        ("", ""),
    ],
)
def test_extract_final_answer(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("### Image Description: a red square.\n### Rationales: r", "a red square."),
        ("###image description:\ntwo circles\n###   RATIONALES: r", "two circles"),
        ("### Image Description: one\n### Step 1: x", "one"),  # no rationales: next ###
        ("### Image Description: runs to the end", "runs to the end"),
        ("### Rationales: r\n### Image Description: late\n", "late"),
        ("no headers at all", ""),
        ("### Rationales: only\n### Step 1: x", ""),
        ("Image Description: no hashes\n### Rationales: r", ""),
    ],
)
def test_description_section(text: str, expected: str) -> None:
    assert description_section(text) == expected


def test_description_section_of_a_rendered_response() -> None:
    text = render_response("2", description="2 shapes: a red circle.", rationale="Count.")
    assert description_section(text) == "2 shapes: a red circle."
    assert extract_final_answer(text) == "2"
