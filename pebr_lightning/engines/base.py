"""The rollout seam: one protocol for whatever generates completions.

GRPO's rollouts, `pebr eval` and `pebr sample` all generate through a
`RolloutEngine`: `generate(prompt, sampling, keys=..., generator=...) -> Rollout`
(token ids, masks, the engine's own log-probs of the sampled tokens) and
`sync_weights(policy)` after the policy changed. `HFEngine` (engines/hf.py) decodes
with the transformers model being trained; an engine that serves the policy from
elsewhere (another process, another library) implements the same two methods and is
chosen by name in `RolloutConfig` (`model.init_args.rollout` in a GRPO config).

    engine.sync_weights(policy)                         # after each optimizer step
    rollout = engine.generate(prompt, sampling, keys=keys)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from pebr_lightning.data.collate import PROMPT_KEYS, PromptCollator, RecordDataset
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.errors import PebrError
from pebr_lightning.models.rollout import Rollout, SamplingConfig, decode_completions

ENGINES = ("hf",)


@dataclass(frozen=True)
class RolloutConfig:
    """Which engine generates the rollouts."""

    engine: Literal["hf"] = "hf"
    """`hf`: the transformers model being trained decodes its own rollouts (each prompt
    prefilled once, its KV cache repeated for the G completions of its group)."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise PebrError(f"rollout.engine must be one of {ENGINES}, got {self.engine!r}")


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates G completions for each of B prompts."""

    def generate(
        self,
        prompt: dict[str, Tensor],
        sampling: SamplingConfig,
        *,
        keys: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """`prompt`: left-padded PromptCollator tensors (input_ids, attention_mask [B, P],
        mm_token_type_ids, image_grid_thw, pixel_values) on the policy's device.
        `keys` [B*G] int64: keyed sampling noise (the same completions whatever the
        batch holds); else `generator` draws (None: torch's global RNG). Returns the
        B*G completions, group members contiguous, with `features` set when the engine
        computed image features the trainer may reuse."""
        ...

    def sync_weights(self, policy: nn.Module) -> None:
        """Make the engine generate with `policy`'s current weights."""
        ...


def build_engine(
    config: RolloutConfig,
    processor: Any,
    share_image_features: bool = True,
    synced: bool = False,
) -> RolloutEngine:
    """The engine `config` names. `synced`: the policy is sharded, so every process
    must keep decoding (each forward is a collective) until all are done."""
    from pebr_lightning.engines.hf import HFEngine

    if config.engine == "hf":
        return HFEngine(processor, share_image_features, synced=synced)
    raise PebrError(f"rollout.engine must be one of {ENGINES}, got {config.engine!r}")


def complete_records(
    engine: RolloutEngine,
    processor: Any,
    records: Sequence[dict[str, Any]],
    sampling: SamplingConfig,
    *,
    batch_size: int = 16,
    prompt: PromptConfig = PromptConfig(),
    device: torch.device | str = "cpu",
    seed: int | None = None,
) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
    """Yield (records of a batch, their G completions each as text, group members
    contiguous): the loop `pebr eval` and `pebr sample` run over a manifest.

    Prompts are batched with left padding. With `seed`, the batch starting at record
    i draws from a generator seeded with seed + i, so a run resumed at a batch
    boundary draws what it would have drawn.
    """
    collate = PromptCollator(processor, prompt)
    dataset = RecordDataset(list(records))
    for first in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        inputs = {k: v.to(device) for k, v in collate(items).items() if k in PROMPT_KEYS}
        # torch.multinomial wants a generator on the device of the probabilities.
        generator = None if seed is None else torch.Generator(device).manual_seed(seed + first)
        rollout = engine.generate(inputs, sampling, generator=generator)
        yield [item["record"] for item in items], decode_completions(processor.tokenizer, rollout)
