"""GRPOModule: shared rollouts, reference log-probs, accumulation invariance."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForImageTextToText

from pebr_lightning.data.collate import PromptCollator, RecordDataset
from pebr_lightning.data.datamodule import ManifestDataModule
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.engines.hf import sample_group
from pebr_lightning.errors import PebrError
from pebr_lightning.models.families.qwen_vl import QwenVL
from pebr_lightning.models.policy import LoraConfig, PolicySpec, unwrap
from pebr_lightning.models.rollout import (
    SamplingConfig,
    all_features,
    completion_logprobs,
)
from pebr_lightning.modules.grpo import GRPOLossConfig, GRPOModule
from pebr_lightning.modules.grpo_update import UpdateConfig

REWARDS = [
    {"name": "format", "weight": 0.2},
    {"name": "length", "weight": 0.2},
    # spread on random text, so advantages are not all zero
    {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 0.6},
]
SAMPLING = SamplingConfig(group_size=4, max_new_tokens=12, temperature=1.0)


LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


def make_module(tiny_path, lora=LORA, micro_batch_size=8, **overrides) -> GRPOModule:
    kwargs = {
        "policy": PolicySpec(model=str(tiny_path), lora=lora),
        "rewards": REWARDS,
        "sampling": SAMPLING,
        "loss": GRPOLossConfig(beta=0.0),
        "update": UpdateConfig(micro_batch_size=micro_batch_size),
        "log_samples_every_n_steps": 0,
    }
    kwargs.update(overrides)
    module = GRPOModule(**kwargs)
    module.setup("fit")
    module.configure_model()
    return module


def prompt_batch(module, shapes_data, n=2) -> dict:
    dataset = RecordDataset(load_manifest(shapes_data["train"]).records)
    return PromptCollator(module.processor, PromptConfig())([dataset[i] for i in range(n)])


def fit(module, shapes_data, tmp_path, batch_size=2, steps=1) -> L.Trainer:
    data = ManifestDataModule(train_manifest=str(shapes_data["train"]), batch_size=batch_size)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def test_shared_rollout_logprobs_equal_the_naive_path(tiny_path, shapes_data):
    """Prefill once + repeated KV cache + shared image features == a plain forward
    over every (image, prompt, completion) sequence with its own pixel values."""
    module = make_module(tiny_path)
    base = unwrap(module.policy).eval()
    batch = prompt_batch(module, shapes_data, n=3)
    tokenizer = module.processor.tokenizer
    with torch.no_grad():
        feats = all_features(base, batch)
        rollout = sample_group(
            module.policy, base, batch, SAMPLING, [tokenizer.eos_token_id], tokenizer.pad_token_id,
            feats, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        rows = torch.arange(rollout.completion_ids.shape[0])
        shared = completion_logprobs(base, batch, rollout, rows, feats, 1.0)
        naive = completion_logprobs(base, batch, rollout, rows, None, 1.0)
    mask = rollout.completion_mask.bool()
    assert mask.sum() > 0
    torch.testing.assert_close(shared[mask], naive[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rollout.logprobs[mask], naive[mask], atol=1e-5, rtol=1e-5)


def count_images(module) -> list[int]:
    calls: list[int] = []
    visual = unwrap(module.policy).model.visual
    visual.register_forward_hook(lambda mod, args, kwargs, out: calls.append(
        int(kwargs.get("grid_thw", args[1] if len(args) > 1 else None).shape[0])
    ), with_kwargs=True)  # fmt: skip
    return calls


@pytest.mark.parametrize(("share", "expected"), [(True, 2), (False, 2 + 2 * 4 + 2 * 4)])
def test_vision_tower_encodes_each_image_once_per_step(
    share, expected, tiny_path, shapes_data, tmp_path
):
    """B = 2 prompts, G = 4, beta > 0: shared features encode the 2 images once per step
    (rollout, reference and loss passes reuse them); the naive path (no shared
    features, no shared prompt) encodes 2 in the prefill, then all B*G = 8 again in
    the reference pass and 8 in the loss pass."""
    module = make_module(
        tiny_path,
        share_image_features=share,
        update=UpdateConfig(micro_batch_size=8, share_prompt=share),
        loss=GRPOLossConfig(beta=0.01),
    )
    calls = count_images(module)
    fit(module, shapes_data, tmp_path, batch_size=2, steps=1)
    assert sum(calls) == expected


def test_lora_reference_is_the_base_model_with_adapter_off(tiny_path, shapes_data):
    module = make_module(tiny_path, loss=GRPOLossConfig(beta=0.01))
    assert module.ref_model is None  # no second copy with LoRA
    with torch.no_grad():  # make the adapter matter, so the check can fail
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    base = unwrap(module.policy).eval()
    batch = prompt_batch(module, shapes_data)
    tok = module.processor.tokenizer
    with torch.no_grad():
        rollout = sample_group(
            module.policy, base, batch, SAMPLING, [tok.eos_token_id], tok.pad_token_id
        )
        ref = module.reference_logprobs(batch, rollout, None)
        rows = torch.arange(rollout.completion_ids.shape[0])
        plain = AutoModelForImageTextToText.from_pretrained(tiny_path, local_files_only=True).eval()
        expected = completion_logprobs(plain, batch, rollout, rows, None, SAMPLING.temperature)
        policy = completion_logprobs(base, batch, rollout, rows, None, SAMPLING.temperature)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(ref[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(policy[mask], expected[mask], atol=1e-3)


def test_beta_zero_builds_no_reference_path(tiny_path, shapes_data):
    module = make_module(tiny_path, lora=None, loss=GRPOLossConfig(beta=0.0))
    assert module.ref_model is None
    assert module.reference_logprobs(prompt_batch(module, shapes_data), None, None) is None
    with_kl = make_module(tiny_path, lora=None, loss=GRPOLossConfig(beta=0.01))
    assert with_kl.ref_model is not None  # full fine-tune: a frozen copy
    assert not any(p.requires_grad for p in with_kl.ref_model.parameters())


@pytest.mark.parametrize(
    "reduction", ["GlobalTokenMean", "SequenceMean", "TokenMean", "ConstantLength"]
)
def test_micro_batch_4_x_2_equals_8_x_1(reduction, tiny_path, shapes_data, tmp_path):
    """2 prompts x G 4 = 8 sequences in one optimizer step, as 1 micro-batch of 8 or
    2 micro-batches of 4 accumulated: the same rollout (same seed) and the same update."""
    updated = []
    for micro in (8, 4):
        L.seed_everything(0)
        module = make_module(
            tiny_path,
            micro_batch_size=micro,
            loss=GRPOLossConfig(
                beta=0.01,
                reduction={"class_path": f"pebr_lightning.algorithms.reductions.{reduction}"},
            ),
        )
        start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        fit(module, shapes_data, tmp_path / f"{reduction}-{micro}", batch_size=2, steps=1)
        after = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        assert any(not torch.equal(start[n], after[n]) for n in start)
        updated.append(after)
    for name in updated[0]:
        torch.testing.assert_close(updated[0][name], updated[1][name], atol=1e-6, rtol=1e-5)


def test_every_logged_metric_is_finite(tiny_path, shapes_data, tmp_path):
    module = make_module(tiny_path, loss=GRPOLossConfig(beta=0.01), log_samples_every_n_steps=1)
    trainer = fit(module, shapes_data, tmp_path, batch_size=2, steps=2)
    (metrics,) = Path(trainer.log_dir).glob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    keys = {k for row in rows for k, v in row.items() if v}
    expected = (
        "reward/total/mean",
        "reward/format/zero_std_frac",
        "train/kl",
        "train/clip_frac/low",
        "completion/truncated_frac",
        "rollout/tokens_per_s",
        "advantage/abs_mean",
    )
    for key in expected:
        assert key in keys, key
    for row in rows:
        for key, value in row.items():
            if value:
                assert math.isfinite(float(value)), (key, value)
    samples = (Path(trainer.log_dir) / "samples.jsonl").read_text().splitlines()
    assert samples and '"reward"' in samples[0]


def test_selected_and_merged_groups_keep_their_logprobs(tiny_path, shapes_data):
    """Groups [2, 0] of one rollout + group [1] of the same, merged (different padding):
    every merged row has the log-probs its original row had."""
    from pebr_lightning.models.rollout import concat_rollouts, select_groups

    module = make_module(tiny_path)
    base = unwrap(module.policy).eval()
    batch = prompt_batch(module, shapes_data, n=3)
    tok = module.processor.tokenizer
    with torch.no_grad():
        rollout = sample_group(
            module.policy, base, batch, SAMPLING, [tok.eos_token_id], tok.pad_token_id
        )
        rows = torch.arange(rollout.completion_ids.shape[0])
        original = completion_logprobs(base, batch, rollout, rows, None, 1.0)
        merged_prompt, merged = concat_rollouts(
            QwenVL(),
            [
                select_groups(QwenVL(), batch, rollout, [2, 0]),
                select_groups(QwenVL(), batch, rollout, [1]),
            ],
            tok.pad_token_id,
        )
        again = completion_logprobs(base, merged_prompt, merged, rows, None, 1.0)
    g = SAMPLING.group_size
    order = [2, 0, 1]
    for new_group, old_group in enumerate(order):
        new_rows = slice(new_group * g, (new_group + 1) * g)
        old_rows = slice(old_group * g, (old_group + 1) * g)
        width = rollout.completion_ids.shape[1]
        mask = rollout.completion_mask[old_rows].bool()
        torch.testing.assert_close(
            again[new_rows, :width][mask], original[old_rows][mask], atol=1e-5, rtol=1e-5
        )
        assert torch.equal(
            merged.completion_ids[new_rows, :width], rollout.completion_ids[old_rows]
        )


@pytest.mark.parametrize(("spread", "extra", "filled"), [(False, 2.0, 0.0), (True, 0.0, 1.0)])
def test_dynamic_sampling_counts_extra_rollouts(
    spread, extra, filled, tiny_path, shapes_data, tmp_path
):
    """format + length give a random model equal rewards in every group: 2 extra
    rollouts are tried and no group with spread is found. With the spread reward every
    group has spread at once: no extra rollout."""
    rewards = REWARDS if spread else REWARDS[:2]
    module = make_module(tiny_path, rewards=rewards, dynamic_sampling_tries=2)
    trainer = fit(module, shapes_data, tmp_path, batch_size=2, steps=1)
    rows = list(csv.DictReader((Path(trainer.log_dir) / "metrics.csv").open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if v}
    assert logged["dynamic_sampling/extra_rollouts"] == extra
    assert logged["dynamic_sampling/filled_frac"] == filled


def test_merge_parts_keeps_rewards_texts_and_records_aligned(tiny_path, shapes_data):
    from pebr_lightning.modules.grpo_parts import ScoredRollout

    module = make_module(tiny_path, rewards=REWARDS)
    base = unwrap(module.policy).eval()
    tok = module.processor.tokenizer
    parts = []
    for n in (2, 3):
        batch = prompt_batch(module, shapes_data, n=n)
        with torch.no_grad():
            rollout = sample_group(
                module.policy, base, batch, SAMPLING, [tok.eos_token_id], tok.pad_token_id
            )
        scores = module.score(rollout, batch["records"], batch["image_lists"])
        parts.append(
            ScoredRollout(
                batch, rollout, None, scores, batch["records"], batch["image_lists"], QwenVL()
            )
        )
    g = SAMPLING.group_size
    # dynamic sampling's merge: part 0's group 1, then part 1's group 2
    merged = ScoredRollout.concat([parts[0].select([1]), parts[1].select([2])], tok.pad_token_id)
    # groups come out in part order: part 0's group 1, then part 1's group 2
    first, second = slice(g, 2 * g), slice(2 * g, 3 * g)
    assert [r["id"] for r in merged.records] == [
        parts[0].records[1]["id"],
        parts[1].records[2]["id"],
    ]
    assert merged.scores.texts == parts[0].scores.texts[first] + parts[1].scores.texts[second]
    expected = torch.cat([parts[0].scores.rewards[first], parts[1].scores.rewards[second]])
    torch.testing.assert_close(merged.scores.rewards, expected)
    vowels = [p.scores.result.per_reward["vowel_share"] for p in parts]
    assert merged.scores.result.per_reward["vowel_share"] == vowels[0][first] + vowels[1][second]
    assert merged.rollout.completion_ids.shape[0] == 2 * g
    assert merged.prompt["image_grid_thw"].shape[0] == 2


def test_greedy_temperature_is_refused_for_training(tiny_path):
    with pytest.raises(PebrError, match=r"sampling.temperature must be > 0 for GRPO"):
        GRPOModule(
            policy=PolicySpec(model=str(tiny_path)),
            rewards=REWARDS,
            sampling=SamplingConfig(temperature=0),
        )
