"""The length reward, counted with the embedded tiny policy tokenizer.

Hand counts with the tiny tokenizer: "blue circle" is 2 tokens ("blue", " circle") and
every further " blue circle" adds 2 (" blue", " circle"), so `_words(n)`, n copies of
"blue circle" joined by spaces, is 2n tokens.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from pebr_lightning.rewards.length import LengthReward


@pytest.fixture(scope="module")
def tokenizer(pebr_cache: Any) -> Any:
    from pebr_lightning.models.policy import load_processor

    return load_processor("tiny-qwen2.5-vl").tokenizer


def _words(n: int) -> str:
    return " ".join(["blue circle"] * n)


def test_hand_counts_hold(tokenizer: Any) -> None:
    assert tokenizer.tokenize(_words(2)) == ["blue", "Ġcircle", "Ġblue", "Ġcircle"]
    for n in (1, 3, 256, 512):
        assert len(tokenizer(_words(n), add_special_tokens=False)["input_ids"]) == 2 * n


@pytest.mark.parametrize(
    ("text", "max_tokens", "expected"),
    [
        ("", 4, 1.0),  # 0 tokens
        (_words(1), 4, 1.0),  # 2 tokens
        (_words(2), 4, 1.0),  # 4 tokens: at the budget
        (_words(3), 4, 4 / 6),  # 6 tokens
        (_words(4), 4, 0.5),  # 8 tokens
        (_words(20), 4, 0.1),  # 40 tokens
        (_words(256), 512, 1.0),  # 512 tokens, the paper's budget
        (_words(320), 512, 0.8),  # 640 tokens
        (_words(512), 512, 0.5),  # 1024 tokens
    ],
)
def test_scores(tokenizer: Any, text: str, max_tokens: int, expected: float) -> None:
    out = LengthReward(max_tokens=max_tokens)(
        completions=[text], samples=[{}], tokenizer=tokenizer, global_step=0, unknown_key=1
    )
    assert out == [pytest.approx(expected, abs=1e-12)]


def test_default_budget_is_512(tokenizer: Any) -> None:
    out = LengthReward()(
        completions=[_words(256), _words(257)], samples=[{}, {}], tokenizer=tokenizer
    )
    assert out == [1.0, pytest.approx(512 / 514)]


class _BosTokenizer:
    """Adds a BOS token when asked for special tokens, one token per character otherwise."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        return {"input_ids": [[0] * add_special_tokens + [1] * len(t) for t in texts]}


def test_special_tokens_are_not_counted() -> None:
    out = LengthReward(max_tokens=4)(completions=["abcd"], samples=[{}], tokenizer=_BosTokenizer())
    assert out == [1.0]  # 5 with the BOS token, which would score 0.8


def test_no_completions(tokenizer: Any) -> None:
    assert LengthReward()(completions=[], samples=[], tokenizer=tokenizer) == []


@pytest.mark.parametrize("context", [{}, {"tokenizer": None}, {"images": []}])
def test_missing_tokenizer_is_a_clear_error(context: dict) -> None:
    with pytest.raises(ValueError, match=r"length reward.*tokenizer"):
        LengthReward()(completions=["x"], samples=[{}], **context)


def test_pickle_round_trip(tokenizer: Any) -> None:
    reward = LengthReward(max_tokens=4)
    texts = [_words(1), _words(4), _words(10)]
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.name == "length"
    expected = [1.0, 0.5, 0.2]
    assert reward(completions=texts, samples=[{}] * 3, tokenizer=tokenizer) == expected
    assert copy(completions=texts, samples=[{}] * 3, tokenizer=tokenizer) == expected


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_bad_budget(max_tokens: int) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        LengthReward(max_tokens=max_tokens)
