"""Greedy accuracy inside Lightning's validation and test loops.

`pebr validate` / `pebr test` (and validation during `pebr fit` of a GRPO stage)
answer each question of the val or test manifest once, greedily, and grade it with
the accuracy reward, exactly as `pebr eval` does (evaluation/greedy.py), so a run's
`val/accuracy` and `pebr eval` on the same manifest and weights agree. Counts are
summed across processes (AccuracyByType), so the figure is right on any number of
processes; with sharded weights every process decodes until all are done.

Logged as `<prefix>/accuracy`, `<prefix>/accuracy/<type>` and `<prefix>/n` at the end of
the loop (prefix "val" or "test").
"""

from __future__ import annotations

from typing import Any

import torch

from pebr_lightning.data.collate import prompt_inputs
from pebr_lightning.engines import HFEngine
from pebr_lightning.errors import PebrError
from pebr_lightning.evaluation.greedy import DEFAULT_TYPE, grade_answers
from pebr_lightning.metrics.accuracy import AccuracyByType
from pebr_lightning.models.rollout import SamplingConfig, decode_completions

SPLITS = {"val": "val", "test": "test"}
"""Log prefix -> the ManifestDataModule split it reads."""


class HeldOutAccuracy:
    """One loop's greedy accuracy: `start` at the loop's start, `step` per batch of
    PromptCollator output (it carries the records), `log` at its end."""

    def __init__(self, prefix: str) -> None:
        if prefix not in SPLITS:
            raise ValueError(f"prefix must be one of {sorted(SPLITS)}, got {prefix!r}")
        self.prefix = prefix
        self.metric: AccuracyByType | None = None
        self.position: dict[str, int] = {}

    def start(self, module: Any) -> None:
        """A fresh metric over the question types of the whole split: every process
        then holds states of the same length, whatever share of it it reads."""
        types = question_types(module, SPLITS[self.prefix])
        self.position = {name: i for i, name in enumerate(types)}
        self.metric = AccuracyByType(types).to(module.device)

    def step(self, module: Any, batch: dict[str, Any], max_new_tokens: int) -> None:
        # The batch is already collated (PromptCollator, on the module's device): decode
        # it as it stands rather than reading and collating its images again.
        records = batch["records"]
        engine = HFEngine(module.processor, synced=getattr(module, "device_mesh", None) is not None)
        engine.sync_weights(module.policy)
        greedy = SamplingConfig(group_size=1, temperature=0.0, max_new_tokens=max_new_tokens)
        rollout = engine.generate(prompt_inputs(batch), greedy)
        rows = grade_answers(records, decode_completions(module.processor.tokenizer, rollout))
        self.metric.update(
            torch.tensor([r["correct"] for r in rows], dtype=torch.float64),  # [B]
            torch.tensor([self.position[r["type"]] for r in rows], dtype=torch.long),  # [B]
            ungraded=torch.tensor([not r["graded"] for r in rows], dtype=torch.bool),
        )

    def log(self, module: Any) -> dict[str, float]:
        """Log the loop's figures (already summed over processes: no sync_dist)."""
        values = {k: float(v) for k, v in self.metric.compute().items()}
        values["n"] = float(self.metric.counts()["n"])
        for key, value in values.items():
            module.log(f"{self.prefix}/{key}", value)
        self.metric.reset()
        return values


def question_types(module: Any, split: str) -> list[str]:
    """The sorted question types of a split of the module's ManifestDataModule."""
    datasets = getattr(getattr(module.trainer, "datamodule", None), "datasets", None)
    if not datasets or split not in datasets:
        raise PebrError(
            f"{type(module).__name__}: greedy accuracy on the {split} split needs a "
            f"ManifestDataModule with data.init_args.{split}_manifest set"
        )
    return sorted({r.get("type") or DEFAULT_TYPE for r in datasets[split].records})


class GreedyTestLoop:
    """`pebr test` for a LightningModule with `policy`, `processor` and `prompt`:
    greedy accuracy on data.test_manifest. Its `collator("test")` must give
    PromptCollator batches; answers are cut at `held_out_max_new_tokens`."""

    held_out_max_new_tokens = 256

    def on_test_epoch_start(self) -> None:
        self._test_accuracy = HeldOutAccuracy("test")
        self._test_accuracy.start(self)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._test_accuracy.step(self, batch, self.held_out_max_new_tokens)

    def on_test_epoch_end(self) -> None:
        self._test_accuracy.log(self)


class GreedyValidationLoop:
    """The same for validation (`pebr validate`, and during `pebr fit` when
    data.val_manifest is set): held-out progress as `val/accuracy`."""

    held_out_max_new_tokens = 256

    def on_validation_epoch_start(self) -> None:
        self._val_accuracy = HeldOutAccuracy("val")
        self._val_accuracy.start(self)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._val_accuracy.step(self, batch, self.held_out_max_new_tokens)

    def on_validation_epoch_end(self) -> None:
        self._val_accuracy.log(self)
