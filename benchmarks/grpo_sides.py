"""The two sides of benchmarks/grpo_vs_trl.py: TRL's GRPOTrainer and our GRPOModule,
built from the same checkpoint, data, rewards and settings, each stepping only when
the coordinator gives it the turn (see that script's docstring)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REWARDS = [
    # spread on random text, so no group is all-equal and neither side may skip an
    # update; plus two of the perception stage's rewards
    {"class_path": "pebr_demo.testing.spread_reward.VowelShareReward", "weight": 1.0},
    {"name": "format", "weight": 0.5},
    {"name": "keyword", "weight": 0.5},
]


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a step's time covers its kernels."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class Turn:
    """A side's end of the pipe to the coordinator, called from its training loop.

    `begin` says the side is set up and waits for its first turn; `hand_over` ends a
    step and waits for the next turn. Waiting is a blocking read: an idle side uses
    no CPU while the other one steps.
    """

    def __init__(self, conn) -> None:
        self.conn = conn

    def _wait(self) -> None:
        if self.conn.recv() != "go":
            raise RuntimeError("the coordinator stopped the run")

    def begin(self) -> None:
        self.conn.send(("ready", None))
        self._wait()

    def hand_over(self) -> None:
        self.conn.send(("step", None))
        self._wait()


def read_data(scratch: Path, args: argparse.Namespace) -> tuple[Path, list[dict]]:
    """The manifest, and its records in the order our sampler draws them (for TRL)."""
    from pebr_lightning.data.sampler import global_batch_order

    manifest = scratch / "data" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for record in records:  # the manifest holds image paths relative to itself
        path = Path(record["image"])
        record["image"] = str(path if path.is_absolute() else manifest.parent / path)
    order = global_batch_order(len(records), args.prompts, 0, 1, seed=0, epoch=0, shuffle=True)
    return manifest, [records[i] for i in order]


class TrlRewardSet:
    """Our reward set as one TRL reward function: the same objects score both sides."""

    __name__ = "pebr_rewards"  # TRL names a reward function's metrics after this

    def __init__(self, specs: list[dict], processor: Any, device: str) -> None:
        from pebr_lightning.rewards.combine import load_rewards
        from pebr_lightning.rewards.registry import RewardSpec

        self.rewards = load_rewards([RewardSpec.from_dict(s) for s in specs])
        self.processor = processor
        self.device = device

    def __call__(self, prompts, completions, record, image, trainer_state=None, **_) -> list:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        result = self.rewards(
            completions=texts,
            samples=[json.loads(r) for r in record],
            images=image,
            tokenizer=self.processor.tokenizer,
            processor=self.processor,
            global_step=trainer_state.global_step if trainer_state else 0,
            device=self.device,
        )
        return list(result.total)  # None (no score) is what TRL expects too


def build_trl(args, folder: Path, records: list[dict], out: Path, turn: Turn):
    from datasets import Dataset
    from transformers import AutoConfig, AutoProcessor, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pebr_lightning.data.images import load_image
    from pebr_lightning.data.prompts import PromptConfig, build_messages
    from pebr_lightning.models.rollout import vision_token_ids

    processor = AutoProcessor.from_pretrained(folder)
    # TRL re-runs the processor on the prompts for its loss forward with the tokenizer's
    # default padding side, while its prompt ids are left-padded: with prompts of
    # different lengths in a batch, right padding misplaces the image-token types
    # and Qwen's get_rope_index fails (seen with TRL 1.16). Left, as TRL advises.
    processor.tokenizer.padding_side = "left"
    dataset = Dataset.from_dict(
        {
            "prompt": [build_messages(r, PromptConfig()) for r in records],
            "image": [load_image(r["image"]) for r in records],
            "record": [json.dumps(r) for r in records],
        }
    )
    n = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=args.group_size,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=0,
        generation_kwargs={
            "min_new_tokens": args.max_new_tokens,
            "suppress_tokens": vision_token_ids(AutoConfig.from_pretrained(folder)),
        },
        num_iterations=1,
        beta=args.beta,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.3,
        scale_rewards="group",
        learning_rate=args.lr,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        shuffle_dataset=False,
        use_cpu=args.device == "cpu",
        bf16=False,
        seed=0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    steps: list[dict] = []

    class TimedGRPOTrainer(GRPOTrainer):
        """Times the generation call and counts the tokens it returned."""

        rollout_seconds = 0.0
        rollout_tokens = 0

        def _generate_single_turn(self, *a, **kw):
            started = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            self.rollout_seconds += time.perf_counter() - started
            self.rollout_tokens += sum(len(c) for c in completion_ids)
            return completion_ids, logprobs

    class Clock(TrainerCallback):
        started = 0.0

        def on_train_begin(self, *_, **__):
            turn.begin()
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync(args.device)
            steps.append(
                {
                    "seconds": time.perf_counter() - self.started,
                    "span": (self.started, time.perf_counter()),  # system-wide clock
                    "rollout_seconds": trainer.rollout_seconds,
                    "tokens": trainer.rollout_tokens,
                    "samples": n,
                }
            )
            trainer.rollout_seconds, trainer.rollout_tokens = 0.0, 0
            turn.hand_over()
            self.started = time.perf_counter()

    trainer = TimedGRPOTrainer(
        model=str(folder),
        reward_funcs=TrlRewardSet(REWARDS, processor, args.device),
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)  # prints each step's logs; ours prints nothing
    return trainer, steps


def build_ours(args, folder: Path, manifest: Path, scratch: Path, turn: Turn):
    import lightning as L

    from pebr_lightning.data.datamodule import ManifestDataModule
    from pebr_lightning.metrics.phases import PhaseMeter
    from pebr_lightning.models.policy import PolicySpec
    from pebr_lightning.models.rollout import SamplingConfig
    from pebr_lightning.modules.grpo import GRPOLossConfig, GRPOModule
    from pebr_lightning.modules.grpo_update import UpdateConfig
    from pebr_lightning.modules.optim import OptimConfig

    n = args.prompts * args.group_size
    module = GRPOModule(
        policy=PolicySpec(model=str(folder)),
        rewards=REWARDS,
        sampling=SamplingConfig(
            group_size=args.group_size,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=0,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
        ),
        loss=GRPOLossConfig(  # the default reduction: GlobalTokenMean, TRL's "dapo"
            mu=1, eps_low=0.2, eps_high=0.3, dual_clip=None, beta=args.beta
        ),
        optim=OptimConfig(lr=args.lr, weight_decay=0.01, schedule="constant"),
        update=UpdateConfig(
            micro_batch_size=n, max_grad_norm=1.0, share_prompt=not args.no_share_prompt
        ),
        log_samples_every_n_steps=0,
    )
    # Times only, like TRL: no per-phase memory probe inside the measured step.
    module.phase_meter = PhaseMeter(args.device, memory=False)
    steps: list[dict] = []

    class Clock(L.Callback):
        started = 0.0

        def on_train_start(self, trainer, pl_module):
            turn.begin()
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(args.device)
            seconds = time.perf_counter() - self.started
            logged = trainer.callback_metrics
            phases = {k: v["seconds"] for k, v in pl_module.phase_meter.results.items()}
            steps.append(
                {
                    "seconds": seconds,
                    "span": (self.started, self.started + seconds),  # system-wide clock
                    "rollout_seconds": phases.get("rollout", 0.0),
                    "tokens": round(float(logged["completion/length_mean"]) * n),
                    "samples": n,
                    "skipped": float(logged.get("train/skipped_steps", 0.0)),
                    "phases": phases,
                }
            )
            turn.hand_over()
            self.started = time.perf_counter()

    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision="32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(scratch / "ours"),
        callbacks=[Clock()],
    )
    data = ManifestDataModule(train_manifest=str(manifest), batch_size=args.prompts, seed=0)
    return trainer, module, data, steps
