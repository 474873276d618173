"""The schedule file (`configs/schedule.yaml`) and its validation.

    out: runs/schedule                 # every stage writes into out/<stage>/
    model: Qwen/Qwen2.5-VL-7B-Instruct # what the first stage starts from
    data: {train: ..., val: ..., test: ..., rl: ...}  # rl: the RL pool (default: train)
    device: auto                       # where sampling and evaluation run
    dtype: auto                        # their weight dtype
    eval: {batch_size: 16, max_new_tokens: 1024, limit: null}
    stages:
      sft:        {config: configs/sft.yaml, args: []}
      sample:     {k: 8, temperature: 1.2, top_p: 0.99, ...}
      perception: {config: configs/perception.yaml, split: easy, args: []}
      reasoning:  {config: configs/reasoning.yaml, split: medium, args: []}

Stages run in that order; a stage left out is not run, and the next one starts
from the latest earlier stage's weights. `start_from` (a weights folder, or a
stage folder of another schedule) and `manifest` override where a training stage
starts and what it trains on.

`data.rl` is the question pool that difficulty sampling draws from, and so the pool
the RL stages train on; without it, the SFT manifest `data.train` is used. A pool of
its own keeps RL questions fresh: the SFT model has not seen their answers, and the
RL reward can then rise only by generalising.

`device` and `dtype` apply to the sample stage and every held-out evaluation (the
training stages run where their own configs say). `device: auto` (the default) is
cuda when there is one, else cpu; any torch device string (cuda:1, cpu) is checked
before the first stage starts. `dtype: auto` (the default) is float32 on the CPU;
on CUDA it is the dtype of the `trainer.precision` the weights were trained in
(bf16-mixed / bf16-true -> bfloat16, 16-mixed -> float16, otherwise float32; read
from the producing stage's config and args), or bfloat16 for weights no stage of
the file produced. float32, bfloat16 or float16 forces one dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pebr_lightning.errors import PebrError
from pebr_lightning.evaluation.devices import DTYPES

ORDER = ("sft", "sample", "perception", "reasoning")
FIT_STAGES = ("sft", "perception", "reasoning")
DATA_KEYS = ("train", "val", "test", "rl")
"""Manifests a schedule names; synthetic splits are written with seed + their index here."""
SAMPLE_KEYS = (
    "k",
    "temperature",
    "top_p",
    "max_new_tokens",
    "easy_min",
    "hard_max",
    "seed",
    "limit",
    "batch_size",
)


@dataclass(frozen=True)
class FitStage:
    """A `pebr fit` stage."""

    name: str
    config: str
    args: tuple[str, ...] = ()
    split: str | None = None
    """Which difficulty split to train on (perception: easy, reasoning: medium)."""
    start_from: str | None = None
    manifest: str | None = None


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule file."""

    path: str
    out: str
    model: str
    data: dict[str, str]
    eval: dict[str, Any]
    fit: dict[str, FitStage]
    sample: dict[str, Any] | None
    synth: dict[str, Any] | None = None
    stage_names: tuple[str, ...] = field(default=())
    device: str = "auto"
    """Where sampling and evaluation run: auto (cuda when available) or a torch device."""
    dtype: str = "auto"
    """Their weight dtype: auto (the producing stage's precision on CUDA) or a dtype name."""


def load_schedule(path: str | Path) -> Schedule:
    """Read and check a schedule file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PebrError(f"schedule file not found: {path}") from None
    except (OSError, yaml.YAMLError) as err:
        raise PebrError(f"cannot read schedule {path}: {err}") from None
    if not isinstance(raw, dict):
        raise PebrError(f"{path}: expected a mapping at the top level")

    def fail(key: str, message: str) -> PebrError:
        return PebrError(f"{path}: field '{key}': {message}")

    known = {"out", "model", "data", "eval", "stages", "synth", "device", "dtype"}
    for key in raw:
        if key not in known:
            raise fail(key, f"unknown field (expected one of {', '.join(sorted(known))})")
    for key in ("out", "model"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise fail(key, "required, a non-empty string")
    device = raw.get("device", "auto")
    if not _device_name(device):
        raise fail("device", f"expected auto or a torch device (cuda, cuda:1, cpu), got {device!r}")
    dtype = raw.get("dtype", "auto")
    if dtype not in DTYPES:
        raise fail("dtype", f"expected one of {', '.join(DTYPES)}, got {dtype!r}")
    data = raw.get("data") or {}
    if not isinstance(data, dict) or not isinstance(data.get("train"), str):
        raise fail("data.train", "required: the training manifest")
    for key, value in data.items():
        if key not in DATA_KEYS or not isinstance(value, str):
            raise fail(f"data.{key}", "expected train, val, test or rl, each a manifest path")
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise fail("stages", f"required: a mapping with some of {', '.join(ORDER)}")
    fit: dict[str, FitStage] = {}
    sample = None
    for name, spec in stages.items():
        if name not in ORDER:
            raise fail(f"stages.{name}", f"unknown stage (expected {', '.join(ORDER)})")
        spec = spec or {}
        if not isinstance(spec, dict):
            raise fail(f"stages.{name}", "expected a mapping")
        if name == "sample":
            for key in spec:
                if key not in SAMPLE_KEYS:
                    raise fail(
                        f"stages.sample.{key}", f"unknown (expected {', '.join(SAMPLE_KEYS)})"
                    )
            sample = dict(spec)
            _check_sample(sample, fail)  # before any stage runs, not after SFT
            continue
        allowed = {"config", "args", "split", "start_from", "manifest"}
        for key in spec:
            if key not in allowed:
                raise fail(
                    f"stages.{name}.{key}", f"unknown (expected {', '.join(sorted(allowed))})"
                )
        if not isinstance(spec.get("config"), str):
            raise fail(f"stages.{name}.config", "required: the stage's `pebr fit` config file")
        args = spec.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise fail(f"stages.{name}.args", "expected a list of command-line strings")
        split = spec.get("split")
        if split not in (None, "easy", "medium", "hard"):
            raise fail(f"stages.{name}.split", f"expected easy, medium or hard, got {split!r}")
        fit[name] = FitStage(
            name, spec["config"], tuple(args), split, spec.get("start_from"), spec.get("manifest")
        )
    evaluation = raw.get("eval") or {}
    if not isinstance(evaluation, dict):
        raise fail("eval", "expected a mapping")
    for key in ("device", "dtype"):
        if key in evaluation:
            raise fail(f"eval.{key}", f"set `{key}` at the top level, where sampling uses it too")
    synth = raw.get("synth")
    if synth is not None and not isinstance(synth, dict):
        raise fail("synth", "expected a mapping like {train: 2000, val: 200, test: 400, seed: 0}")
    return Schedule(
        path=str(path),
        out=raw["out"],
        model=raw["model"],
        data=dict(data),
        eval=dict(evaluation),
        fit=fit,
        sample=sample,
        synth=synth,
        stage_names=tuple(n for n in ORDER if n in stages),
        device=device,
        dtype=dtype,
    )


def _check_sample(spec: dict[str, Any], fail: Any) -> None:
    """The sample stage's numbers: k, easy_min, hard_max (their order), limit."""
    from pebr_lightning.difficulty.sampler import SampleSettings
    from pebr_lightning.difficulty.split import check_thresholds

    for key in ("k", "easy_min", "hard_max", "limit", "max_new_tokens", "batch_size", "seed"):
        value = spec.get(key)
        nullable = key in ("easy_min", "limit")
        if value is None and (nullable or key not in spec):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail(f"stages.sample.{key}", f"expected a whole number >= 0, got {value!r}")
    k = spec.get("k", SampleSettings.k)
    try:
        check_thresholds(k, spec.get("easy_min"), spec.get("hard_max", SampleSettings.hard_max))
    except PebrError as err:
        raise fail("stages.sample", str(err).removeprefix("sample: ")) from None


def _device_name(value: Any) -> bool:
    """Whether `value` reads as a device: auto, or what torch.device parses (available or
    not: whether this machine has it is checked when the schedule runs)."""
    if value == "auto":
        return True
    if not isinstance(value, str):
        return False
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True
