"""FSDP2 (`fully_shard`) for VLM policies, and the collective helpers the modules
need once parameters are sharded.

Sharding units, bottom-up (fully_shard groups a module's parameters that no earlier
call took): every language decoder layer, every vision block (Qwen's), the vision
modules of the model family (models/families/) with their remaining layers (patch
embedding, merger or projector), the input embedding together with the
LM head (one group: Qwen ties them in the small models, and the modules call
`lm_head` directly, outside the model's own forward), then the rest of the
language model (final norm). The code never calls the top-level model's forward
(rollouts and log-probs call `base.model` and `base.lm_head` separately), so every
module it calls is itself a unit whose hooks gather its weights.

Every forward of a unit is a collective: all processes must make the same calls
in the same order. `any_across` lets a decode loop run until every process is done.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pebr_lightning.models.policy import vision_modules


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard_policy(
    policy: nn.Module,
    base: nn.Module,
    mesh: Any,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> None:
    """Apply `fully_shard` to a VLM `base` (inside `policy`, e.g. a PEFT wrapper): each
    language layer, each block of the vision modules (the family's), those modules, the
    embeddings with the LM head, then the rest."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    }
    model = base.model
    for layer in model.language_model.layers:
        fully_shard(layer, **kwargs)
    for vision in vision_modules(base):
        for block in getattr(vision, "blocks", ()):  # Qwen's vision blocks
            fully_shard(block, **kwargs)
        fully_shard(vision, **kwargs)
    fully_shard([model.language_model.embed_tokens, base.lm_head], **kwargs)
    fully_shard(model, **kwargs)


def any_across(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any process (itself when not distributed)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def max_across(value: int, device: torch.device) -> int:
    """The largest `value` over processes (itself when not distributed)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across(values: Tensor) -> Tensor:
    """`values` summed over processes (a copy; itself when not distributed)."""
    if not is_distributed():
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the global gradient norm; returns the norm before clipping as a plain tensor.

    With sharded (DTensor) parameters torch computes the norm over all shards and
    returns a DTensor: its full value is the global norm.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is a DTensor shard (FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module, trainable_only: bool = False) -> dict[str, Tensor]:
    """The unsharded state dict, on CPU, on rank 0 (an empty dict on other ranks).

    A collective: every process must call it. `trainable_only` skips frozen weights
    (a LoRA adapter needs only its own).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    return get_model_state_dict(module, options=options)


@torch.no_grad()
def init_root(base: nn.Module, device: torch.device) -> None:
    """Make `base.model` FSDP's root with one 1-token forward (a collective).

    FSDP2 takes the first sharded module to run forward as the root, and it must
    contain the others. A GRPO step starts with the vision tower (image features
    computed once per step, outside the model's forward), which would make the
    tower a root of its own and the model's first forward fail.
    """
    base.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
