"""GRPO under faults: no reward signal, empty completions, too-long prompts, out of memory."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from pebr_lightning.data.collate import PromptCollator, RecordDataset
from pebr_lightning.data.datamodule import ManifestDataModule
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.errors import PebrError
from pebr_lightning.models.policy import LoraConfig, PolicySpec, unwrap
from pebr_lightning.models.rollout import SamplingConfig
from pebr_lightning.modules.grpo import GRPOLossConfig, GRPOModule
from pebr_lightning.modules.grpo_update import UpdateConfig

SPREAD = {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 0.6}
SAMPLING = SamplingConfig(group_size=4, max_new_tokens=8, temperature=1.0)


def make_module(tiny_path, module_class=GRPOModule, **overrides) -> GRPOModule:
    kwargs = {
        "policy": PolicySpec(model=str(tiny_path), lora=LoraConfig(r=4, alpha=8, dropout=0.0)),
        "rewards": [{"name": "format", "weight": 0.4}, SPREAD],
        "sampling": SAMPLING,
        "loss": GRPOLossConfig(beta=0.0),
        "update": UpdateConfig(micro_batch_size=8),
        "log_samples_every_n_steps": 0,
    }
    kwargs.update(overrides)
    module = module_class(**kwargs)
    module.setup("fit")
    module.configure_model()
    return module


def fit(module, shapes_data, tmp_path, steps=1) -> L.Trainer:
    data = ManifestDataModule(train_manifest=str(shapes_data["train"]), batch_size=2)
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


def logged(trainer) -> list[dict[str, float]]:
    rows = csv.DictReader((Path(trainer.log_dir) / "metrics.csv").open())
    return [{k: float(v) for k, v in row.items() if v} for row in rows]


def trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# -- 3: a batch with no reward spread anywhere -------------------------------------------


def test_a_step_without_reward_spread_is_skipped_and_counted(tiny_path, shapes_data, tmp_path):
    """`format` alone gives every completion of the random tiny model the same score:
    every advantage is 0. With beta > 0 the KL term alone would still move the weights;
    the step is skipped instead: weights (and AdamW state) unchanged, global_step still
    advances, `train/skipped_steps` = 1, every logged value finite."""
    module = make_module(
        tiny_path,
        rewards=[{"name": "format"}],
        loss=GRPOLossConfig(beta=0.05),
        policy=PolicySpec(model=str(tiny_path)),
    )
    before = trainable(module)
    trainer = fit(module, shapes_data, tmp_path)
    after = trainable(module)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not trainer.optimizers[0].state  # AdamW took no step: no moments, no decay
    assert trainer.global_step == 1
    (row,) = [r for r in logged(trainer) if "train/skipped_steps" in r]
    assert row["train/skipped_steps"] == 1.0
    assert row["reward/format/zero_std_frac"] == 1.0
    assert all(math.isfinite(v) for r in logged(trainer) for v in r.values())


def test_a_step_with_reward_spread_is_not_skipped(tiny_path, shapes_data, tmp_path):
    module = make_module(tiny_path)
    before = trainable(module)
    trainer = fit(module, shapes_data, tmp_path)
    assert any(not torch.equal(before[n], p) for n, p in trainable(module).items())
    (row,) = [r for r in logged(trainer) if "train/skipped_steps" in r]
    assert row["train/skipped_steps"] == 0.0


# -- 4: empty completions ----------------------------------------------------------------


class FirstTokenEOS(GRPOModule):
    """The real rollout, then the first completion of every group cut to a lone EOS
    (the random tiny model almost never samples EOS first by itself)."""

    def rollout(self, prompt, records, attempt=0):
        rollout, features = super().rollout(prompt, records, attempt)
        eos = self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        first = torch.arange(0, rollout.completion_ids.shape[0], rollout.group_size)
        pad = self.processor.tokenizer.pad_token_id
        rollout.completion_ids[first] = pad
        rollout.completion_ids[first, 0] = eos
        rollout.completion_mask[first] = 0
        rollout.completion_mask[first, 0] = 1
        rollout.truncated[first] = False
        return rollout, features


def test_empty_completions_score_train_and_log(tiny_path, shapes_data, tmp_path):
    module = make_module(tiny_path, FirstTokenEOS, log_samples_every_n_steps=1)
    texts = []
    original_score = module.score

    def keep_texts(rollout, records, images):
        scores = original_score(rollout, records, images)
        texts.extend(scores.texts)
        return scores

    module.score = keep_texts  # the real score, its texts kept for the test
    before = trainable(module)
    trainer = fit(module, shapes_data, tmp_path)
    assert texts[0] == "" and texts[4] == ""  # the EOS is a special token: left out
    assert all(texts[i] for i in (1, 2, 3))
    assert any(not torch.equal(before[n], p) for n, p in trainable(module).items())
    rows = logged(trainer)
    assert all(math.isfinite(v) for r in rows for v in r.values())
    samples = [json.loads(x) for x in (Path(trainer.log_dir) / "samples.jsonl").open()]
    assert samples[0]["completion"] == "" and samples[0]["vowel_share"] == 0.0
    assert samples[0]["format"] == 0.0
    # length 1 (the EOS) counted: the mean is over 1 + 3 * (>= 1) tokens per group
    (row,) = [r for r in rows if "completion/length_mean" in r]
    assert 1.0 <= row["completion/length_mean"] < SAMPLING.max_new_tokens


# -- 5: a prompt longer than the maximum -------------------------------------------------


def test_a_too_long_prompt_names_the_sample_and_the_setting(tiny_path, shapes_data):
    module = make_module(tiny_path, max_prompt_tokens=16)
    records = load_manifest(shapes_data["train"]).records
    items = [RecordDataset(records)[i] for i in range(2)]
    collate = module.collator("train")
    with pytest.raises(PebrError) as info:
        collate(items)
    message = str(info.value)
    assert f"sample {records[0]['id']}" in message
    assert "model.max_prompt_tokens=16" in message
    batch = PromptCollator(module.processor, PromptConfig())(items)  # no limit: fine
    assert batch["input_ids"].shape[0] == 2


# -- 6: out of memory ----------------------------------------------------------------------

OOM_ERRORS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu": lambda: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"
    ),
}


@pytest.mark.parametrize("kind", sorted(OOM_ERRORS))
def test_out_of_memory_in_the_rollout_says_what_to_lower(kind, tiny_path, shapes_data, tmp_path):
    """A forward hook on the language model raises the allocator's error, as the
    allocator would during the rollout's prefill."""
    module = make_module(tiny_path)

    def out_of_memory(mod, args):
        raise OOM_ERRORS[kind]()

    unwrap(module.policy).model.language_model.register_forward_pre_hook(out_of_memory)
    with pytest.raises(PebrError) as info:
        fit(module, shapes_data, tmp_path)
    message = str(info.value)
    assert "out of memory in the rollout" in message
    for setting in ("sampling.group_size", "sampling.max_new_tokens", "data.batch_size"):
        assert setting in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_out_of_memory_in_backward_says_what_to_lower(tiny_path, shapes_data, tmp_path):
    """A backward hook on the language model raises CUDA's error during manual_backward."""
    module = make_module(tiny_path)

    def out_of_memory(mod, grad_input, grad_output):
        raise OOM_ERRORS["cuda"]()

    unwrap(module.policy).model.language_model.layers[0].register_full_backward_hook(out_of_memory)
    with pytest.raises(PebrError) as info:
        fit(module, shapes_data, tmp_path)
    message = str(info.value)
    assert "out of memory in the backward" in message
    for setting in ("micro_batch_size", "gradient_checkpointing", "sampling.max_new_tokens"):
        assert setting in message


# -- rewards so large that the update is not finite --------------------------------------


def poison_gradients(module, until: int) -> None:
    """NaN gradients on the first trainable weight while global_step < `until`: a step
    whose backward blew up. (Huge rewards no longer do: group statistics are float64.)"""
    first = next(p for p in module.parameters() if p.requires_grad)
    nan = float("nan")
    first.register_hook(lambda grad: grad * nan if module.global_step < until else grad)


def test_non_finite_updates_are_skipped_then_the_run_stops_naming_the_step(
    tiny_path, shapes_data, tmp_path
):
    """Before: the optimizer stepped on NaN gradients, every trainable value became NaN
    and the run ended with exit 0, saving them. Now each such step is skipped (weights
    and AdamW state untouched, counted) and the 2nd in a row stops the run."""
    module = make_module(
        tiny_path,
        policy=PolicySpec(model=str(tiny_path)),
        update=UpdateConfig(micro_batch_size=8, max_nonfinite_steps=2),
    )
    poison_gradients(module, until=10**6)
    before = trainable(module)
    with pytest.raises(PebrError) as info:
        fit(module, shapes_data, tmp_path, steps=5)
    message = str(info.value)
    assert message.startswith("step 2: the loss or its gradient was not finite in 2 steps")
    assert "largest |score| per reward: {'format': " in message
    after = trainable(module)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not module.trainer.optimizers[0].state  # AdamW never stepped on a gradient


def test_one_non_finite_step_is_skipped_and_training_goes_on(tiny_path, shapes_data, tmp_path):
    module = make_module(tiny_path, policy=PolicySpec(model=str(tiny_path)))
    poison_gradients(module, until=1)
    before = trainable(module)
    trainer = fit(module, shapes_data, tmp_path, steps=3)
    after = trainable(module)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # steps 2-3 trained
    rows = [r for r in logged(trainer) if "train/nonfinite_steps" in r]
    assert [r["train/nonfinite_steps"] for r in rows] == [1.0, 0.0, 0.0]


def test_without_max_prompt_tokens_the_models_position_limit_holds(tiny_path, shapes_data):
    """Before: with max_prompt_tokens null a prompt past the model's 4096 positions
    trained silently. Now the limit defaults to them less the completion's room."""
    module = make_module(tiny_path)  # max_prompt_tokens unset; max_new_tokens 8
    records = load_manifest(shapes_data["train"]).records
    items = [RecordDataset(records)[i] for i in range(2)]
    items[1]["record"] = {**items[1]["record"], "question": "How many? " * 2500}
    with pytest.raises(PebrError) as info:
        module.collator("train")(items)
    message = str(info.value)
    assert f"sample {records[1]['id']}: the prompt is " in message
    assert "the model's max_position_embeddings 4096 - model.sampling.max_new_tokens 8" in message
    assert message.split("(model.max_prompt_tokens unset)=")[1].startswith("4088;")
    module.collator("train")(items[:1])  # an ordinary prompt passes
