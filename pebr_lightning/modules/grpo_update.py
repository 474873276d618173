"""The policy-gradient half of a GRPO step and what its failures say. Its settings,
`GRPOLossConfig` (the `model.init_args.loss` of a config), live beside their maths in
algorithms/loss_config.py.

`policy_update` runs mu passes of clipped updates over one rollout, in micro-batches
with gradient accumulation, one optimizer step per `prompts_per_update` prompts. It
takes a log-prob function and explicit settings (`UpdateSettings`) and the trainer's
handles (`UpdateHooks`), never the module: what it reads is in its signature.
Under a distributed strategy every process makes the same calls in the same order
(sharded forwards and gradient reductions are collectives): rows left out of the
loss are masked rather than skipped, and a step without reward signal is skipped
only when no process has any.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pebr_lightning.algorithms.engine_correction import engine_weights
from pebr_lightning.algorithms.loss_config import GRPOLossConfig
from pebr_lightning.algorithms.losses import policy_loss
from pebr_lightning.errors import PebrError
from pebr_lightning.models.rollout import Rollout, SamplingConfig
from pebr_lightning.modules.grpo_parts import Scores
from pebr_lightning.parallel.sharding import any_across, clip_grad_norm, is_distributed, sum_across


@dataclass(frozen=True)
class UpdateConfig:
    """How an update runs over a rollout (`model.init_args.update`)."""

    micro_batch_size: int = 8
    """Sequences per forward/backward; gradients accumulate over micro-batches up to
    one optimizer step."""
    prompts_per_update: int | None = None
    """Prompts (x G sequences) per optimizer step; None: the whole rollout in one step.
    The paper: 560 prompts per rollout, 112 per update."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this before each optimizer step."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is NaN/inf skips its optimizer step
    (train/nonfinite_steps); this many in a row stop the run with an error naming the
    step and the rewards."""
    share_prompt: bool = True
    """In log-prob passes and the loss, run each prompt once per micro-batch and its G
    completions on its KV cache (gradients flow back through the cache), instead of G
    full prompt + completion sequences. Off under gradient checkpointing."""
    logprob_chunk_size: int = 1024
    """Completion tokens per chunk when computing log-probs."""

    def __post_init__(self) -> None:
        for key in ("micro_batch_size", "max_nonfinite_steps", "logprob_chunk_size"):
            if getattr(self, key) < 1:
                raise PebrError(f"update.{key} must be >= 1, got {getattr(self, key)}")
        if self.prompts_per_update is not None and self.prompts_per_update < 1:
            raise PebrError(
                f"update.prompts_per_update must be >= 1, got {self.prompts_per_update}"
            )
        if not self.max_grad_norm > 0:
            raise PebrError(f"update.max_grad_norm must be > 0, got {self.max_grad_norm}")


@dataclass(frozen=True)
class UpdateSettings:
    """What shapes an update, fixed for a run: the module's blocks, handed whole."""

    loss: GRPOLossConfig
    update: UpdateConfig
    max_completion_length: int
    """sampling.max_new_tokens (ConstantLength's denominator, Dr. GRPO)."""


@dataclass
class UpdateHooks:
    """What the trainer lends an update: its optimizer, scheduler and backward, the
    parameters to clip, and context managers that time a phase and turn an
    out-of-memory failure into a clear error."""

    optimizer: Any
    scheduler: Any
    backward: Callable[[Tensor], None]
    params: list[Tensor]
    phase: Callable[[str], AbstractContextManager]
    out_of_memory: Callable[[str], AbstractContextManager]
    world_size: int = 1


def policy_update(
    logprobs: Callable[[Tensor], Tensor],
    rollout: Rollout,
    advantages: Tensor,
    keep: Tensor,
    ref: Tensor | None,
    settings: UpdateSettings,
    hooks: UpdateHooks,
) -> dict[str, float]:
    """mu passes of clipped policy-gradient steps over a rollout.

    logprobs(rows [n] long) -> [n, T] log-probs of those rows' completion tokens under
    the current policy, with gradients. advantages [B*G], keep [B*G] bool (rows that
    enter the loss), ref [B*G, T] or None. Returns the step's mean loss statistics,
    grad norm and step counts.
    """
    cfg = settings.loss
    reduction = cfg.build_reduction()
    device = advantages.device
    rows = torch.arange(rollout.completion_ids.shape[0], device=device)  # [B*G]
    loss_mask = rollout.completion_mask  # [B*G, T]
    if is_distributed():
        loss_mask = loss_mask * keep[:, None]  # same micro-batches on every process
    else:
        rows = rows[keep]
    old = None
    if cfg.mu > 1:  # the policy moves between passes: freeze today's log-probs first
        with torch.no_grad(), hooks.phase("logprobs"):
            old = torch.zeros_like(rollout.logprobs)  # [B*G, T]
            for micro in rows.split(settings.update.micro_batch_size):
                old[micro] = logprobs(micro)
    prompts = settings.update.prompts_per_update or rollout.prompt_ids.shape[0]
    per_update = prompts * rollout.group_size
    if not any_across(bool((advantages[keep] != 0).any()), device):
        # as many (empty) steps as a full update, so global_step moves the same way
        steps = math.ceil(rollout.completion_ids.shape[0] / per_update) * cfg.mu
        return skip_update(hooks.optimizer, hooks.scheduler, steps)
    sums: dict[str, float] = {}
    norms: list[float] = []
    count = nonfinite = 0
    for _ in range(cfg.mu):
        for mini in rows.split(per_update):
            mask = loss_mask[mini]  # [m, T]
            mini_tokens = int(mask.sum())
            tokens = int(sum_across(torch.tensor([mini_tokens], device=device))[0])
            seqs = int((mask.sum(-1) > 0).sum())
            for micro in mini.split(settings.update.micro_batch_size):
                cmask = loss_mask[micro]  # [n, T]
                with hooks.phase("backward"), hooks.out_of_memory("backward"):
                    logp = logprobs(micro)  # [n, T]
                    # how far the engine's sampling-time log-probs are from the trainer's
                    # (0 up to float noise for the HF engine; vLLM's kernels differ)
                    diff = (logp.detach() - rollout.logprobs[micro]).abs() * cmask  # [n, T]
                    sums["engine_logprob_gap"] = sums.get("engine_logprob_gap", 0.0) + float(
                        diff.sum() / cmask.sum().clamp(min=1)
                    )
                    old_logp = logp.detach() if old is None else old[micro]  # [n, T]
                    weights, correction = engine_weights(
                        old_logp,
                        rollout.logprobs[micro],
                        cmask,
                        cfg.engine_correction,
                        cfg.engine_correction_cap,
                    )
                    loss, stats = policy_loss(
                        logp,
                        old_logp,
                        advantages[micro],
                        cmask,
                        ref_logp=None if ref is None else ref[micro],
                        beta=cfg.beta,
                        eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high,
                        dual_clip=cfg.dual_clip,
                        reduction=reduction,
                        importance_level=cfg.importance_level,
                        max_completion_length=settings.max_completion_length,
                        num_valid_tokens_global=tokens,
                        world_size=hooks.world_size,
                        engine_weights=weights,
                    )
                    stats.update(correction)
                    share = reduction.share(cmask, mini_tokens, seqs)
                    hooks.backward(loss * share)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * share
                count += 1
            with hooks.phase("optimizer"):
                # the norm is global (all processes' gradients), so every process
                # takes the same branch
                norm = float(clip_grad_norm(hooks.params, settings.update.max_grad_norm))
                if math.isfinite(norm):
                    norms.append(norm)
                else:  # NaN/inf loss or gradient: never step on it
                    nonfinite += 1
                    hooks.optimizer.zero_grad(set_to_none=True)
                hooks.optimizer.step()  # without gradients: weights and AdamW state untouched
                hooks.optimizer.zero_grad(set_to_none=True)
                hooks.scheduler.step()
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


@contextmanager
def memory_guard(
    phase: str,
    step: int,
    sampling: SamplingConfig,
    micro_batch_size: int,
    records: list[dict] | None = None,
) -> Iterator[None]:
    """Re-raise CUDA's OutOfMemoryError, or CPU's failed allocation, as a PebrError
    that names the phase, the step and the settings that lower memory use there."""
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        raise out_of_memory_error(err, phase, step, sampling, micro_batch_size, records) from err


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
            f"model.update.micro_batch_size ({micro_batch_size}), "
            f"model.sampling.max_new_tokens ({sampling.max_new_tokens}) or "
            "model.update.logprob_chunk_size, or set model.policy.gradient_checkpointing: "
            "true, model.policy.lora or model.policy.quantization"
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
            raise PebrError(f"update.max_nonfinite_steps must be >= 1, got {limit}")
        self.limit = limit
        self.streak = 0

    def check(self, metrics: dict[str, float], scores: Scores, step: int) -> None:
        self.streak = self.streak + 1 if metrics.get("nonfinite_steps") else 0
        if self.streak >= self.limit:
            raise nonfinite_error(step, self.streak, scores)


def nonfinite_error(step: int, streak: int, scores: Scores) -> PebrError:
    """The error that stops a run after `streak` non-finite updates in a row."""
    totals = scores.rewards.double()
    finite = totals[torch.isfinite(totals)]
    figures = (
        f"min {finite.min().item():.4g}, max {finite.max().item():.4g}"
        if finite.numel()
        else "none finite"
    )
    largest = {
        name: max((abs(v) for v in values if v is not None), default=None)
        for name, values in scores.result.per_reward.items()
    }
    return PebrError(
        f"step {step}: the loss or its gradient was not finite in {streak} steps in a row "
        f"(each skipped, weights unchanged); this batch's total rewards: {figures}; largest "
        f"|score| per reward: {largest}. Check the rewards' scale and weights, or lower "
        "model.optim.lr; model.update.max_nonfinite_steps sets how many are tolerated"
    )
