"""The policy-gradient half of a GRPO step, and what its failures say.

`policy_update` runs mu passes of clipped updates over one rollout, in micro-batches
with gradient accumulation, one optimizer step per `prompts_per_update` prompts.
Under a distributed strategy every process makes the same calls in the same order
(sharded forwards and gradient reductions are collectives): rows left out of the
loss are masked rather than skipped, and a step without reward signal is skipped
only when no process has any.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pebr_lightning.algorithms.losses import policy_loss
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import unwrap
from pebr_lightning.models.rollout import Rollout, SamplingConfig
from pebr_lightning.parallel.sharding import any_across, clip_grad_norm, is_distributed, sum_across


def policy_update(
    module: Any,
    prompt: dict[str, Tensor],
    rollout: Rollout,
    features: list[Tensor] | None,
    advantages: Tensor,
    keep: Tensor,
    ref: Tensor | None,
) -> dict[str, float]:
    """mu passes of clipped policy-gradient steps over the rollout of a GRPOModule.

    advantages [B*G], keep [B*G] bool (rows that enter the loss), ref [B*G, T] or
    None. Returns the step's mean loss statistics, grad norm and step counts.
    """
    optimizer = module.optimizers()
    scheduler = module.lr_schedulers()
    base = unwrap(module.policy)
    cfg = module.loss_cfg
    rows = torch.arange(rollout.completion_ids.shape[0], device=module.device)  # [B*G]
    loss_mask = rollout.completion_mask  # [B*G, T]
    if is_distributed():
        loss_mask = loss_mask * keep[:, None]  # same micro-batches on every process
    else:
        rows = rows[keep]
    old = None
    if cfg.mu > 1:  # the policy moves between passes: freeze today's log-probs first
        with torch.no_grad(), module._phase("logprobs"):
            old = torch.zeros_like(rollout.logprobs)  # [B*G, T]
            for micro in rows.split(module.micro_batch_size):
                old[micro] = module._logprobs(base, prompt, rollout, micro, features)
    per_update = (module.prompts_per_update or rollout.prompt_ids.shape[0]) * rollout.group_size
    if not any_across(bool((advantages[keep] != 0).any()), module.device):
        # as many (empty) steps as a full update, so global_step moves the same way
        steps = math.ceil(rollout.completion_ids.shape[0] / per_update) * cfg.mu
        return skip_update(optimizer, scheduler, steps)
    sums: dict[str, float] = {}
    norms: list[float] = []
    count = nonfinite = 0
    for _ in range(cfg.mu):
        for mini in rows.split(per_update):
            mask = loss_mask[mini]  # [m, T]
            mini_tokens = int(mask.sum())
            tokens = int(sum_across(torch.tensor([mini_tokens], device=module.device))[0])
            seqs = int((mask.sum(-1) > 0).sum())
            for micro in mini.split(module.micro_batch_size):
                cmask = loss_mask[micro]  # [n, T]
                with module._phase("backward"), module._out_of_memory("backward"):
                    logp = module._logprobs(base, prompt, rollout, micro, features)  # [n, T]
                    loss, stats = policy_loss(
                        logp,
                        logp.detach() if old is None else old[micro],
                        advantages[micro],
                        cmask,
                        ref_logp=None if ref is None else ref[micro],
                        beta=cfg.beta,
                        eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high,
                        dual_clip=cfg.dual_clip,
                        loss_type=cfg.loss_type,
                        importance_level=cfg.importance_level,
                        max_completion_length=module.sampling.max_new_tokens,
                        num_valid_tokens_global=tokens,
                        world_size=module.trainer.world_size,
                    )
                    # Each micro-batch's share of its update batch, so that accumulating
                    # 2 x 4 sequences gives the same step as 1 x 8.
                    share = micro_share(cfg.loss_type, cmask, mini_tokens, seqs)
                    module.manual_backward(loss * share)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * share
                count += 1
            with module._phase("optimizer"):
                params = [p for p in module.policy.parameters() if p.requires_grad]
                # the norm is global (all processes' gradients), so every process
                # takes the same branch
                norm = float(clip_grad_norm(params, module.max_grad_norm))
                if math.isfinite(norm):
                    norms.append(norm)
                else:  # NaN/inf loss or gradient: never step on it
                    nonfinite += 1
                    optimizer.zero_grad(set_to_none=True)
                optimizer.step()  # without gradients: weights and AdamW state untouched
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
    means = {k: v / max(count, 1) for k, v in sums.items()}
    means["grad_norm"] = sum(norms) / max(len(norms), 1)
    means["optimizer_steps"] = float(len(norms) + nonfinite)
    means["skipped_steps"] = 0.0
    means["nonfinite_steps"] = float(nonfinite)
    return means


def skip_update(optimizer: Any, scheduler: Any, steps: int) -> dict[str, float]:
    """An update with no reward signal on any process: no forward, no backward.

    Every advantage is 0, so the policy-gradient term is 0; what a step would still do
    is pull towards the reference (KL, beta > 0) and apply AdamW's decay and momentum,
    moving the policy with no reward behind it. Instead each optimizer step is taken
    with no gradients, which torch optimizers skip (weights and AdamW state stay as
    they are), so global_step and the schedule advance as in a normal update.
    """
    optimizer.zero_grad(set_to_none=True)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return {
        "skipped_steps": 1.0,
        "grad_norm": 0.0,
        "optimizer_steps": float(steps),
        "nonfinite_steps": 0.0,
    }


def micro_share(loss_type: str, cmask: Tensor, tokens: int, seqs: int) -> float:
    """A micro-batch's weight in its update batch of `tokens` tokens / `seqs` sequences.

    cmask [n, T] is the micro-batch's loss mask.
    """
    if loss_type == "dapo":  # already divided by the global token count
        return 1.0
    if loss_type == "bnpo":
        return float(cmask.sum()) / max(tokens, 1)
    if loss_type == "dr_grpo":  # divided by its row count, masked rows included
        return cmask.shape[0] / max(seqs, 1)
    return float((cmask.sum(-1) > 0).sum()) / max(seqs, 1)  # grpo: per sequence


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's "can't allocate memory"."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text)
    )


def out_of_memory_error(
    err: BaseException,
    phase: str,
    step: int,
    sampling: SamplingConfig,
    micro_batch_size: int,
    records: list[dict] | None = None,
) -> PebrError:
    """The error to raise instead of `err`: the phase, the step, the settings to lower."""
    if phase == "rollout":
        lower = (
            f"model.sampling.group_size ({sampling.group_size}), "
            f"model.sampling.max_new_tokens ({sampling.max_new_tokens}) or data.batch_size"
        )
    else:
        lower = (
            f"model.micro_batch_size ({micro_batch_size}), "
            f"model.sampling.max_new_tokens ({sampling.max_new_tokens}) or "
            "model.logprob_chunk_size, or set model.gradient_checkpointing: true, "
            "model.lora or model.quantization"
        )
    ids = f", samples {', '.join(str(r['id']) for r in records[:5])}" if records else ""
    return PebrError(
        f"out of memory in the {phase} (step {step}{ids}): lower {lower}"
        f" ({type(err).__name__}: {str(err)[:200]})"
    )


class NonFiniteGuard:
    """Stops a run after `limit` steps in a row whose update was not finite.

    A single NaN/inf loss or gradient norm only skips that optimizer step (counted in
    train/nonfinite_steps); several in a row mean the run would only skip from then
    on, so it stops, naming the step and the rewards that went in.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise PebrError(f"max_nonfinite_steps must be >= 1, got {limit}")
        self.limit = limit
        self.streak = 0

    def check(self, metrics: dict[str, float], scored: dict[str, Any], step: int) -> None:
        self.streak = self.streak + 1 if metrics.get("nonfinite_steps") else 0
        if self.streak >= self.limit:
            raise nonfinite_error(step, self.streak, scored)


def nonfinite_error(step: int, streak: int, scored: dict[str, Any]) -> PebrError:
    """The error that stops a run after `streak` non-finite updates in a row."""
    totals = scored["rewards"].double()
    finite = totals[torch.isfinite(totals)]
    figures = (
        f"min {finite.min().item():.4g}, max {finite.max().item():.4g}"
        if finite.numel()
        else "none finite"
    )
    largest = {
        name: max((abs(v) for v in values if v is not None), default=None)
        for name, values in scored["result"].per_reward.items()
    }
    return PebrError(
        f"step {step}: the loss or its gradient was not finite in {streak} steps in a row "
        f"(each skipped, weights unchanged); this batch's total rewards: {figures}; largest "
        f"|score| per reward: {largest}. Check the rewards' scale and weights, or lower "
        "model.optim.lr; model.max_nonfinite_steps sets how many are tolerated"
    )
