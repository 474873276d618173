"""The keyword reward: how many of the sample's reference keywords the response mentions.

Mode "paper" is the paper's Stage 1 keyword term (docs/paper.md, "Stage 1 reward"):
the share of reference keywords found as case-insensitive substrings anywhere in the
response, 0 for a sample without keywords. Its substring test is loose ("red" is
found in "covered", "1" in "10") and strict at once ("circles" or "three" do not
match the keywords "circle" or "3").

Mode "normalised" is our stricter and more forgiving variant: whole words, stemmed
(nltk's Snowball stemmer), digits and number words made equal ("3" = "three"),
articles dropped, each keyword matched as a contiguous run of response words; where
nltk's WordNet data is installed, noun lemmas also match ("mice" = "mouse"). It needs
no nltk data otherwise.

Both modes log `recall/<category>` per sample for keywords given as a dict
(`{"objects": [...], "numbers": [...]}`; see docs/data.md). Try it on real samples:
`pebr rewards check keyword`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

from pebr_lightning.rewards.answers import description_section
from pebr_lightning.rewards.protocol import RewardOutput

LIST_CATEGORY = "all"
"""The category name under which keywords given as a plain list are logged."""

# fmt: off
_UNITS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]
# fmt: on
_TENS = ["thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
# Number word -> digits, so that "three" and "3" normalise to the same token.
_NUMBERS = {word: str(n) for n, word in enumerate(_UNITS)} | {
    word: str(n) for n, word in zip(range(30, 100, 10), _TENS, strict=True)
}
_ARTICLES = frozenset({"a", "an", "the"})


class KeywordReward:
    """Scores keyword recall: the share of the sample's reference keywords the response mentions.

    score = (reference keywords found) / (reference keywords), with the keywords of
    `sample["keywords"]` (a dict category -> list of str, or a plain list). "paper"
    mode finds a keyword if it is a case-insensitive substring of the text, and scores
    a sample without keywords 0 (as the paper's code). "normalised" mode finds it if
    its normalised words occur contiguously among the text's normalised words, and
    scores a sample without keywords None (not applicable). Components:
    `recall/<category>`, the same ratio per category (None where the sample has no
    keyword of that category).
    """

    name = "keyword"

    def __init__(
        self,
        mode: Literal["paper", "normalised"] = "paper",
        section: Literal["all", "description"] = "all",
    ) -> None:
        """
        Args:
            mode: "paper": case-insensitive substring match, as the paper; "normalised":
                whole-word match after stemming, number words = digits and, when nltk's
                WordNet data is installed, noun lemmas.
            section: where to look: "all" (the whole response, as the paper) or
                "description" (only between "### Image Description:" and
                "### Rationales:"; nothing is found when that section is missing).
        """
        if mode not in ("paper", "normalised"):
            raise ValueError(f"keyword reward: mode must be 'paper' or 'normalised', got {mode!r}")
        if section not in ("all", "description"):
            raise ValueError(
                f"keyword reward: section must be 'all' or 'description', got {section!r}"
            )
        self.mode = mode
        self.section = section

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> RewardOutput:
        per_sample = [_keyword_groups(sample.get("keywords")) for sample in samples]
        categories = list(dict.fromkeys(name for groups in per_sample for name in groups))
        scores: list[float | None] = []
        components: dict[str, list[float | None]] = {f"recall/{c}": [] for c in categories}
        for text, groups in zip(completions, per_sample, strict=True):
            if self.section == "description":
                text = description_section(text)
            haystack = text.lower() if self.mode == "paper" else _normalise(text)
            hits = {
                name: [self._found(keyword, haystack) for keyword in words]
                for name, words in groups.items()
            }
            total = sum(len(flags) for flags in hits.values())
            if total:
                scores.append(sum(sum(flags) for flags in hits.values()) / total)
            else:
                scores.append(0.0 if self.mode == "paper" else None)
            for name in categories:
                flags = hits.get(name)
                components[f"recall/{name}"].append(sum(flags) / len(flags) if flags else None)
        return RewardOutput(scores=scores, components=components)

    def _found(self, keyword: str, haystack: Any) -> bool:
        """Whether the keyword occurs in the response: lowered text or normalised words."""
        if self.mode == "paper":
            return keyword.lower() in haystack
        return _contains(haystack, _normalise(keyword))


def _keyword_groups(keywords: Any) -> dict[str, list[str]]:
    """Category -> non-blank keywords; a plain list is one category, LIST_CATEGORY."""
    if isinstance(keywords, dict):
        groups = {str(name): words for name, words in keywords.items()}
    elif isinstance(keywords, Sequence) and not isinstance(keywords, str):
        groups = {LIST_CATEGORY: keywords}
    else:
        return {}
    return {
        name: [w for w in words if isinstance(w, str) and w.strip()]
        for name, words in groups.items()
        if isinstance(words, Sequence) and not isinstance(words, str)
    }


def _contains(words: list[frozenset[str]], keyword: list[frozenset[str]]) -> bool:
    """Whether `keyword` occurs as a contiguous run in `words` (tokens match if forms overlap)."""
    if not keyword:
        return False
    span = len(keyword)
    return any(
        all(words[start + i] & keyword[i] for i in range(span))
        for start in range(len(words) - span + 1)
    )


def _normalise(text: str) -> list[frozenset[str]]:
    """The text's words, each as the set of forms it may match by (stem, lemma's stem)."""
    from nltk.tokenize import wordpunct_tokenize

    tokens = (t.lower() for t in wordpunct_tokenize(text))
    return [_forms(t) for t in tokens if any(c.isalnum() for c in t) and t not in _ARTICLES]


@lru_cache(maxsize=65536)
def _forms(token: str) -> frozenset[str]:
    if token in _NUMBERS:
        return frozenset({_NUMBERS[token]})
    if token.isdecimal():
        return frozenset({str(int(token))})
    stem = _stemmer().stem
    forms = {stem(token)}
    lemmatizer = _lemmatizer()
    if lemmatizer is not None:
        forms.add(stem(lemmatizer.lemmatize(token, pos="n")))
    return frozenset(forms)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.snowball import SnowballStemmer

    return SnowballStemmer("english")


@lru_cache(maxsize=1)
def _lemmatizer():
    """nltk's WordNet lemmatizer, or None when the WordNet data is not installed."""
    from nltk.stem import WordNetLemmatizer

    lemmatizer = WordNetLemmatizer()
    try:
        lemmatizer.lemmatize("mice")
    except LookupError:
        return None
    return lemmatizer
