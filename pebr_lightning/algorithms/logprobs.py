"""Log-probabilities of chosen tokens without materialising full-vocabulary logits.

Qwen's vocabulary has 152k entries: fp32 logits for 8 sequences of 1.5k tokens are
~7.5 GB. Only the positions that are trained (response tokens) need logits, and
only one chunk of them at a time: each chunk's logits are recomputed in backward
(activation checkpointing), so peak memory is one chunk x vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shifted_targets(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Hidden states that predict a labelled token, and those tokens.

    hidden [B, T, H] at position t predicts labels[:, t + 1]; positions whose next
    label is IGNORE_INDEX are dropped.
    """
    next_labels = labels[:, 1:]  # [B, T-1]
    keep = next_labels != IGNORE_INDEX  # [B, T-1]
    return hidden[:, :-1][keep], next_labels[keep]  # [N, H], [N]


def token_logprobs(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    targets: Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> Tensor:
    """log p(targets[i] | hidden[i]) computed `chunk_size` rows at a time.

    hidden [N, H], targets [N] -> [N] float32. `head` maps [n, H] to logits [n, V]
    (the model's lm_head, possibly LoRA-wrapped or quantized).
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]  # [n, H]
        t = targets[start : start + chunk_size]  # [n]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, h, t, head, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, t, head, temperature))
    return torch.cat(pieces)  # [N]


def _chunk_logprobs(h: Tensor, t: Tensor, head: Callable, temperature: float) -> Tensor:
    logits = head(h).float() / temperature  # [n, V]
    # log_softmax(x)[t] = x[t] - logsumexp(x): avoids keeping a second [n, V] tensor.
    return logits.gather(-1, t[:, None]).squeeze(-1) - logits.logsumexp(-1)  # [n]
