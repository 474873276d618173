"""Functions the SFT and GRPO modules share (house style: functions, not a base class)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L


def keep_trainable_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """With LoRA, keep only the trainable weights in a checkpoint.

    The frozen base is reloaded from the model name on resume, so a 7B LoRA
    checkpoint holds megabytes, not the whole model.
    """
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def check_trainable_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint whose weights do not fit the module (another LoRA rank or
    target list, another model), before Lightning loads it.

    LoRA checkpoints hold only the trainable weights, so loading is not strict and a
    mismatch would otherwise pass silently: every trainable weight must be there,
    with its shape, and nothing the module lacks. A sharded checkpoint keeps its
    weights out of this dict (torch.distributed.checkpoint checks them on load).
    """
    from pebr_lightning.errors import PebrError

    state = checkpoint.get("state_dict")
    if state is None:
        return
    params = dict(module.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trainable - set(state))
    unknown = sorted(set(state) - set(module.state_dict()))
    shapes = sorted(
        f"{n} {tuple(state[n].shape)} vs {tuple(params[n].shape)}"
        for n in set(state) & set(params)
        if hasattr(state[n], "shape") and tuple(state[n].shape) != tuple(params[n].shape)
    )
    problems = [
        (f"{len(missing)} trainable weight(s) missing", missing),
        (f"{len(unknown)} weight(s) the model does not have", unknown),
        (f"{len(shapes)} shape mismatch(es)", shapes),
    ]
    found = [f"{what} (e.g. {', '.join(names[:3])})" for what, names in problems if names]
    if found:
        raise PebrError(
            "the checkpoint does not fit this model (another lora/model setting?): "
            + "; ".join(found)
        )


def shard_module(module: Any) -> bool:
    """Shard the module's policy (and frozen reference copy) with FSDP2 when the
    strategy set up a device mesh (ModelParallelStrategy); False when it did not."""
    mesh = getattr(module, "device_mesh", None)
    if mesh is None:
        return False
    from pebr_lightning.errors import PebrError
    from pebr_lightning.models.policy import unwrap
    from pebr_lightning.parallel.sharding import shard_policy

    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise PebrError(
            "trainer.strategy: tensor parallelism is not supported; use "
            "pebr_lightning.parallel.FSDP2Strategy (data_parallel_size = world size)"
        )
    dp = mesh["data_parallel"] if "data_parallel" in names else mesh
    strategy = module.trainer.strategy
    settings = strategy.shard_settings() if hasattr(strategy, "shard_settings") else {}
    shard_policy(module.policy, unwrap(module.policy), dp, **settings)
    ref = getattr(module, "ref_model", None)
    if ref is not None:
        shard_policy(ref, ref, dp, **settings)
    return True


def save_pretrained(policy: Any, processor: Any, path: str | Path) -> None:
    """Write the adapter (LoRA, PEFT format) or the full model, plus the processor.

    With sharded weights every process must call this (gathering the full weights
    is a collective); only rank 0 writes.
    """
    from pebr_lightning.files import use_default_modes
    from pebr_lightning.parallel.sharding import full_state_dict, is_rank_zero, is_sharded

    if not is_sharded(policy):
        if is_rank_zero():
            policy.save_pretrained(str(path))
            processor.save_pretrained(str(path))
            use_default_modes(path)  # safetensors writes 0600: readable as the umask allows
        return
    # A LoRA adapter needs only its own weights: don't gather the frozen base.
    state = full_state_dict(policy, trainable_only=hasattr(policy, "peft_config"))
    # rank 0 holds the gathered weights, the other ranks an empty dict
    if state:
        config = getattr(policy, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            # gathered, the tied head is a second copy of the embedding: keep one, as
            # save_pretrained does on an unsharded model
            state.pop("lm_head.weight", None)
        policy.save_pretrained(str(path), state_dict=state)
        processor.save_pretrained(str(path))
        use_default_modes(path)


POLICY_KEYS = (
    "model",
    "lora",
    "quantization",
    "freeze_vision",
    "dtype",
    "gradient_checkpointing",
    "trust_remote_code",
)
"""Settings that were flat `__init__` arguments of both modules until 2026-12-06 and are
now fields of the `policy` block (models/policy.py: PolicySpec)."""

UPDATE_KEYS = (
    "micro_batch_size",
    "prompts_per_update",
    "max_grad_norm",
    "max_nonfinite_steps",
    "share_prompt",
    "logprob_chunk_size",
)
"""GRPOModule's flat arguments until 2026-12-06, now fields of its `update` block
(modules/grpo_update.py: UpdateConfig). SFTModule keeps its own logprob_chunk_size."""

FORMER_KEYS = {
    "GRPOModule": {**dict.fromkeys(POLICY_KEYS, "policy"), **dict.fromkeys(UPDATE_KEYS, "update")},
    "SFTModule": dict.fromkeys(POLICY_KEYS, "policy"),
}
"""Module class name -> its former flat argument -> the block it moved into."""

STILL_FLAT = frozenset({"logprob_chunk_size"})
"""Former keys of one module that another still takes flat (SFTModule's
logprob_chunk_size): on a command line, without the class, they cannot be refused."""


def move_former_keys(hparams: dict[str, Any], module: str) -> dict[str, Any]:
    """`hparams` saved before 2026-12-06 with the former flat keys moved into their
    blocks (a checkpoint cannot be edited like a config). Current ones pass unchanged."""
    import dataclasses

    out = dict(hparams)
    blocks: dict[str, dict[str, Any]] = {}
    for key, block in FORMER_KEYS[module].items():
        if key in out:
            blocks.setdefault(block, {})[key] = out.pop(key)
    for block, moved in blocks.items():
        given = out.get(block) or {}
        if dataclasses.is_dataclass(given):
            given = {f.name: getattr(given, f.name) for f in dataclasses.fields(given)}
        out[block] = {**given, **moved}
    return out
