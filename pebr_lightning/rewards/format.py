"""The format reward: does the response have the expected shape?

Mode "pebr" is the paper's check (docs/paper.md, "Stage 1 reward": every header
present, case-insensitive, any spacing after `###`); like the paper's, it does not
check their order. Mode "think" is the R1-style `<think>...</think><answer>...</answer>`
format, for prompts that ask for that instead.

Weighted 0.1 in both stages. Try it on real samples: `pebr rewards check format`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pebr_lightning.data.prompts import (
    ANSWER_HEADER,
    DESCRIPTION_HEADER,
    RATIONALE_HEADER,
    STEP_HEADER,
)
from pebr_lightning.rewards.answers import header_pattern

PEBR_HEADERS = (DESCRIPTION_HEADER, RATIONALE_HEADER, STEP_HEADER.format(n=1), ANSWER_HEADER)
"""The four headers the paper's format reward requires."""

_THINK_ANSWER = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class FormatReward:
    """Scores the response layout: 1.0 when it has the required format, else 0.0.

    Mode "pebr": score = 1 if every header in `headers` occurs anywhere in the
    response (case-insensitive, any whitespace or none after `###`), else 0.
    Mode "think": score = 1 if the response is exactly `<think>...</think>` followed by
    `<answer>...</answer>`, each tag once, with only whitespace around them, else 0.
    """

    name = "format"

    def __init__(
        self,
        mode: Literal["pebr", "think"] = "pebr",
        headers: Sequence[str] = PEBR_HEADERS,
    ) -> None:
        """
        Args:
            mode: "pebr" checks for the `###` section headers (the paper's reward);
                "think" checks for `<think>...</think><answer>...</answer>`.
            headers: the headers that must all occur in "pebr" mode; the default is the
                paper's four: "### Image Description:", "### Rationales:",
                "### Step 1:" and "### The final answer is:".
        """
        if mode not in ("pebr", "think"):
            raise ValueError(f"format reward: mode must be 'pebr' or 'think', got {mode!r}")
        headers = [headers] if isinstance(headers, str) else list(headers)
        if mode == "pebr" and not headers:
            raise ValueError("format reward: 'pebr' mode needs at least one header")
        self.mode = mode
        self.headers = headers

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> list[float | None]:
        check = self._has_headers if self.mode == "pebr" else _is_think_answer
        return [1.0 if check(text) else 0.0 for text in completions]

    def _has_headers(self, text: str) -> bool:
        return all(header_pattern(header).search(text) for header in self.headers)


def _is_think_answer(text: str) -> bool:
    return _THINK_ANSWER.fullmatch(text) is not None and all(text.count(t) == 1 for t in _TAGS)
