"""Warm-up SFT: next-token loss on the PeBR-format response only.

The paper's first stage (docs/paper.md, "Pipeline"): fine-tune the VLM on
responses in the PeBR format (image description, rationale, steps, final answer)
with the vision tower and projector frozen, AdamW, cosine schedule with warm-up.
The target is rendered from each manifest record (data/prompts.py); every prompt
token (system, question, image tokens, assistant header) is masked out of the loss.

Departures from the paper: LoRA is available (the paper fine-tunes all language
weights), and the loss is computed from hidden states in chunks so full-vocabulary
logits are never materialised (algorithms/logprobs.py).

    pebr fit --config configs/demo/sft.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from pebr_lightning.algorithms.logprobs import shifted_targets, token_logprobs
from pebr_lightning.data.collate import PromptCollator, SFTCollator
from pebr_lightning.data.prompts import PromptConfig
from pebr_lightning.evaluation.held_out import GreedyTestLoop
from pebr_lightning.models.families import family_of
from pebr_lightning.models.policy import (
    PolicySpec,
    load_processor,
    unwrap,
)
from pebr_lightning.models.rollout import row_inputs
from pebr_lightning.modules.optim import OptimConfig, configure_adamw
from pebr_lightning.modules.shared import (
    check_trainable_state,
    keep_trainable_state,
    move_former_keys,
    save_pretrained,
    shard_module,
)
from pebr_lightning.parallel.sharding import sum_across, world_size


class SFTModule(GreedyTestLoop, L.LightningModule):
    def __init__(
        self,
        policy: PolicySpec = PolicySpec(),
        prompt: PromptConfig = PromptConfig(),
        max_length: int = 4096,
        optim: OptimConfig = OptimConfig(),
        logprob_chunk_size: int = 1024,
    ) -> None:
        """
        Args:
            policy: the model trained and how it loads (models/policy.py): model
                (`tiny-qwen2.5-vl`, embedded, no download; a local checkpoint folder or
                a hub id of a model of a registered family: Qwen2-VL / Qwen2.5-VL /
                Qwen3-VL, Gemma 3), lora (null for
                full fine-tuning), quantization (4/8-bit QLoRA), freeze_vision (left
                unset: the vision tower and projector stay frozen, as in the paper's
                SFT), dtype,
                gradient_checkpointing, trust_remote_code. The same block as GRPOModule's.
            prompt: instruction and system prompt placed around each question.
            max_length: cut-off in tokens for prompt + response (the paper uses 4096).
            optim: AdamW and schedule settings.
            logprob_chunk_size: response tokens per chunk when computing the loss; lower it
                to save memory with large vocabularies.
        """
        super().__init__()
        self.save_hyperparameters()
        self.policy_spec = policy = PolicySpec.parse(policy).with_default(freeze_vision=True)
        self.prompt = prompt
        self.max_length = max_length
        self.optim = optim
        self.logprob_chunk_size = logprob_chunk_size
        self.policy: torch.nn.Module | None = None
        self.processor: Any = None
        # With LoRA the checkpoint holds the trainable weights only; the frozen base
        # comes from `model` again on load.
        self.strict_loading = policy.lora is None

    @classmethod
    def upgrade_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Hyper-parameters saved before 2026-12-06 (flat policy settings) as this
        constructor takes them."""
        return move_former_keys(hparams, "SFTModule")

    # -- Lightning hooks, in call order -------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.processor is None:
            self.processor = load_processor(
                self.policy_spec.model, self.policy_spec.trust_remote_code
            )

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        built = self.policy_spec.build()
        # from_pretrained returns eval mode; Lightning keeps a module's mode as found.
        self.policy = built.model.train()
        self.processor = built.processor
        shard_module(self)  # FSDP2 when the strategy is ModelParallelStrategy

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(
            list(self.named_parameters()), self.optim, int(self.trainer.estimated_stepping_batches)
        )

    def collator(self, split: str) -> SFTCollator | PromptCollator:
        """Builds batches for every split: validation loss uses the same targets;
        `pebr test` answers the prompts greedily (GreedyTestLoop)."""
        if split == "test":
            return PromptCollator(self.processor, self.prompt)
        return SFTCollator(self.processor, self.prompt, self.max_length)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, mean, n_tokens = self.response_loss(batch)
        size = len(batch["ids"])
        self.log("train/loss", mean, prog_bar=True, batch_size=size)
        self.log("train/response_tokens", float(n_tokens), batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, mean, _ = self.response_loss(batch)
        self.log("val/loss", mean, prog_bar=True, batch_size=len(batch["ids"]))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pebr_policy"] = self.policy_spec.to_dict()  # what export rebuilds
        if self.policy_spec.lora is not None:
            keep_trainable_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_trainable_state(self, checkpoint)

    # -- helpers ------------------------------------------------------------------------

    def response_loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, int]:
        """The loss to differentiate, the mean NLL per response token over all processes
        (detached, to log), and the response-token count of all processes.

        Each process holds its own share of the batch and the gradient is averaged
        over processes, so the loss is this process's NLL sum x world size / all
        processes' token count: the average is then the token mean of the whole
        batch, as on one process, however unevenly the tokens fall.
        """
        base = unwrap(self.policy)
        family = family_of(base.config)
        mask = batch["attention_mask"]
        hidden = base.model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            use_cache=False,
            **row_inputs(family, batch["mm_token_type_ids"], mask),
            **{k: batch[k] for k in family.image_keys if k in batch},
        ).last_hidden_state  # [B, T, H]
        hidden, targets = shifted_targets(hidden, batch["labels"])  # [N, H], [N]
        logp = token_logprobs(hidden, base.lm_head, targets, self.logprob_chunk_size)  # [N]
        nll = -logp.sum()
        total = sum_across(torch.stack([nll.detach(), logp.new_tensor(float(targets.numel()))]))
        count = max(float(total[1]), 1.0)
        return nll * world_size() / count, total[0] / count, int(total[1])

    def save_pretrained(self, path: str | Path) -> None:
        """Write the adapter (LoRA, PEFT format) or the full model, plus the processor."""
        save_pretrained(self.policy, self.processor, path)
