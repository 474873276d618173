"""Which completion tokens a stage trains: hand-worked masks, then the real tokenizer."""

from __future__ import annotations

import torch

from pebr_lightning.algorithms.sections import section_mask
from pebr_lightning.data.prompts import RATIONALE_HEADER, render_response
from pebr_lightning.models.rollout import Rollout
from pebr_lightning.modules.grpo_parts import trained_rollout

PIECES = [
    ["A", "B", "#", "#R", "x", "<e>"],  # the marker "#R" starts at character 3 (token 2)
    ["no", " marker", "<e>", "pad"],  # no marker: the whole mask stays
]


def test_hand_worked_masks() -> None:
    """Row 0 reads "AB##Rx<e>": tokens start at characters 0, 1, 2, 3, 5, 6 and "#R"
    first occurs at character 3, so tokens 0-2 (starting before 3) are the description
    and tokens 3-5 the rest. Row 1 has 3 real tokens and no marker: kept whole on both
    sides. Padding (mask 0) stays 0."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]])
    pieces = [PIECES[0] + ["pad"], PIECES[1] + ["pad"] * 3]
    before = section_mask(pieces, mask, "#R", "before")
    after = section_mask(pieces, mask, "#R", "after")
    assert before.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]]
    assert after.tolist() == [[0, 0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]]
    assert mask.tolist()[0] == [1, 1, 1, 1, 1, 1, 0]  # the input is not changed


def test_a_marker_inside_a_token_goes_with_the_part_after() -> None:
    """'x#' + 'R': the marker starts inside token 0, which starts before it: description."""
    mask = torch.ones(1, 3, dtype=torch.long)
    assert section_mask([["x#", "R", "y"]], mask, "#R", "before").tolist() == [[1, 0, 0]]


def test_on_a_real_response_the_sections_decode_to_description_and_the_rest(tiny_path) -> None:
    """Through the tiny model's real tokenizer: the kept tokens of "description" decode
    to exactly the description line, those of "reasoning" to everything from the
    rationale header on; a shift of one token either way would fail both."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    text = render_response(
        "7", "left to right: a red square, a green triangle. 2 shapes.", "Why.", ["4 + 3 = 7."]
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    t = len(ids)
    rollout = Rollout(
        prompt_ids=torch.zeros(1, 1, dtype=torch.long),
        prompt_mask=torch.ones(1, 1, dtype=torch.long),
        completion_ids=torch.tensor([[*ids, 0, 0]]),
        completion_mask=torch.tensor([[1] * t + [0, 0]]),
        logprobs=torch.zeros(1, t + 2),
        truncated=torch.tensor([False]),
        group_size=1,
        seconds=0.0,
    )
    assert trained_rollout(tokenizer, rollout, "all") is rollout

    def kept(section: str) -> str:
        mask = trained_rollout(tokenizer, rollout, section).completion_mask[0]
        return tokenizer.decode([i for i, m in zip(ids, mask.tolist(), strict=False) if m])

    description, rest = text.split(RATIONALE_HEADER)
    assert kept("description") == description
    assert kept("reasoning") == RATIONALE_HEADER + rest + tokenizer.eos_token
