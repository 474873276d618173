"""Clipped policy-gradient loss for GRPO and the reductions of its variants.

For completion i, token t, ratio r = pi(y_t) / pi_old(y_t) and advantage A = A_i, the
objective to maximise is

    J = min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)     PPO clip; eps_high > eps_low
                                                               is DAPO's "clip-higher"
    J = max(J, c * A)                        only where A < 0  dual clip (Ye et al. 2020, verl)

and the per-token loss is L = -J + beta * k3, with Schulman's low-variance KL estimate
k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 against the reference policy.

Dual clip: for A < 0 and r -> inf, r * A is unbounded below, so one stale token can
dominate the update; the cap c * A (c > 1) bounds that token's loss by -c * A and
gives it zero gradient. Written as a loss: L = min(-min(r A, clip(r) A), -c A).

importance_level="sequence" is GSPO (Zheng et al. 2025): every token of a completion
shares r = exp(mean over its tokens of (logp - pi_old)), the geometric mean of the
token ratios; the gradient reaches every token's logp through that mean. GSPO clips
such ratios with far smaller eps (3e-4 / 4e-4 in the paper) than the token level.

The scalar is the per-token loss reduced by a `LossReduction` (algorithms/reductions.py:
GRPO's sequence mean, BNPO's token mean, Dr. GRPO's constant length, DAPO's global
token mean), which also says each micro-batch's share under gradient accumulation.

PeBR-R1 (docs/paper.md, "GRPO settings") trains with verl's token-mean loss (TokenMean
on one process, GlobalTokenMean across processes), eps_low 0.2, eps_high 0.3, c = 3
and beta 1e-2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pebr_lightning.algorithms.reductions import BatchCounts, LossReduction, SequenceMean

IMPORTANCE_LEVELS = ("token", "sequence")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    reduction: LossReduction | None = None,
    importance_level: str = "token",
    max_completion_length: int | None = None,
    num_valid_tokens_global: int | None = None,
    world_size: int | None = None,
    engine_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss and detached metrics for one (micro-)batch of completions.

    Args:
        logp: log-probabilities of the sampled tokens under the current policy, [B*G, T].
        old_logp: the same under the policy that sampled them, [B*G, T]; treated as constant.
        advantages: one advantage per completion, [B*G]; treated as constant.
        mask: 1 on completion tokens, 0 on padding, [B*G, T]. Padded positions may hold
            any value, even inf or NaN, in the log-probability tensors.
        ref_logp: reference-policy log-probabilities, [B*G, T]; needed when beta > 0.
        beta: weight of the k3 KL term.
        eps_low: the ratio is clipped below at 1 - eps_low.
        eps_high: the ratio is clipped above at 1 + eps_high.
        dual_clip: c > 1 caps the loss of a negative-advantage token at -c * A; None: off.
        reduction: how the per-token losses become one scalar (algorithms/reductions.py);
            None: SequenceMean (GRPO).
        importance_level: "token" (GRPO) or "sequence" (GSPO).
        max_completion_length: the generation budget (ConstantLength's denominator).
        num_valid_tokens_global: the update batch's valid-token count over all processes
            (GlobalTokenMean).
            None: all-reduced (SUM) over the default process group when torch.distributed
            is initialised, else this batch's count. Every process must then call this
            function, as it is a collective.
        world_size: how many per-process losses the gradient is averaged
            over. DDP and FSDP average gradients over processes, so the local loss is
            multiplied by it to turn that average into a sum; a loop that also divides by
            gradient-accumulation steps (Lightning does) should pass processes x steps
            with num_valid_tokens_global counting all of those micro-batches. None: the
            process group's size when initialised, else 1.
        engine_weights: importance weights for a rollout engine that sampled from
            another distribution than pi_old, [B*G, T] (algorithms/engine_correction.py);
            they multiply the policy-gradient term of each token, not the KL term.

    Returns:
        loss: scalar tensor. With no valid token at all it is 0 and still differentiable.
        metrics: 0-dim detached float tensors: "clip_frac/low" (A < 0, r < 1 - eps_low),
            "clip_frac/high" (A > 0, r > 1 + eps_high), "clip_frac/dual" (A < 0, dual cap
            active), each a share of this batch's valid tokens; "kl" (mean k3 over valid
            tokens, 0 when beta == 0); "ratio/mean", "ratio/min", "ratio/max" over valid
            tokens (1 when there are none).
    """
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, beta, eps_low, eps_high, dual_clip)
    if engine_weights is not None and engine_weights.shape != logp.shape:
        raise ValueError(
            f"engine_weights has shape {tuple(engine_weights.shape)}, expected {tuple(logp.shape)}"
        )
    _check_options(importance_level)
    reduction = SequenceMean() if reduction is None else reduction
    valid = mask.bool()  # [B*G, T]
    # Padding may hold -inf or garbage: select, never multiply, so it cannot leak as NaN.
    log_ratio = torch.where(valid, logp - old_logp.detach(), 0.0)  # [B*G, T]
    if importance_level == "sequence":
        n_tokens = valid.sum(-1).clamp(min=1)  # [B*G]
        seq_log_ratio = log_ratio.sum(-1) / n_tokens  # [B*G]
        log_ratio = seq_log_ratio[:, None].expand_as(logp)  # [B*G, T]
    ratio = log_ratio.exp()  # [B*G, T]

    adv = advantages.detach().to(logp.dtype)[:, None]  # [B*G, 1]
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)  # [B*G, T]
    dual_active = torch.zeros_like(valid)  # [B*G, T]
    if dual_clip is not None:
        cap = dual_clip * adv  # [B*G, 1]
        dual_active = (adv < 0) & (objective < cap)  # [B*G, T]
        objective = torch.where(dual_active, cap, objective)  # [B*G, T]
    per_token = -objective  # [B*G, T]
    if engine_weights is not None:
        per_token = per_token * engine_weights.detach()  # [B*G, T]

    kl = None
    if beta > 0:
        log_ref_ratio = torch.where(valid, ref_logp.detach() - logp, 0.0)  # [B*G, T]
        kl = log_ref_ratio.exp() - log_ref_ratio - 1  # [B*G, T]
        per_token = per_token + beta * kl
    per_token = torch.where(valid, per_token, 0.0)  # [B*G, T]

    counts = BatchCounts(max_completion_length, num_valid_tokens_global, world_size)
    loss = reduction.reduce(per_token, valid, counts)
    metrics = _metrics(ratio, adv, valid, dual_active, kl, eps_low, eps_high)
    return loss, metrics


@torch.no_grad()
def _metrics(
    ratio: Tensor,
    adv: Tensor,
    valid: Tensor,
    dual_active: Tensor,
    kl: Tensor | None,
    eps_low: float,
    eps_high: float,
) -> dict[str, Tensor]:
    n_valid = valid.sum().clamp(min=1)

    def share(flag: Tensor) -> Tensor:
        return (flag & valid).sum().float() / n_valid

    valid_ratio = ratio[valid].float()  # [N]
    if valid_ratio.numel() == 0:
        valid_ratio = ratio.new_ones(1, dtype=torch.float32)  # [1]
    kl_mean = (
        torch.where(valid, kl, 0.0).sum().float() / n_valid
        if kl is not None
        else ratio.new_zeros((), dtype=torch.float32)
    )
    return {
        "clip_frac/low": share((adv < 0) & (ratio < 1 - eps_low)),
        "clip_frac/high": share((adv > 0) & (ratio > 1 + eps_high)),
        "clip_frac/dual": share(dual_active),
        "kl": kl_mean,
        "ratio/mean": valid_ratio.mean(),
        "ratio/min": valid_ratio.min(),
        "ratio/max": valid_ratio.max(),
    }


def _check_inputs(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None,
    beta: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B*G, T], got shape {tuple(logp.shape)}")
    named = {"old_logp": old_logp, "mask": mask}
    if ref_logp is not None:
        named["ref_logp"] = ref_logp
    for name, tensor in named.items():
        if tensor.shape != logp.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected logp's {tuple(logp.shape)}"
            )
    if advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"advantages must be [B*G] = [{logp.shape[0]}], got shape {tuple(advantages.shape)}"
        )
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp for the KL term")
    if not 0 <= eps_low < 1 or eps_high < 0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")


def _check_options(importance_level: str) -> None:
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(
            f"importance_level must be one of {IMPORTANCE_LEVELS}, got {importance_level!r}"
        )
