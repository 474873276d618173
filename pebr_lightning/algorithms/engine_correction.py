"""Importance weights that correct for the rollout engine sampling another policy.

An engine that serves a copy of the policy (vLLM: other kernels, another dtype, its
own top-k/top-p renormalisation) samples completion tokens from q, while the loss
treats them as drawn from the trainer's pi_old. Each token's policy-gradient term is
then multiplied by an importance weight w ~ pi_old / q, so that in expectation it is
the gradient of the objective under pi_old again; the weight is capped, since a
token q found far more likely than pi_old does would otherwise dominate a step
(truncated importance sampling, Yao et al. 2025, as in TRL's and verl's vLLM
rollouts). Four ways to apply the cap C:

    token_truncate     w_t = min(pi_old(y_t) / q(y_t), C)
    token_mask         w_t = pi_old(y_t) / q(y_t), or 0 where that exceeds C
    sequence_truncate  every token of a completion: w = min(prod_t pi_old / q, C)
    sequence_mask      every token of a completion: w = prod_t pi_old / q, or 0 above C

The weights are constants (no gradient flows through them), and the KL term is left
unweighted. With the HF engine q is the trainer's own distribution and every weight
is 1 up to float noise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def engine_weights(
    old_logp: Tensor, engine_logp: Tensor, mask: Tensor, mode: str, cap: float
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Per-token importance weights for `mode` (None for "none"), and their metrics.

    Args:
        old_logp: log pi_old of the sampled tokens (the trainer's), [N, T].
        engine_logp: log q of the same tokens, as the engine reported them, [N, T].
        mask: 1 on completion tokens, 0 on padding, [N, T]; padding may hold anything.
        mode: one of CORRECTIONS.
        cap: C, the largest weight kept (> 0).

    Returns:
        weights: [N, T] detached, 0 on padding; None when mode is "none".
        metrics: "engine_is/mean" (mean weight over valid tokens, after the cap) and
            "engine_is/capped_frac" (share of valid tokens whose uncapped weight
            exceeded C); empty for "none".
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"engine correction must be one of {CORRECTIONS}, got {mode!r}")
    if not cap > 0:
        raise ValueError(f"engine correction cap must be > 0, got {cap}")
    if mode == "none":
        return None, {}
    valid = mask.bool()  # [N, T]
    # select, never multiply: padding may hold -inf or garbage
    log_w = torch.where(valid, old_logp.detach() - engine_logp.detach(), 0.0)  # [N, T]
    if mode.startswith("sequence"):
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)  # [N, T], the product
    # compared in log space: a sequence's product can overflow exp
    above = log_w > math.log(cap)  # [N, T]
    raw = log_w.clamp(max=math.log(cap)).exp()  # [N, T], <= cap
    weights = torch.where(above, 0.0, raw) if mode.endswith("mask") else raw  # [N, T]
    weights = torch.where(valid, weights, 0.0)  # [N, T]
    n_valid = valid.sum().clamp(min=1)
    metrics = {
        "engine_is/mean": weights.sum().float() / n_valid,
        "engine_is/capped_frac": (above & valid).sum().float() / n_valid,
    }
    return weights, metrics


__all__ = ["CORRECTIONS", "engine_weights"]
