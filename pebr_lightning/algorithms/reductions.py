"""Loss reductions: how per-token GRPO losses become one scalar, and a micro-batch's
share of its update batch.

Each reduction is a small class that `loss.reduction` names by class path
(algorithms/variants.py), like the advantage estimators; a user's own is a class in
their package with the same two methods (`LossReduction`). Per-token losses L
[B*G, T], padding already zero; `valid` [B*G, T] marks the tokens that count:

    SequenceMean     mean over completions of each completion's token mean; completions
                     without valid tokens are left out of both sum and count   (GRPO)
    TokenMean        sum over valid tokens / valid tokens in this batch         (BNPO)
    ConstantLength   sum over valid tokens / (B*G * max_completion_length)  (Dr. GRPO)
    GlobalTokenMean  sum over valid tokens / valid tokens on all processes
                     * world_size                                                (DAPO)

Gradient accumulation: an update batch (one optimizer step's sequences) is often
split into micro-batches. The loss reduces one micro-batch as if it were the batch;
`share` is that micro-batch's weight in its update batch, so that the weighted
micro-batch losses sum to the batch's loss (2 x 4 sequences give the step 1 x 8
gives):

    SequenceMean     its completions with valid tokens / the batch's
    TokenMean        its valid tokens / the batch's
    ConstantLength   its rows / the batch's rows with valid tokens
    GlobalTokenMean  1 (already divided by the global token count)

PeBR-R1 trains with verl's token mean, which is TokenMean on one process and
GlobalTokenMean across processes (docs/paper.md, "GRPO settings").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class BatchCounts:
    """What a reduction may divide by beyond its own micro-batch."""

    max_completion_length: int | None = None
    """The generation budget (sampling.max_new_tokens)."""
    valid_tokens_global: int | None = None
    """Valid tokens of the update batch over all processes. None: all-reduced (SUM) over
    the default process group when torch.distributed is initialised (a collective that
    every process must then reach), else this micro-batch's count."""
    world_size: int | None = None
    """How many per-process losses the gradient is averaged over (DDP and FSDP average
    over processes, so a global sum is multiplied by it). None: the process group's
    size when initialised, else 1."""


@runtime_checkable
class LossReduction(Protocol):
    """Reduces per-token losses [B*G, T] to a scalar and weighs a micro-batch."""

    def reduce(self, per_token: Tensor, valid: Tensor, counts: BatchCounts) -> Tensor:
        """The micro-batch's loss, as if it were the whole update batch."""
        ...

    def share(self, mask: Tensor, tokens: int, seqs: int) -> float:
        """This micro-batch's weight (loss mask [n, T]) in an update batch of `tokens`
        valid tokens and `seqs` sequences with any."""
        ...


class SequenceMean:
    """GRPO (DeepSeekMath): each completion's token mean, averaged over completions."""

    def reduce(self, per_token: Tensor, valid: Tensor, counts: BatchCounts) -> Tensor:
        n_tokens = valid.sum(-1)  # [B*G]
        seq_mean = per_token.sum(-1) / n_tokens.clamp(min=1)  # [B*G]
        return seq_mean.sum() / (n_tokens > 0).sum().clamp(min=1)

    def share(self, mask: Tensor, tokens: int, seqs: int) -> float:
        return float((mask.sum(-1) > 0).sum()) / max(seqs, 1)


class TokenMean:
    """BNPO: one mean over every valid token of the batch on this process."""

    def reduce(self, per_token: Tensor, valid: Tensor, counts: BatchCounts) -> Tensor:
        return per_token.sum() / valid.sum().clamp(min=1)

    def share(self, mask: Tensor, tokens: int, seqs: int) -> float:
        return float(mask.sum()) / max(tokens, 1)


class ConstantLength:
    """Dr. GRPO: the token sum over a constant, rows x the generation budget, so that
    neither a completion's length nor the batch's token count scales its gradient."""

    def reduce(self, per_token: Tensor, valid: Tensor, counts: BatchCounts) -> Tensor:
        length = counts.max_completion_length
        if length is None or length < 1:
            raise ValueError(f"ConstantLength needs max_completion_length >= 1, got {length}")
        return per_token.sum() / max(per_token.shape[0] * length, 1)

    def share(self, mask: Tensor, tokens: int, seqs: int) -> float:
        return mask.shape[0] / max(seqs, 1)  # divided by its row count, masked rows included


class GlobalTokenMean:
    """DAPO (and verl's token mean across processes): the token sum over the valid
    tokens of the whole update batch on every process."""

    def reduce(self, per_token: Tensor, valid: Tensor, counts: BatchCounts) -> Tensor:
        distributed = dist.is_available() and dist.is_initialized()
        world_size = counts.world_size
        if world_size is None:
            world_size = dist.get_world_size() if distributed else 1
        if counts.valid_tokens_global is not None:
            return per_token.sum() * world_size / max(counts.valid_tokens_global, 1)
        tokens = valid.sum()  # int64: exact, unlike a bf16 or fp32 sum of the mask
        if distributed:
            dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        return per_token.sum() * world_size / tokens.clamp(min=1)

    def share(self, mask: Tensor, tokens: int, seqs: int) -> float:
        return 1.0


FORMER_LOSS_TYPES = {
    "grpo": "pebr_lightning.algorithms.reductions.SequenceMean",
    "bnpo": "pebr_lightning.algorithms.reductions.TokenMean",
    "dr_grpo": "pebr_lightning.algorithms.reductions.ConstantLength",
    "dapo": "pebr_lightning.algorithms.reductions.GlobalTokenMean",
}
"""The reduction each `loss.loss_type` value (until 2026-12-06) selected: the line an
old config's error prints and what an old checkpoint loads with."""
