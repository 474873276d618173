"""The reward contract that built-in and third-party rewards implement.

A reward is an instance of a callable class (so it pickles into worker processes)
with a `name` and

    __call__(self, *, completions: list[str], samples: list[dict], **context)
        -> list[float | None] | RewardOutput

called once per rollout batch. `completions[i]` was generated for the prompt of
`samples[i]`, the full manifest record (extra fields included, `image` resolved to
an absolute path). `context` carries what else a reward may need (CONTEXT_KEYS);
a reward must accept and ignore keys it does not use. A score of None means "not
applicable to this sample": it is left out of that sample's weighted sum.

docs/plugins.md is the author's guide to this contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# Keys the trainer always passes in `context`. Rewards may rely on these.
CONTEXT_KEYS = {
    "images": "list[PIL.Image.Image]: the image of each sample (its first, where it has "
    "several), aligned with completions",
    "image_lists": "list[list[PIL.Image.Image]]: every image of each sample, in order",
    "tokenizer": "the policy's tokenizer (a transformers tokenizer)",
    "processor": "the policy's processor (its tokenizer and image processor)",
    "global_step": "int: the optimizer step at which the batch was generated",
    "device": "torch.device the policy runs on; put reward models there",
}


@dataclass
class RewardOutput:
    """Scores plus named per-sample components that are logged but not summed."""

    scores: list[float | None]
    """One score per completion; None = not applicable."""
    components: dict[str, list[float | None]] = field(default_factory=dict)
    """Per-sample figures to log, e.g. {"recall/objects": [...]}; each as long as scores."""


@runtime_checkable
class Reward(Protocol):
    """What the registry checks a loaded reward class against."""

    name: str

    def __call__(
        self, *, completions: list[str], samples: list[dict[str, Any]], **context: Any
    ) -> list[float | None] | RewardOutput: ...
