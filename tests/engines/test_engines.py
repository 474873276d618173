"""The rollout seam: GRPO, `pebr eval` and `pebr sample` all generate through a
RolloutEngine; GRPO syncs it after every update. A recording engine wraps the real
HFEngine (every rollout is the real decode loop) and counts what it is asked."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import lightning as L
import pytest

from pebr_lightning.data.datamodule import ManifestDataModule
from pebr_lightning.engines import (
    EngineContext,
    HFEngine,
    RolloutConfig,
    RolloutEngine,
    build_engine,
)
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import LoraConfig, PolicySpec
from pebr_lightning.models.rollout import SamplingConfig
from pebr_lightning.modules.grpo import GRPOLossConfig, GRPOModule
from pebr_lightning.modules.optim import OptimConfig

REWARDS = [{"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0}]


class Recording:
    """A RolloutEngine that passes every call to an inner engine and records it."""

    def __init__(self, inner: RolloutEngine) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.synced: list[int] = []

    def generate(self, prompt, sampling, *, keys=None, generator=None, records=None):
        self.calls.append(f"generate B={prompt['input_ids'].shape[0]} G={sampling.group_size}")
        return self.inner.generate(
            prompt, sampling, keys=keys, generator=generator, records=records
        )

    def sync_weights(self, policy) -> None:
        self.synced.append(sum(float(p.detach().sum()) for p in policy.parameters()))
        self.inner.sync_weights(policy)

    def at_step(self, step: int) -> None:
        self.calls.append(f"step {step}")

    def close(self) -> None:
        self.calls.append("close")


def test_hf_engine_is_a_rollout_engine_and_the_config_names_engines(tiny_path):
    from pebr_lightning.models.policy import load_processor

    engine = build_engine(RolloutConfig(), EngineContext(load_processor(str(tiny_path))))
    assert isinstance(engine, HFEngine) and isinstance(engine, RolloutEngine)
    with pytest.raises(
        PebrError, match=r"no engine named 'nope' is installed.*installed: hf, vllm"
    ):
        build_engine(RolloutConfig("nope"), EngineContext(None))


def test_grpo_rolls_out_through_its_engine_and_syncs_it_after_each_update(
    tiny_path, shapes_data, tmp_path
):
    module = GRPOModule(
        policy=PolicySpec(model=str(tiny_path), lora=LoraConfig(r=4, alpha=8, dropout=0.0)),
        rewards=REWARDS,
        sampling=SamplingConfig(group_size=4, max_new_tokens=8, temperature=1.0),
        loss=GRPOLossConfig(beta=0.0),
        optim=OptimConfig(lr=1e-2, schedule="constant"),
        log_samples_every_n_steps=0,
    )
    module.setup("fit")
    module.configure_model()
    engine = Recording(module.engine)
    module.engine = engine
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = ManifestDataModule(train_manifest=str(shapes_data["train"]), batch_size=2)
    trainer.fit(module, datamodule=data)
    assert engine.calls == ["step 0", "generate B=2 G=4", "step 1", "generate B=2 G=4", "close"]
    # synced as the fit starts (after any checkpoint is restored), then after each
    # update with the weights that update wrote (all three differ)
    assert len(engine.synced) == 3 and len(set(engine.synced)) == 3


def test_eval_and_sample_generate_through_the_hf_engine(
    tiny_path, shapes_data, tmp_path, monkeypatch
):
    """`pebr eval` (greedy + sampled answers) and `pebr sample` decode through
    HFEngine.generate: one call per batch of questions."""
    from pebr_lightning.difficulty.sampler import SampleSettings, sample_difficulty
    from pebr_lightning.evaluation.greedy import evaluate

    seen: list[tuple[int, int]] = []
    real = HFEngine.generate

    def spy(self, prompt, sampling, **kwargs):
        seen.append((prompt["input_ids"].shape[0], sampling.group_size))
        return real(self, prompt, sampling, **kwargs)

    monkeypatch.setattr(HFEngine, "generate", spy)
    metrics = evaluate(
        str(tiny_path), shapes_data["val"], tmp_path / "eval", batch_size=8, max_new_tokens=4,
        samples=2, progress=False,
    )  # fmt: skip
    assert metrics["n"] == 16
    assert seen == [(8, 1), (8, 1), (8, 2), (8, 2)]  # greedy: G = 1; sampled: G = 2
    seen.clear()
    settings = SampleSettings(
        model=str(tiny_path), manifest=str(shapes_data["val"]), k=2, max_new_tokens=4, easy_min=2
    )
    sample_difficulty(settings, tmp_path / "sample", batch_size=10, progress=False)
    assert seen == [(10, 2), (6, 2)]
    summary = json.loads((tmp_path / "sample" / "summary.json").read_text())
    assert summary["questions"] == 16


class Skewed(Recording):
    """The real engine, reporting each sampled token's log-prob log 2 lower than it is:
    an engine whose q is half the trainer's pi on every token it drew."""

    def generate(self, prompt, sampling, **kwargs):
        rollout = super().generate(prompt, sampling, **kwargs)
        return dataclasses.replace(rollout, logprobs=rollout.logprobs - math.log(2))


def one_step(tiny_path, shapes_data, tmp_path, correction: str, skew: bool) -> dict[str, float]:
    """The logged figures of one GRPO step with the given engine correction (cap 1.5)."""
    L.seed_everything(0)  # the same LoRA initialisation and data order in every call
    module = GRPOModule(
        policy=PolicySpec(model=str(tiny_path), lora=LoraConfig(r=4, alpha=8, dropout=0.0)),
        rewards=REWARDS,
        sampling=SamplingConfig(group_size=4, max_new_tokens=8, temperature=1.0),
        loss=GRPOLossConfig(beta=0.0, engine_correction=correction, engine_correction_cap=1.5),
        log_samples_every_n_steps=0,
    )
    module.setup("fit")
    module.configure_model()
    if skew:
        module.engine = Skewed(module.engine)
    root = tmp_path / f"{correction}-{skew}"
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=L.pytorch.loggers.CSVLogger(root),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = ManifestDataModule(train_manifest=str(shapes_data["train"]), batch_size=2)
    trainer.fit(module, datamodule=data)
    (row,) = [r for r in csv.DictReader(next(root.rglob("metrics.csv")).open()) if r["train/loss"]]
    return {k: float(v) for k, v in row.items() if v}


def test_engine_correction_weights_each_token_by_the_engines_mismatch(
    tiny_path, shapes_data, tmp_path
):
    """Through the real GRPO step: with an exact engine every weight is 1 and the
    update is the uncorrected one; with an engine whose q is pi / 2, every weight is 2,
    so truncation at 1.5 scales the gradient by exactly 1.5 and masking drops it."""
    plain = one_step(tiny_path, shapes_data, tmp_path, "none", skew=True)
    assert "train/engine_is/mean" not in plain and plain["train/grad_norm"] > 0
    exact = one_step(tiny_path, shapes_data, tmp_path, "token_truncate", skew=False)
    assert exact["train/engine_is/mean"] == pytest.approx(1.0, abs=1e-4)
    assert exact["train/engine_is/capped_frac"] == 0
    assert exact["train/grad_norm"] == pytest.approx(plain["train/grad_norm"], rel=1e-3)
    capped = one_step(tiny_path, shapes_data, tmp_path, "token_truncate", skew=True)
    assert capped["train/engine_is/mean"] == pytest.approx(1.5, rel=1e-5)
    assert capped["train/engine_is/capped_frac"] == 1
    assert capped["train/grad_norm"] == pytest.approx(1.5 * plain["train/grad_norm"], rel=1e-3)
    masked = one_step(tiny_path, shapes_data, tmp_path, "token_mask", skew=True)
    assert masked["train/engine_is/mean"] == 0 and masked["train/grad_norm"] == 0
    assert plain["reward/total/mean"] == masked["reward/total/mean"]  # the same rollouts


def test_validate_and_test_start_no_rollout_engine(tiny_path, shapes_data, tmp_path):
    """Held-out accuracy is greedy decoding with the policy itself: a GRPO config whose
    rollouts come from vLLM validates and tests without starting a worker (here its
    interpreter does not exist, so starting one would fail)."""
    module = GRPOModule(
        policy=PolicySpec(model=str(tiny_path)),
        rewards=REWARDS,
        sampling=SamplingConfig(group_size=2, max_new_tokens=4, temperature=1.0),
        rollout=RolloutConfig("vllm", init_args={"python": str(tmp_path / "no" / "python")}),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = ManifestDataModule(
        val_manifest=str(shapes_data["val"]), test_manifest=str(shapes_data["val"]), batch_size=8
    )
    (validated,) = trainer.validate(module, datamodule=data)
    (tested,) = trainer.test(module, datamodule=data)
    assert 0 <= validated["val/accuracy"] <= 1 and 0 <= tested["test/accuracy"] <= 1
    assert module.engine is None
