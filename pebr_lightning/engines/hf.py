"""HFEngine: rollouts decoded by the transformers model being trained.

Nothing to copy on a weight sync: the engine holds the live policy (PEFT-wrapped or
not), so `sync_weights` only points it there. Each image is encoded once and each
prompt prefilled once, its KV cache repeated for the G completions of its group
(models/rollout.py); the image features come back on the Rollout for the trainer's
log-prob passes to reuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pebr_lightning.models.policy import unwrap
from pebr_lightning.models.rollout import (
    Rollout,
    SamplingConfig,
    eos_token_ids,
    image_features,
    sample_group,
    supports_shared_features,
)


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
        tokenizer = processor.tokenizer
        self.eos = eos_token_ids(tokenizer)
        self.pad = tokenizer.pad_token_id

    def sync_weights(self, policy: nn.Module) -> None:
        self.policy = policy  # the live module: its weights are always the current ones

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
            features = (
                image_features(base, prompt["pixel_values"], prompt["image_grid_thw"])
                if share
                else None
            )
            rollout = sample_group(
                policy,
                base,
                prompt,
                sampling,
                self.eos,
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
