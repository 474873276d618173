"""The length reward: full marks up to a token budget, then inversely proportional.

The paper's Stage 1 length term (docs/paper.md, "Stage 1 reward"): 1 for a response
of at most 512 tokens, else 512 / length. Tokens are counted with the policy's own
tokenizer, which the trainer passes as `context["tokenizer"]`.

Try it on real samples: `pebr rewards check length`.
"""

from __future__ import annotations

from typing import Any


class LengthReward:
    """Scores brevity: 1.0 for at most `max_tokens` tokens, else max_tokens / length.

    score = min(1, max_tokens / n), where n is the number of tokens the policy's
    tokenizer gives the completion without special tokens (an empty completion scores 1).
    """

    name = "length"

    def __init__(self, max_tokens: int = 512) -> None:
        """
        Args:
            max_tokens: the token budget; longer completions score max_tokens / length.
        """
        if max_tokens < 1:
            raise ValueError(f"length reward: max_tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> list[float | None]:
        tokenizer = context.get("tokenizer")
        if tokenizer is None:
            raise ValueError(
                f"{self.name} reward: needs the policy tokenizer as context['tokenizer'] "
                "to count tokens, and none was passed"
            )
        if not completions:
            return []
        ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        return [min(1.0, self.max_tokens / len(seq)) if seq else 1.0 for seq in ids]
