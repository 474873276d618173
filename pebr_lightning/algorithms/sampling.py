"""Next-token sampling: temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / top-p nucleus to -inf (always keeps the best token).

    logits [N, V] -> [N, V]. top_k 0 and top_p 1.0 disable each filter. The nucleus
    is the smallest set of most likely tokens whose probability reaches top_p.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # [N, V]
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
        probs = sorted_logits.softmax(-1)  # [N, V]
        # mass of the tokens strictly before each one: drop a token once that mass is >= top_p
        before = probs.cumsum(-1) - probs  # [N, V]
        drop_sorted = before >= top_p  # [N, V]; position 0 has mass 0, so it is never dropped
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # [N, V] back in vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    banned: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per row; returns (tokens [N], their log-probs [N]).

    The log-prob is that of the temperature-scaled, unfiltered distribution: the
    distribution the policy-gradient loss evaluates (it scales logits by the same
    temperature), so rollout and training log-probs agree. `banned` token ids are
    never drawn but stay in that distribution.
    """
    if temperature <= 0:
        tokens = logits.argmax(-1)  # [N]
        return tokens, logits.float().log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits.float() / temperature  # [N, V]
    filtered = filter_logits(scaled, top_k, top_p)  # [N, V]
    if banned is not None and banned.numel():
        filtered = filtered.index_fill(-1, banned, float("-inf"))  # [N, V]
    tokens = torch.multinomial(filtered.softmax(-1), 1, generator=generator).squeeze(-1)  # [N]
    logp = scaled.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)  # [N]
    return tokens, logp
