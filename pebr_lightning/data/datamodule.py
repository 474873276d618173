"""LightningDataModule over manifests: JSONL, Parquet or saved HF datasets (docs/data.md).

Every record of the manifests a stage uses is validated in `setup`, before any
model is loaded, so a bad line fails in seconds with its file:line and field
rather than hours into a run. Batches are built by the collator of the
LightningModule being trained (it owns the processor and the prompt format).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from pebr_lightning.data.collate import RecordDataset
from pebr_lightning.data.manifest import load_manifest
from pebr_lightning.data.sampler import GlobalOrderSampler
from pebr_lightning.errors import PebrError

_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}


class ManifestDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        predict_manifest: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        skip_invalid: bool = False,
        check_images: bool = True,
        field_map: dict[str, str] | None = None,
        image_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            train_manifest: manifest of the training split: a .jsonl file, a .parquet
                file, a dataset folder (`folder@split` for a saved DatasetDict), or a
                hub id `owner/name[:config][@split]` (docs/data.md).
            val_manifest: manifest evaluated during fit and by `pebr validate`.
            test_manifest: manifest for `pebr test`.
            predict_manifest: manifest for `pebr predict`.
            batch_size: prompts per training batch (per device).
            eval_batch_size: prompts per evaluation batch; defaults to batch_size.
            num_workers: DataLoader worker processes that decode images and build batches.
            skip_invalid: drop records that fail validation (and report how many and
                which) instead of stopping with an error.
            check_images: decode every image while validating (catches truncated files).
            field_map: our field -> the source's column, for every split, e.g.
                {question: problem, image: images}.
            image_dir: where image bytes from Parquet/saved datasets are written
                (default `$PEBR_CACHE/images`).
            seed: seed of the training order: one permutation per epoch, cut into
                global batches, the same on 1 or N processes (data/sampler.py).
        """
        super().__init__()
        self.save_hyperparameters()
        self.manifests = {
            "train": train_manifest,
            "val": val_manifest,
            "test": test_manifest,
            "predict": predict_manifest,
        }
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.skip_invalid = skip_invalid
        self.check_images = check_images
        self.field_map = field_map
        self.image_dir = image_dir
        self.seed = seed
        self._resume: dict[str, Any] | None = None
        self.datasets: dict[str, RecordDataset] = {}

    def setup(self, stage: str) -> None:
        for split in _STAGE_SPLITS[stage]:
            path = self.manifests[split]
            if path is None:
                if split in ("val",):
                    continue
                command = getattr(stage, "value", stage)  # Lightning passes a TrainerFn
                raise PebrError(f"`pebr {command}` needs data.init_args.{split}_manifest")
            if split in self.datasets:
                continue
            loaded = load_manifest(
                path,
                check_images=self.check_images,
                skip_invalid=self.skip_invalid,
                field_map=self.field_map,
                image_dir=self.image_dir,
            )
            if loaded.problems:
                listing = "\n".join(f"  {p}" for p in loaded.problems[:20])
                more = len(loaded.problems) - 20
                tail = f"\n  ... and {more} more" if more > 0 else ""
                rank_zero_warn(
                    f"skipped {len(loaded.problems)} invalid record(s) of {path}:\n{listing}{tail}"
                )
            self.datasets[split] = RecordDataset(loaded.records)

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        if len(dataset) < self.batch_size * world:
            raise PebrError(
                f"data.batch_size: {len(dataset)} training records cannot fill one batch of "
                f"{self.batch_size} prompts on each of {world} process(es)"
            )
        resume = self._resume or {}
        sampler = GlobalOrderSampler(
            dataset,
            self.batch_size,
            rank,
            world,
            self.seed,
            resume_epoch=resume.get("epoch"),
            resume_batches=resume.get("batches", 0),
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            # its own generator: each new iterator draws a worker seed, which would
            # otherwise shift the global RNG stream differently in a resumed run
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self._collator("train"),
        )

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self.datasets:
            return []
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_batch_size)

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        """Evaluation splits: in file order, every record."""
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self._collator(split),
        )

    # -- resuming: Lightning stores this in checkpoints and restores it before the
    # -- dataloaders are built

    def state_dict(self) -> dict[str, Any]:
        """Where training stands: the epoch, the batches of it trained on, and the RNGs.

        Lightning reloads plain DataLoaders from the start of the epoch on resume;
        with this the sampler skips what was trained on, and dropout and any other
        random draw continue as if the run had not stopped (GRPO rollout noise is
        keyed by step and needs no RNG state).
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        return {
            "epoch": trainer.current_epoch,
            # batches fetched this epoch: at a checkpoint every one of them was trained on
            "batches": trainer.fit_loop.epoch_loop.batch_progress.current.ready,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._resume = {"epoch": state_dict["epoch"], "batches": state_dict["batches"]}
        torch.set_rng_state(state_dict["torch_rng"])
        random.setstate(state_dict["python_rng"])

    def _collator(self, split: str) -> Any:
        module = self.trainer.lightning_module if self.trainer is not None else None
        make = getattr(module, "collator", None)
        if make is None:
            raise PebrError(
                f"{type(module).__name__} has no `collator(split)` method; ManifestDataModule "
                "needs the module to say how records become batches"
            )
        return make(split)
