"""Pull the parts the rewards score out of a PeBR response.

Headers are matched the way the paper's format check does: case-insensitively, with
any whitespace (or none) after the `###` (docs/paper.md, "Stage 1 reward").
`extract_final_answer` feeds the accuracy reward and `description_section` the
keyword and CLIP rewards.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pebr_lightning.data.prompts import DESCRIPTION_HEADER, RATIONALE_HEADER

# "The final answer is:" with or without the "###" in front; the last one wins.
_FINAL_ANSWER = re.compile(r"the\s+final\s+answer\s+is\s*:", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANY_HEADER = re.compile("###")


@lru_cache(maxsize=64)
def header_pattern(header: str) -> re.Pattern[str]:
    """A regex for a `### Title:` header: case-insensitive, any whitespace after `###`."""
    title = header.strip()
    if title.startswith("###"):
        return re.compile(r"###\s*" + re.escape(title[3:].lstrip()), re.IGNORECASE)
    return re.compile(re.escape(title), re.IGNORECASE)


def extract_final_answer(text: str) -> str:
    """The model's final answer, stripped.

    In order: the rest of the line after the last "The final answer is:"
    (case-insensitive); else the content of the last `<answer>...</answer>`; else the
    whole response.
    """
    matches = list(_FINAL_ANSWER.finditer(text))
    if matches:
        rest = text[matches[-1].end() :]
        return rest.split("\n", 1)[0].strip()
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    return text.strip()


def description_section(text: str) -> str:
    """The text between "### Image Description:" and "### Rationales:", stripped.

    Empty when the description header is missing. Without a rationales header after
    it, the section runs to the next `###`, or to the end.
    """
    start = header_pattern(DESCRIPTION_HEADER).search(text)
    if start is None:
        return ""
    rest = text[start.end() :]
    end = header_pattern(RATIONALE_HEADER).search(rest) or _ANY_HEADER.search(rest)
    return (rest[: end.start()] if end else rest).strip()
