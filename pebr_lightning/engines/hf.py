"""HFEngine: rollouts decoded by the transformers model being trained (engine `hf`).

Nothing to copy on a weight sync: the engine holds the live policy (PEFT-wrapped or
not), so `sync_weights` only points it there. Each image is encoded once and each
prompt prefilled once, its KV cache repeated for the G completions of its group
(`sample_group`); the image features come back on the Rollout for the trainer's
log-prob passes to reuse.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pebr_lightning.algorithms.sampling import KeyedGumbel, sample_tokens
from pebr_lightning.engines.base import EngineContext
from pebr_lightning.models.families import family_of
from pebr_lightning.models.kv_cache import reserve
from pebr_lightning.models.policy import unwrap
from pebr_lightning.models.rollout import (
    Rollout,
    SamplingConfig,
    all_features,
    eos_token_ids,
    model_inputs,
    row_inputs,
    supports_shared_features,
    vision_token_ids,
)
from pebr_lightning.parallel.sharding import any_across


@dataclass(frozen=True)
class HFConfig:
    """Settings of the `hf` engine: none of its own (the policy's module decodes; whether
    it shares image features with the trainer is the module's `share_image_features`)."""

    in_process = True

    def build(self, context: EngineContext) -> HFEngine:
        return HFEngine(context.processor, context.share_image_features, synced=context.synced)


class HFEngine:
    name = "hf"

    def __init__(self, processor: Any, share_image_features: bool = True, synced: bool = False):
        """
        Args:
            processor: the policy's processor (its tokenizer's EOS and padding ids).
            share_image_features: encode each image once and reuse the features.
            synced: sharded weights: decode until every process is done.
        """
        self.processor = processor
        self.share_image_features = share_image_features
        self.synced = synced
        self.policy: nn.Module | None = None
        self.tokenizer = processor.tokenizer
        self.pad = self.tokenizer.pad_token_id

    def sync_weights(self, policy: nn.Module) -> None:
        self.policy = policy  # the live module: its weights are always the current ones

    def at_step(self, step: int) -> None:
        del step  # its errors come from the model's own forward, which names no step

    def close(self) -> None:
        self.policy = None  # nothing started; drop the reference to the module

    @torch.no_grad()
    def generate(
        self,
        prompt: dict[str, Tensor],
        sampling: SamplingConfig,
        *,
        keys: Tensor | None = None,
        generator: torch.Generator | None = None,
        records: Sequence[dict[str, Any]] | None = None,
    ) -> Rollout:
        del records  # the prompt tensors hold everything this engine needs
        if self.policy is None:
            raise RuntimeError("HFEngine.generate before sync_weights(policy)")
        policy = self.policy
        base = unwrap(policy)
        was_training = policy.training
        policy.eval()  # no dropout while sampling
        try:
            share = self.share_image_features and supports_shared_features(base)
            features = all_features(base, prompt) if share else None
            rollout = sample_group(
                policy,
                base,
                prompt,
                sampling,
                eos_token_ids(self.tokenizer, family_of(base.config).end_tokens),
                self.pad,
                features,
                generator,
                keys=keys,
                synced=self.synced,
            )
        finally:
            policy.train(was_training)
        rollout.features = features
        return rollout


@torch.no_grad()
def sample_group(
    policy: nn.Module,
    base: nn.Module,
    prompt: dict[str, Tensor],
    sampling: SamplingConfig,
    eos_ids: list[int],
    pad_id: int,
    features: list[Tensor] | None = None,
    generator: torch.Generator | None = None,
    keys: Tensor | None = None,
    synced: bool = False,
) -> Rollout:
    """Prefill each prompt once, repeat its KV cache G times, decode B·G completions.

    `prompt` holds left-padded input_ids/attention_mask/mm_token_type_ids [B, P] and
    the family's image inputs (models/families/). `base` is the transformers model inside
    `policy` (the same object without PEFT); LoRA layers are active in both.
    Image/video placeholder tokens are never sampled: in a completion they would make
    the next forward expect image features it does not have.

    `keys` ([B*G] int64) switch to keyed noise (algorithms/sampling.py): the same
    completions whatever the batch holds. `synced` keeps decoding until every
    process is done: with sharded weights each forward is a collective, so a process
    whose completions all ended must keep stepping (on padding) while others run.
    """
    start = time.perf_counter()
    g = sampling.group_size
    input_ids, mask = prompt["input_ids"], prompt["attention_mask"]  # [B, P]
    b = input_ids.shape[0]
    family = family_of(base.config)
    images = model_inputs(family, prompt, torch.arange(b, device=input_ids.device) * g, g, features)
    out = base.model(
        input_ids=input_ids,
        attention_mask=mask,
        use_cache=True,
        **row_inputs(family, prompt["mm_token_type_ids"], mask),
        **images,
    )
    logits = base.lm_head(out.last_hidden_state[:, -1])  # [B, V]
    cache = out.past_key_values
    cache.batch_repeat_interleave(g)  # [B*G] from here on
    reserve(cache, sampling.max_new_tokens)  # written in place, not grown by copy
    # Position of the k-th real token = k + the family's offset (Qwen: text after an
    # image continues from its 2-D positions, what get_rope_index computed in the prefill).
    delta = family.position_offset(base, mask).repeat_interleave(g, 0)  # [B*G, 1]
    logits = logits.repeat_interleave(g, 0)  # [B*G, V]
    attention = mask.repeat_interleave(g, 0)  # [B*G, P]
    real = attention.sum(-1, keepdim=True)  # [B*G, 1]
    # The mask of the prompt and every step to come; decode step t reads its first
    # P + t + 1 columns (a view: no copy per step).
    p = attention.shape[1]
    attention = torch.cat([attention, attention.new_zeros(b * g, sampling.max_new_tokens)], 1)
    eos = torch.tensor(eos_ids, device=input_ids.device)

    tokens, logps, alive_steps = [], [], []
    alive = torch.ones(b * g, dtype=torch.bool, device=input_ids.device)  # [B*G]
    banned = torch.tensor(vision_token_ids(base.config), dtype=torch.long, device=input_ids.device)
    banned_early = torch.cat([banned, eos])  # before min_new_tokens: no EOS either
    noise = None if keys is None else KeyedGumbel(keys, logits.shape[-1], sampling.max_new_tokens)
    for step in range(sampling.max_new_tokens):
        token, logp = sample_tokens(
            logits,
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
            generator,
            banned_early if step < sampling.min_new_tokens else banned,
            gumbel=None if noise is None else noise(step),
        )  # [B*G], [B*G]
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        tokens.append(token)
        logps.append(torch.where(alive, logp, torch.zeros_like(logp)))
        alive_steps.append(alive)
        alive = alive & ~torch.isin(token, eos)
        running = bool(alive.any())  # a device sync: the time below is the real one
        if synced:
            running = any_across(running, alive.device)
        if step == 0:
            first_token_s = time.perf_counter() - start
        if not running or step == sampling.max_new_tokens - 1:
            break
        attention[:, p + step] = alive
        out = base.model(
            input_ids=token[:, None],
            attention_mask=attention[:, : p + step + 1],  # [B*G, P+step+1]
            position_ids=real + step + delta,  # [B*G, 1]
            past_key_values=cache,
            use_cache=True,
        )
        logits = base.lm_head(out.last_hidden_state[:, -1])  # [B*G, V]

    completion_ids = torch.stack(tokens, dim=1)  # [B*G, T]
    completion_mask = torch.stack(alive_steps, dim=1).long()  # [B*G, T]
    return Rollout(
        prompt_ids=input_ids,
        prompt_mask=mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=torch.stack(logps, dim=1),
        truncated=alive,
        group_size=g,
        seconds=time.perf_counter() - start,
        first_token_seconds=first_token_s,
    )
