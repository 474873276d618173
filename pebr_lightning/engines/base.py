"""The rollout seam: one protocol for whatever generates completions, and the config
that picks an engine.

GRPO's rollouts, `pebr eval` and `pebr sample` all generate through a
`RolloutEngine`. Engines are plugins, like rewards: each registers its settings class
under the entry-point group `pebr_lightning.engines` (name -> `module:Class`), and
a config picks one by that name or by class path, with the settings as init_args:

    rollout:
      name: vllm                      # or class_path: my_pkg.engine.MySettings
      init_args: {python: .vllm-env/bin/python, dtype: bfloat16}

The settings class (`EngineSettings`) checks its values when built and `build`s the
engine from an `EngineContext` (the processor, the policy's spec, whether weights are
sharded or trained). The built-ins: `hf` (engines/hf.py, the transformers model being
trained decodes its own rollouts) and `vllm` (engines/vllm_engine.py, a worker in its
own process). docs/architecture.md, "How to add an engine", walks through a new one.

    engine = build_engine(config, EngineContext(processor, spec=spec))
    engine.sync_weights(policy)                         # after each optimizer step
    engine.at_step(step)                                # errors name the step
    rollout = engine.generate(prompt, sampling, keys=keys, records=records)
    engine.close()                                      # a worker process it started
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from jsonargparse.typing import register_type
from torch import Tensor, nn

from pebr_lightning.algorithms.variants import build_variant
from pebr_lightning.class_paths import import_dotted
from pebr_lightning.data.collate import PromptCollator, RecordDataset, prompt_inputs
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.entry_points import builtin_first
from pebr_lightning.errors import PebrError
from pebr_lightning.models.rollout import Rollout, SamplingConfig, decode_completions

GROUP = "pebr_lightning.engines"
"""The entry-point group engines register their settings class under."""

ROLLOUT_KEYS = ("name", "class_path", "init_args")

FORMER_KEYS = {
    "vllm_python": "python",
    "vllm_url": "url",
    "vllm_dtype": "dtype",
    "max_lora_rank": "max_lora_rank",
    "startup_timeout_s": "startup_timeout_s",
    "request_timeout_s": "request_timeout_s",
    "vllm_max_model_len": "max_model_len",
}
"""The flat vLLM keys of `rollout` before 2026-12-06 -> their name in the vllm
engine's init_args."""


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates G completions for each of B prompts; everything its callers use."""

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
        """Make the engine generate with `policy`'s current weights (before the first
        `generate` too: an in-process engine decodes the module it is given here)."""
        ...

    def at_step(self, step: int) -> None:
        """The training step the next calls belong to, for the engine's errors and logs."""
        ...

    def close(self) -> None:
        """Release what the engine started (a worker process, temporary files); the
        engine is not used after. Called once, also when the run failed."""
        ...


@dataclass(frozen=True)
class EngineContext:
    """What an engine is built from, besides its own settings."""

    processor: Any
    """The policy's processor (tokenizer: EOS and padding ids, prompt text)."""
    spec: Any = None
    """The policy's PolicySpec (models/policy.py): the model folder a worker loads
    first, and the LoRA settings when one is trained; None for an in-process engine
    built outside a run."""
    synced: bool = False
    """The policy is sharded: every process makes the same calls (each forward is a
    collective), so every process must keep decoding until all are done."""
    trains: bool = True
    """Weights will be synced after updates (GRPO); False for `pebr eval` and
    `pebr sample`, which decode the model as loaded."""
    share_image_features: bool = True
    """Encode each image once and hand its features to the trainer (in-process engines)."""


@runtime_checkable
class EngineSettings(Protocol):
    """An engine's settings class: its fields are the engine's init_args (checked when
    it is constructed), and it builds the engine."""

    in_process: bool
    """True: the engine decodes the policy module of this process (`sync_weights` hands
    it over), so `pebr eval` and `pebr sample` load the model here first. False: it
    serves the model from elsewhere and loads `context.spec` itself."""

    def build(self, context: EngineContext) -> RolloutEngine:
        """The engine, ready for `sync_weights` and `generate`."""
        ...


class RolloutConfigError(PebrError, ValueError):
    """A `rollout` entry of a config is malformed (a ValueError too, for jsonargparse)."""


@dataclass(frozen=True)
class RolloutConfig:
    """Which engine generates the rollouts, and its settings."""

    name: str | None = None
    """An engine's registered name (`pebr_lightning.engines` entry points): `hf` (the
    default), `vllm`, or one a plugin package installs."""
    class_path: str | None = None
    """Instead of `name`: the dotted path of an engine's settings class."""
    init_args: dict[str, Any] = field(default_factory=dict)
    """The engine's settings: the fields of its settings class."""

    def __post_init__(self) -> None:
        if self.name is not None and self.class_path is not None:
            raise RolloutConfigError(
                f"rollout: give name or class_path, not both ({self.name!r}, {self.class_path!r})"
            )
        if not isinstance(self.init_args, Mapping):
            raise RolloutConfigError(f"rollout.init_args must be a mapping, got {self.init_args!r}")
        object.__setattr__(self, "init_args", dict(self.init_args))

    @property
    def label(self) -> str:
        """The engine as the config names it."""
        return self.class_path or self.name or "hf"

    def settings(self) -> EngineSettings:
        """The engine's settings object, built and checked; errors name the engine."""
        key = f"rollout ({self.label})"
        path = self.class_path if self.class_path is not None else engine_class_path(self.label)
        cls = None
        with contextlib.suppress(Exception):  # build_variant reports what fails to import
            cls = import_dotted(path)
        if dataclasses.is_dataclass(cls):
            known = [f.name for f in dataclasses.fields(cls) if f.init]
            unknown = sorted(set(self.init_args) - set(known))
            if unknown:
                raise RolloutConfigError(
                    f"{key}: unknown setting(s) {unknown} in init_args; its settings: "
                    f"{', '.join(known) or 'none'}"
                )
        spec = {"class_path": path, "init_args": self.init_args}
        return build_variant(spec, EngineSettings, key)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint or a YAML dump."""
        data: dict[str, Any] = {}
        if self.class_path is not None:
            data["class_path"] = self.class_path
        else:
            data["name"] = self.name or "hf"
        data["init_args"] = copy.deepcopy(self.init_args)
        return data

    @classmethod
    def parse(cls, data: Any) -> RolloutConfig:
        """The inverse of `to_dict`; a bare name stands for `{name: NAME}`. The flat keys
        used before 2026-12-06 (`engine: vllm`, `vllm_python`, ...) are read, with a
        warning that shows the entry to write."""
        if isinstance(data, RolloutConfig):
            return data
        if isinstance(data, str):
            return cls(name=data)
        if not isinstance(data, Mapping):
            raise RolloutConfigError(f"rollout must be a mapping or an engine name, got {data!r}")
        data = dict(data)
        if set(data) & {"engine", *FORMER_KEYS}:
            new = _from_former(data)
            warnings.warn(
                f"rollout: the flat keys {sorted(data)} were replaced on 2026-12-06; write "
                f"rollout: {new.to_dict()}",
                FutureWarning,
                stacklevel=2,
            )
            return new
        unknown = sorted(set(data) - set(ROLLOUT_KEYS))
        if unknown:
            raise RolloutConfigError(
                f"rollout has unknown key(s) {unknown}; accepted: {', '.join(ROLLOUT_KEYS)} "
                "(an engine's own settings go under init_args)"
            )
        return cls(**data)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Checkpoints written before 2026-12-06 hold the flat fields (engine,
        # vllm_python, ...): they load as the entry those fields meant.
        if "init_args" not in state:
            state = _from_former(state).__dict__
        self.__dict__.update(state)


def _from_former(data: Mapping[str, Any]) -> RolloutConfig:
    """The entry that `rollout`'s flat keys of before 2026-12-06 meant."""
    unknown = sorted(set(data) - set(FORMER_KEYS) - {"engine"})
    if unknown:
        raise RolloutConfigError(
            f"rollout has unknown key(s) {unknown} beside the former flat keys; write "
            "rollout: {name: ENGINE, init_args: {...}}"
        )
    name = data.get("engine") or "hf"
    if name != "vllm":  # the vLLM settings meant nothing to the other engine
        return RolloutConfig(name=name)
    args = {FORMER_KEYS[k]: v for k, v in data.items() if k in FORMER_KEYS and v is not None}
    return RolloutConfig(name="vllm", init_args=args)


# A rollout entry has `class_path` and `init_args`, which jsonargparse would otherwise
# read as a subclass to build; as a registered type a YAML mapping goes to `parse`.
# The engine is looked up (imported) by GRPOModule's __init__ and by the commands that
# decode, so a misspelt name is one `error:` line, not a parser error with usage text.
register_type(
    RolloutConfig,
    serializer=RolloutConfig.to_dict,
    deserializer=RolloutConfig.parse,
    deserializer_exceptions=(RolloutConfigError, TypeError),
)


def registered_engines() -> dict[str, str]:
    """Every engine name the installed distributions register -> its settings class path."""
    return {name: ep.value for name, ep in builtin_first(GROUP).items()}


def engine_class_path(name: str) -> str:
    """The settings class path registered as `name`; the error lists what is installed."""
    found = registered_engines()
    if name not in found:
        import difflib

        near = difflib.get_close_matches(name, list(found), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PebrError(
            f"rollout: no engine named {name!r} is installed{hint}; installed: "
            f"{', '.join(sorted(found)) or 'none'} (or give rollout.class_path)"
        )
    return found[name]


def build_engine(config: RolloutConfig, context: EngineContext) -> RolloutEngine:
    """The engine `config` names, built for `context`."""
    engine = config.settings().build(context)
    if not isinstance(engine, RolloutEngine):
        missing = [
            m for m in ("generate", "sync_weights", "at_step", "close") if not hasattr(engine, m)
        ]
        raise PebrError(
            f"rollout ({config.label}): the engine it built ({type(engine).__name__}) lacks "
            f"{', '.join(missing)} (engines/base.py: RolloutEngine)"
        )
    return engine


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
        inputs = {k: v.to(device) for k, v in prompt_inputs(collate(items)).items()}
        # torch.multinomial wants a generator on the device of the probabilities.
        generator = None if seed is None else torch.Generator(device).manual_seed(seed + first)
        chunk = [item["record"] for item in items]
        rollout = engine.generate(inputs, sampling, generator=generator, records=chunk)
        yield chunk, decode_completions(processor.tokenizer, rollout)


def timed_sync(engine: RolloutEngine, policy: nn.Module) -> float:
    """`engine.sync_weights(policy)`; the seconds it took."""
    import time

    start = time.perf_counter()
    engine.sync_weights(policy)
    return time.perf_counter() - start


def load_decoder(
    model: str, rollout: RolloutConfig, device: str, dtype: str | None
) -> tuple[nn.Module | None, Any, RolloutEngine]:
    """(policy, processor, engine) for commands that only decode (`pebr eval`, `pebr
    sample`). An in-process engine (`hf`) gets the model loaded here on `device` in
    `dtype`; any other engine serves `model` itself and no policy is loaded here (None).
    The caller must `close()` the engine."""
    from pebr_lightning.models.policy import PolicySpec, build_policy

    settings = rollout.settings()
    spec = PolicySpec(model)
    if settings.in_process:
        built = build_policy(model, dtype=dtype)
        policy = built.model.to(device).eval().requires_grad_(False)
        engine = build_engine(rollout, EngineContext(built.processor, spec=spec, trains=False))
        engine.sync_weights(policy)
        return policy, built.processor, engine
    processor = spec.processor()
    return None, processor, build_engine(rollout, EngineContext(processor, spec, trains=False))
