"""The keyword reward: the paper's substring recall and the normalised whole-word variant."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest

from pebr_lightning.rewards import keyword as keyword_module
from pebr_lightning.rewards.keyword import KeywordReward
from pebr_lightning.rewards.protocol import RewardOutput

TEXT = (
    "### Image Description: Three blue circles; the red square is left of the circles.\n"
    "### Rationales: count the circles\n### Step 1: 3 circles\n### The final answer is: 3"
)


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    """Word forms, the stemmer and the WordNet probe are cached per process; tests change them."""
    keyword_module._forms.cache_clear()
    keyword_module._lemmatizer.cache_clear()
    keyword_module._stemmer.cache_clear()
    yield
    keyword_module._forms.cache_clear()
    keyword_module._lemmatizer.cache_clear()
    keyword_module._stemmer.cache_clear()


def run(reward: KeywordReward, text: str, keywords: object) -> RewardOutput:
    out = reward(completions=[text], samples=[{"answer": "3", "keywords": keywords}])
    assert isinstance(out, RewardOutput)
    return out


@pytest.mark.parametrize(
    ("keywords", "expected"),
    [
        (["circle", "square"], 1.0),
        (["CIRCLE", "Red Square"], 1.0),  # case-insensitive
        (["circle", "triangle"], 0.5),
        (["triangle", "green", "four", "above"], 0.0),
        (["3"], 1.0),
        (["three"], 1.0),
        (["ree"], 1.0),  # substring, as the paper: found inside "three"
        (["red"], 1.0),
        (["circles left of"], 0.0),  # a phrase must occur verbatim
        (["square is left of"], 1.0),
        (["blue circle"], 1.0),  # inside "blue circles"
        (["circle blue"], 0.0),
        (["circle", "circle"], 1.0),  # duplicates count twice, as listed
        (["circle", "", "  "], 1.0),  # blank keywords are ignored
        ({"objects": ["circle", "triangle"], "numbers": ["3"], "spatial": []}, 2 / 3),
        ([], 0.0),  # no keywords: 0, as the paper's code
        ({}, 0.0),
        ({"objects": []}, 0.0),
        (None, 0.0),
    ],
)
def test_paper_mode(keywords: object, expected: float) -> None:
    assert run(KeywordReward(), TEXT, keywords).scores == [pytest.approx(expected)]


@pytest.mark.parametrize(
    ("text", "keywords", "expected"),
    [
        ("it was covered", ["red"], 1.0),  # the paper's substring test is loose ...
        ("10 shapes", ["1"], 1.0),
        ("two circles", ["2"], 0.0),  # ... and strict
        ("a circle", ["circles"], 0.0),
    ],
)
def test_paper_mode_is_plain_substring(text: str, keywords: list[str], expected: float) -> None:
    assert run(KeywordReward(), text, keywords).scores == [expected]


NORMALISED = [
    (["circle"], 1.0),  # "circles" stems to "circl" too
    (["Circles"], 1.0),
    (["3"], 1.0),
    (["three"], 1.0),  # number word = digits
    (["one"], 1.0),  # "Step 1"
    (["four"], 0.0),
    (["ree"], 0.0),  # whole words only
    (["red square"], 1.0),  # contiguous words
    (["the red square"], 1.0),  # articles dropped on both sides
    (["square left"], 0.0),  # "square is left": not contiguous
    (["square is left of the circles"], 1.0),
    (["blue circle"], 1.0),
    (["circle blue"], 0.0),
    (["left-of"], 1.0),  # punctuation dropped
    (["red."], 1.0),
    (["!!!"], 0.0),  # no words: never found
    ({"objects": ["circle", "triangle"], "numbers": ["three"], "spatial": []}, 2 / 3),
]


@pytest.mark.parametrize(("keywords", "expected"), NORMALISED)
def test_normalised_mode(keywords: object, expected: float) -> None:
    out = run(KeywordReward(mode="normalised"), TEXT, keywords)
    assert out.scores == [pytest.approx(expected)]


@pytest.mark.parametrize(
    ("text", "keywords", "expected"),
    [
        ("10 shapes", ["1"], 0.0),
        ("ten shapes", ["10"], 1.0),
        ("twenty shapes", ["20"], 1.0),
        ("90 shapes", ["ninety"], 1.0),
        ("03 shapes", ["three"], 1.0),
        ("it was covered", ["red"], 0.0),
        ("RUNNING fast", ["run"], 1.0),
        ("a circle", ["circles"], 1.0),
    ],
)
def test_normalised_mode_words(text: str, keywords: list[str], expected: float) -> None:
    assert run(KeywordReward(mode="normalised"), text, keywords).scores == [expected]


@pytest.mark.parametrize("keywords", [[], {}, {"objects": []}, None, "circle", [" "]])
def test_normalised_mode_without_keywords_is_not_applicable(keywords: object) -> None:
    assert run(KeywordReward(mode="normalised"), TEXT, keywords).scores == [None]


BATCH_SAMPLES = [
    {"answer": "3", "keywords": {"objects": ["circle"], "spatial": ["above"]}},
    {"answer": "3", "keywords": {"numbers": ["3"], "objects": []}},
    {"answer": "3", "keywords": ["red"]},
    {"answer": "3"},
]


@pytest.mark.parametrize(("mode", "no_keywords"), [("paper", 0.0), ("normalised", None)])
def test_components_per_category(mode: str, no_keywords: float | None) -> None:
    out = KeywordReward(mode=mode)(
        completions=[TEXT] * 4, samples=BATCH_SAMPLES, tokenizer=None, unknown_key=object()
    )
    assert out.scores == [0.5, 1.0, 1.0, no_keywords]
    assert out.components == {
        "recall/objects": [1.0, None, None, None],
        "recall/spatial": [0.0, None, None, None],
        "recall/numbers": [None, 1.0, None, None],
        "recall/all": [None, None, 1.0, None],
    }


@pytest.mark.parametrize(
    ("mode", "section", "text", "expected"),
    [
        ("paper", "all", TEXT, 1.0),
        ("paper", "description", TEXT, 0.5),  # "count" is in the rationale
        ("normalised", "description", TEXT, 0.5),
        ("paper", "description", TEXT.replace("### Image Description:", ""), 0.0),
        ("paper", "description", "### Image Description: we count blue\n### Step 1:", 1.0),
    ],
)
def test_section(mode: str, section: str, text: str, expected: float) -> None:
    reward = KeywordReward(mode=mode, section=section)
    assert run(reward, text, ["blue", "count"]).scores == [expected]


def test_works_without_any_nltk_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No punkt, no WordNet: tokenising and stemming need no data, lemmas are skipped."""
    import nltk
    import nltk.corpus
    from nltk.corpus.reader import WordNetCorpusReader
    from nltk.corpus.util import LazyCorpusLoader

    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    # A fresh loader, in case an earlier test in this process loaded a real WordNet.
    monkeypatch.setattr(
        nltk.corpus, "wordnet", LazyCorpusLoader("wordnet", WordNetCorpusReader, None)
    )
    assert keyword_module._lemmatizer() is None
    reward = KeywordReward(mode="normalised")
    for keywords, expected in NORMALISED:
        assert run(reward, TEXT, keywords).scores == [pytest.approx(expected)], keywords


class _FakeLemmatizer:
    def lemmatize(self, word: str, pos: str = "n") -> str:
        return {"mice": "mouse", "geese": "goose"}.get(word, word)


@pytest.mark.parametrize(("lemmas", "expected"), [(True, [1.0, 1.0]), (False, [0.0, 0.0])])
def test_noun_lemmas_when_wordnet_is_there(
    monkeypatch: pytest.MonkeyPatch, lemmas: bool, expected: list[float]
) -> None:
    monkeypatch.setattr(
        keyword_module, "_lemmatizer", lambda: _FakeLemmatizer() if lemmas else None
    )
    reward = KeywordReward(mode="normalised")
    out = reward(
        completions=["two mice", "a goose"],
        samples=[{"keywords": ["mouse"]}, {"keywords": ["geese"]}],
    )
    assert out.scores == expected


@pytest.mark.parametrize(
    ("mode", "scores"), [("paper", [0.5, 0.0, 1.0]), ("normalised", [0.5, 1.0, 1.0])]
)
def test_pickle_round_trip(mode: str, scores: list[float]) -> None:
    """In the description, "3" is only written "Three": found by "normalised" alone."""
    reward = KeywordReward(mode=mode, section="description")
    expected = KeywordReward(mode=mode, section="description")(
        completions=[TEXT] * 4, samples=BATCH_SAMPLES
    )
    copy = pickle.loads(pickle.dumps(reward))
    assert copy.name == "keyword"
    assert copy.mode == mode
    out = copy(completions=[TEXT] * 4, samples=BATCH_SAMPLES)
    assert out == expected
    assert out.scores[:3] == scores


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"mode": "fuzzy"}, "mode"), ({"section": "rationale"}, "section")]
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KeywordReward(**kwargs)
