"""GRPO: the engine of both RL stages (perception on Easy cases, reasoning on Medium).

One training step per batch of B prompts (docs/paper.md, "GRPO settings"):
sample G completions per prompt -> score them with the configured rewards ->
group-relative advantages -> (reference log-probs when beta > 0) -> mu passes of
clipped policy-gradient updates over the rollout, in micro-batches with gradient
accumulation and grad-norm clipping, one optimizer step per `prompts_per_update`.

Where it departs from the naive loop (models/rollout.py): each image goes through
the vision tower once per step and each prompt is prefilled once per group; with
mu = 1 the old log-probs are the new ones detached (no second forward).
Departures from the paper: LoRA is available; the paper trains the vision tower
(freeze_vision false, as here by default) with full fine-tuning.

    pebr fit --config configs/demo/perception.yaml
"""

from __future__ import annotations

import contextlib
import copy
import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from pebr_lightning.algorithms.advantages import step_advantages
from pebr_lightning.algorithms.loss_config import GRPOLossConfig
from pebr_lightning.data.collate import PromptCollator, prompt_inputs, prompt_limit
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.engines import (
    EngineContext,
    RolloutConfig,
    RolloutEngine,
    build_engine,
    timed_sync,
)
from pebr_lightning.errors import PebrError
from pebr_lightning.evaluation.held_out import GreedyTestLoop, GreedyValidationLoop
from pebr_lightning.metrics.phases import PhaseMeter
from pebr_lightning.metrics.step import StepMetrics
from pebr_lightning.models.families import ModelFamily, family_of
from pebr_lightning.models.policy import (
    PolicySpec,
    adapter_free_vision,
    load_processor,
    position_limit,
    unwrap,
    vision_trainable,
)
from pebr_lightning.models.rollout import (
    Rollout,
    SamplingConfig,
    completion_logprobs,
    decode_completions,
    features_of,
    group_keys,
    supports_shared_features,
)
from pebr_lightning.modules.grpo_logs import publish_samples, record_step, sample_rows, step_logs
from pebr_lightning.modules.grpo_parts import ScoredRollout, Scores, fill_groups, trained_rollout
from pebr_lightning.modules.grpo_update import (
    NonFiniteGuard,
    UpdateConfig,
    UpdateHooks,
    UpdateSettings,
    memory_guard,
    policy_update,
)
from pebr_lightning.modules.optim import OptimConfig, configure_adamw
from pebr_lightning.modules.shared import (
    check_trainable_state,
    keep_trainable_state,
    move_former_keys,
    save_pretrained,
    shard_module,
)
from pebr_lightning.parallel.sharding import any_across, init_root
from pebr_lightning.rewards.combine import load_rewards, score_groups
from pebr_lightning.rewards.registry import RewardSpec


class GRPOModule(GreedyValidationLoop, GreedyTestLoop, L.LightningModule):
    def __init__(
        self,
        policy: PolicySpec = PolicySpec(),
        rewards: list[RewardSpec] | None = None,
        prompt: PromptConfig = PromptConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        rollout: RolloutConfig = RolloutConfig(),
        loss: GRPOLossConfig = GRPOLossConfig(),
        update: UpdateConfig = UpdateConfig(),
        optim: OptimConfig = OptimConfig(lr=1e-6, weight_decay=1e-2, schedule="constant"),
        dynamic_sampling_tries: int = 0,
        share_image_features: bool = True,
        log_samples_every_n_steps: int = 50,
        rollout_seed: int = 0,
        max_prompt_tokens: int | None = None,
    ) -> None:
        """
        Args:
            policy: the model trained and how it loads (models/policy.py: model, lora,
                quantization, freeze_vision, dtype, gradient_checkpointing,
                trust_remote_code); the same block as SFTModule's. freeze_vision left
                unset trains the vision tower here, as the paper's RL does.
            rewards: rewards by registry name with weights, e.g.
                [{name: accuracy, weight: 0.9}, {name: format, weight: 0.1}].
            prompt: instruction and system prompt placed around each question.
            sampling: group size, temperature, top-p/top-k and length of the rollouts.
            rollout: the engine that generates them, by name or class path with its
                settings (engines/: `hf`, the model itself, or `vllm`, a worker).
            loss: clipping, KL, reduction and advantage settings.
            update: micro-batches, prompts per optimizer step, gradient clipping,
                tolerated non-finite steps, shared-prompt passes (grpo_update.py).
            optim: AdamW and schedule (paper: lr 1e-6, weight decay 1e-2, no warm-up).
            dynamic_sampling_tries: DAPO's dynamic sampling: replace groups whose rewards
                are all equal with fresh prompts from the training set, up to this many
                extra rollouts per step (0 = off). Counts are logged.
            share_image_features: run the vision tower once per image per step and reuse
                its output for the G sequences of a group (off = the naive path).
            log_samples_every_n_steps: write sample completions with their rewards to
                `samples.jsonl` in the log folder every this many steps (0 = never).
            rollout_seed: seed of the rollout noise. Each completion's noise is keyed
                by (seed, step, sample id, group member), so the same sample draws the
                same completion on 1 or N processes and after a resume.
            max_prompt_tokens: a prompt longer than this (image tokens included) stops
                training with an error naming the sample; null = the model's
                max_position_embeddings less sampling.max_new_tokens.
        """
        super().__init__()
        self.save_hyperparameters()
        if not rewards:
            raise PebrError("GRPOModule needs at least one reward in model.rewards")
        self.automatic_optimization = False
        if sampling.temperature <= 0:
            # The loss divides logits by the temperature, and greedy rollouts of a
            # group are identical: no spread, no advantage.
            raise PebrError(
                f"model.sampling.temperature must be > 0 for GRPO, got {sampling.temperature}"
            )
        self.policy_spec = policy = PolicySpec.parse(policy).with_default(freeze_vision=False)
        self.reward_specs = [RewardSpec.from_dict(r) for r in rewards]
        self.prompt = prompt
        self.sampling = sampling
        self.update_settings = UpdateSettings(loss, update, sampling.max_new_tokens)
        self.rollout_cfg = RolloutConfig.parse(rollout)
        self.rollout_cfg.settings()  # a misspelt engine or setting stops here, before fit
        self.engine: RolloutEngine | None = None
        self.advantage = loss.build_advantage()
        loss.build_reduction()  # a wrong class path stops here, not at the first update
        self.optim = optim
        self._nonfinite = NonFiniteGuard(update.max_nonfinite_steps)
        self.dynamic_sampling_tries = dynamic_sampling_tries
        self.share_image_features = share_image_features
        self.log_samples_every_n_steps = log_samples_every_n_steps
        self.rollout_seed = rollout_seed
        self.max_prompt_tokens = max_prompt_tokens
        self._sharded = False
        self.policy: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.processor: Any = None
        self.rewards: Any = None
        self._samples_step: int | None = None
        self._stats = StepMetrics(sampling.group_size)
        self.phase_meter: PhaseMeter | None = None
        self.strict_loading = policy.lora is None

    @property
    def loss_cfg(self) -> GRPOLossConfig:
        return self.update_settings.loss

    @property
    def update_cfg(self) -> UpdateConfig:
        return self.update_settings.update

    @classmethod
    def upgrade_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Hyper-parameters saved before 2026-12-06 (flat policy and update settings)
        as this constructor takes them: the former keys moved into their blocks."""
        return move_former_keys(hparams, "GRPOModule")

    # -- Lightning hooks, in call order -------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.processor is None:
            self.processor = load_processor(
                self.policy_spec.model, self.policy_spec.trust_remote_code
            )
        if self.rewards is None:
            self.rewards = load_rewards(self.reward_specs)  # imports only the named rewards

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        built = self.policy_spec.build()
        self.policy = built.model.train()
        self.processor = built.processor
        if self.loss_cfg.beta > 0 and self.policy_spec.lora is None:
            # Without LoRA the reference needs its own frozen copy (with LoRA the same
            # weights with the adapter switched off serve, at no extra memory).
            self.ref_model = copy.deepcopy(unwrap(self.policy)).eval().requires_grad_(False)
        self._sharded = shard_module(self)  # FSDP2 when the strategy is ModelParallelStrategy
        # here, so that an engine that cannot serve this policy stops a fit before it
        # starts; validate and test answer greedily with the policy and need none
        if self._trainer is None or self.trainer.state.fn == TrainerFn.FITTING:
            self.start_engine()

    def on_fit_start(self) -> None:
        if self._sharded:
            init_root(unwrap(self.policy), self.device)
            if self.ref_model is not None:  # sharded too, and first run from its vision tower
                init_root(self.ref_model, self.device)
        # Here, not in configure_model: a resumed run's weights are restored in between,
        # and an engine serving a copy (vLLM) must start from those.
        self.start_engine().sync_weights(self.policy)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.engine is not None:  # e.g. a worker process it started
            self.engine.close()
            self.engine = None

    def configure_optimizers(self) -> dict[str, Any]:
        params = [(n, p) for n, p in self.named_parameters() if not n.startswith("ref_model.")]
        return configure_adamw(params, self.optim, int(self.trainer.estimated_stepping_batches))

    @property
    def family(self) -> ModelFamily:
        """The policy's model family (models/families/)."""
        return family_of(unwrap(self.policy).config)

    @property
    def held_out_max_new_tokens(self) -> int:  # validation and `pebr test` answer as rollouts
        return self.sampling.max_new_tokens

    def collator(self, split: str) -> PromptCollator:
        # Unset, the model's own position limit (less the completion's room) holds.
        positions, spec = None, self.policy_spec
        if self.max_prompt_tokens is None:
            policy = None if self.policy is None else unwrap(self.policy)
            positions = position_limit(spec.model, spec.trust_remote_code, policy)
        tokens = self.sampling.max_new_tokens
        limit, setting = prompt_limit(self.max_prompt_tokens, positions, tokens)
        return PromptCollator(self.processor, self.prompt, limit, setting)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._stats.device != self.device:
            self._stats = StepMetrics(self.sampling.group_size, self.device)
        self._stats.reset()
        if self.phase_meter is None:
            self.phase_meter = PhaseMeter(self.device)
        self.phase_meter.reset()
        prompt = prompt_inputs(batch)
        rollout, features = self.rollout(prompt, batch["records"])
        scores = self.score(rollout, batch["records"], batch["image_lists"])
        part = ScoredRollout(
            prompt, rollout, features, scores, batch["records"], batch["image_lists"], self.family
        )
        if self.dynamic_sampling_tries:
            part = self.resample(part)
        cfg, g = self.loss_cfg, self.sampling.group_size  # advantages [B*G], rows to train [B*G]
        advantages, keep = step_advantages(
            part.scores.rewards, g, self.advantage, cfg.drop_zero_variance
        )
        ref = self.reference_logprobs(part.prompt, part.rollout, part.features)
        # logprobs(rows [n]) -> [n, T] under the current policy, with gradients
        base, features = unwrap(self.policy), part.features
        logprobs = partial(self.logprobs, base, part.prompt, part.rollout, features=features)
        # mu passes of clipped policy-gradient steps over the rollout (grpo_update.py),
        # on the tokens of the section this stage trains
        trained = trained_rollout(self.processor.tokenizer, part.rollout, cfg.trained_section)
        metrics = policy_update(
            logprobs, trained, advantages, keep, ref, self.update_settings, self.hooks()
        )
        # the next rollout samples the new weights; time/sync_s is what that took
        self._stats.max("time/sync_s", timed_sync(self.engine, self.policy))
        self.log_step(part, advantages, metrics)
        self._nonfinite.check(metrics, part.scores, self.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is not None and self.ref_model is not None:
            # saved without it (on_save_checkpoint): the reference is the start weights,
            # which configure_model has just copied again
            ref = {f"ref_model.{k}": v for k, v in self.ref_model.state_dict().items()}
            checkpoint["state_dict"] = {**ref, **state}
        check_trainable_state(self, checkpoint)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pebr_policy"] = self.policy_spec.to_dict()  # what export rebuilds
        checkpoint["pebr_rewards"] = [spec.to_dict() for spec in self.reward_specs]
        if self.policy_spec.lora is not None:
            keep_trainable_state(self, checkpoint)
        else:
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ref_model.")
            }

    # -- the step's phases ----------------------------------------------------------------

    def rollout(
        self, prompt: dict[str, Tensor], records: list[dict], attempt: int = 0
    ) -> tuple[Rollout, list[Tensor] | None]:
        """G completions per prompt from the rollout engine, and the image features it
        computed (None where the log-prob passes must encode the images themselves)."""
        keys = group_keys(
            self.rollout_seed,
            self.global_step,
            attempt,
            [str(r["id"]) for r in records],
            self.sampling.group_size,
        ).to(self.device)
        self.engine.at_step(self.global_step)
        with self.timed_phase("rollout"), self.memory_guard("rollout", records):
            rollout = self.engine.generate(prompt, self.sampling, keys=keys, records=records)
        features = rollout.features
        if features is not None and vision_trainable(self.policy):
            features = None  # trainable tower: recompute with gradients per micro-batch
        return rollout, features

    def score(self, rollout: Rollout, records: list[dict], images: list[list[Any]]) -> Scores:
        """Decode completions and run the reward set; None totals become NaN. `images`
        holds each prompt's images; rewards get each sample's first as `images` and
        all of them as `image_lists`."""
        g = rollout.group_size
        with self.timed_phase("score"):
            texts = decode_completions(self.processor.tokenizer, rollout)
            result = score_groups(
                self.rewards,
                texts,
                records,
                images,
                g,
                self.processor,
                global_step=self.global_step,
                device=self.device,
            )
        total = torch.tensor(
            [math.nan if t is None else t for t in result.total], device=self.device
        )
        return Scores(total, result, texts)

    def resample(self, part: ScoredRollout) -> ScoredRollout:
        """Replace zero-variance groups with groups of fresh prompts from the training
        set (DAPO dynamic sampling; grpo_parts.fill_groups)."""
        dataset = self.trainer.train_dataloader.dataset
        # Each process draws its own prompts (the same seed would pick the same ones).
        generator = torch.Generator().manual_seed(
            (self.rollout_seed * 1_000_003 + self.global_step) * 4099 + self.global_rank
        )

        def draw(attempt: int, want: int) -> ScoredRollout:
            picks = torch.randint(len(dataset), (want,), generator=generator).tolist()
            batch = self.collator("train")([dataset[i] for i in picks])
            prompt = {k: v.to(self.device) for k, v in prompt_inputs(batch).items()}
            rollout, features = self.rollout(prompt, batch["records"], attempt=attempt)
            scores = self.score(rollout, batch["records"], batch["image_lists"])
            return ScoredRollout(
                prompt,
                rollout,
                features,
                scores,
                batch["records"],
                batch["image_lists"],
                self.family,
            )

        # Sharded, every process must roll out as often as the neediest one (each
        # forward is a collective).
        anywhere = partial(any_across, device=self.device) if self._sharded else bool
        pad = self.processor.tokenizer.pad_token_id
        filled, tries, share = fill_groups(part, self.dynamic_sampling_tries, draw, anywhere, pad)
        self._stats.mean("dynamic_sampling/extra_rollouts", float(tries))
        self._stats.mean("dynamic_sampling/filled_frac", share, len(part.records))
        return filled

    @torch.no_grad()
    def reference_logprobs(
        self, prompt: dict[str, Tensor], rollout: Rollout, features: list[Tensor] | None
    ) -> Tensor | None:
        """log p_ref of the completions, only when beta > 0 (else no reference pass at all)."""
        if self.loss_cfg.beta == 0:
            return None
        rows = torch.arange(rollout.completion_ids.shape[0], device=self.device)
        pieces = []
        with self.timed_phase("logprobs"), self.memory_guard("reference pass"):
            for micro in rows.split(self.update_cfg.micro_batch_size):
                if self.ref_model is None:  # LoRA: the same weights with the adapter off
                    with self.policy.disable_adapter():
                        base = unwrap(self.policy)
                        feats = features if adapter_free_vision(self.policy) else None
                        pieces.append(self.logprobs(base, prompt, rollout, micro, feats))
                else:
                    pieces.append(self.logprobs(self.ref_model, prompt, rollout, micro, None))
        return torch.cat(pieces)

    # -- helpers --------------------------------------------------------------------------

    def start_engine(self) -> RolloutEngine:
        if self.engine is None:
            context = EngineContext(
                self.processor,
                spec=self.policy_spec,
                synced=self._sharded,
                share_image_features=self.share_image_features,
            )
            self.engine = build_engine(self.rollout_cfg, context)
        return self.engine

    def hooks(self) -> UpdateHooks:
        """The trainer's handles an update needs (grpo_update.policy_update)."""
        optimizer = self.optimizers()
        return UpdateHooks(
            optimizer=optimizer,
            scheduler=self.lr_schedulers(),
            backward=self.manual_backward,
            # the optimizer's own: sharded, a group left unsharded after a forward would
            # list its unsharded copies, whose grad stays None (the norm would miss them)
            params=[p for group in optimizer.param_groups for p in group["params"]],
            phase=self.timed_phase,
            out_of_memory=self.memory_guard,
            world_size=self.trainer.world_size,
        )

    def timed_phase(self, name: str) -> contextlib.AbstractContextManager:
        """Time (and peak memory) of a phase of the step, when a meter is attached."""
        return (
            contextlib.nullcontext() if self.phase_meter is None else self.phase_meter.phase(name)
        )

    def memory_guard(self, phase: str, records: list[dict] | None = None):
        """Out of memory in `phase` -> a PebrError naming it, the step and what to lower."""
        micro = self.update_cfg.micro_batch_size
        return memory_guard(phase, self.global_step, self.sampling, micro, records)

    def logprobs(self, base, prompt, rollout, rows, features) -> Tensor:
        shared = supports_shared_features(base)
        if features is None and self.share_image_features and shared:
            # trainable vision tower: encode only this micro-batch's images, with gradients
            features = features_of(base, prompt, rows // rollout.group_size)
        # A checkpointed layer in training mode drops the KV cache the sharing rides on.
        checkpointed = self.policy_spec.gradient_checkpointing and base.training
        return completion_logprobs(
            base,
            prompt,
            rollout,
            rows,
            features,
            self.sampling.temperature,
            self.update_cfg.logprob_chunk_size,
            share_prompt=self.update_cfg.share_prompt and shared and not checkpointed,
        )

    def log_step(self, part: ScoredRollout, advantages: Tensor, metrics: dict) -> None:
        phases = self.phase_meter.results if self.phase_meter else {}
        record_step(self._stats, part.rollout, part.scores, advantages, metrics, phases)
        # Already reduced over processes by torchmetrics: no sync_dist averaging on top.
        for key, value in step_logs(self._stats).items():
            self.log(key, value, batch_size=len(part.records))
        every = self.log_samples_every_n_steps
        # global_step moves by the number of updates per rollout: write on crossing a multiple.
        crossed = self._samples_step is None or (
            self.global_step // max(every, 1) > self._samples_step // max(every, 1)
        )
        if not (every and crossed):
            return
        self._samples_step = self.global_step
        # trainer.log_dir is a broadcast under a distributed strategy: every process asks
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if self.trainer.is_global_zero:
            rows = sample_rows(self.global_step, part)
            publish_samples(rows, folder, self.loggers, self.global_step)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the adapter (LoRA, PEFT format) or the full model, plus the processor."""
        save_pretrained(self.policy, self.processor, path)
