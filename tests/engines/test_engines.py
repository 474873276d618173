"""The rollout seam: GRPO, `pebr eval` and `pebr sample` all generate through a
RolloutEngine; GRPO syncs it after every update. A recording engine wraps the real
HFEngine (every rollout is the real decode loop) and counts what it is asked."""

from __future__ import annotations

import json

import lightning as L
import pytest

from pebr_lightning.data.datamodule import ManifestDataModule
from pebr_lightning.engines import HFEngine, RolloutConfig, RolloutEngine, build_engine
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import LoraConfig
from pebr_lightning.models.rollout import SamplingConfig
from pebr_lightning.modules.grpo import GRPOLossConfig, GRPOModule
from pebr_lightning.modules.optim import OptimConfig

REWARDS = [{"class_path": "pebr_lightning.testing.spread_reward.VowelShareReward", "weight": 1.0}]


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


def test_hf_engine_is_a_rollout_engine_and_the_config_names_engines(tiny_path):
    from pebr_lightning.models.policy import load_processor

    engine = build_engine(RolloutConfig(), load_processor(str(tiny_path)))
    assert isinstance(engine, HFEngine) and isinstance(engine, RolloutEngine)
    with pytest.raises(PebrError, match=r"rollout.engine must be one of \('hf', 'vllm'\)"):
        RolloutConfig(engine="nope")


def test_grpo_rolls_out_through_its_engine_and_syncs_it_after_each_update(
    tiny_path, shapes_data, tmp_path
):
    module = GRPOModule(
        model=str(tiny_path),
        rewards=REWARDS,
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
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
    assert engine.calls == ["generate B=2 G=4", "generate B=2 G=4"]
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
