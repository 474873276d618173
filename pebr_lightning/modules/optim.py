"""Optimizer and LR schedule shared by the SFT and GRPO modules.

AdamW comes from torch, or from bitsandbytes for the memory-saving variants
(8-bit state, paged state) that make QLoRA fit on one 24 GB GPU
(configs/qlora-24gb/). All four take the same parameter groups and settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from pebr_lightning.algorithms.schedules import warmup_cosine
from pebr_lightning.errors import PebrError

OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
# bitsandbytes.optim class of each name that is not plain torch AdamW.
BNB_CLASSES = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw_8bit": "PagedAdamW8bit",
}


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and a cosine (or constant) schedule."""

    name: OptimizerName = "adamw"
    """Which AdamW: `adamw` is torch's, two fp32 moments (8 bytes per trained parameter).
    The others are bitsandbytes': `adamw_8bit` keeps both moments in 8 bits, blockwise
    quantized (~2 bytes per parameter; tensors under 4,096 elements stay 32-bit):
    for a 7B LoRA run (r 16 on the language projections, ~40 M parameters) that is
    ~0.08 GB instead of ~0.32 GB, for full fine-tuning of Qwen2.5-VL-7B (8.3 B) ~17 GB
    instead of ~66 GB. `paged_adamw` keeps the fp32 state in CUDA unified (paged)
    memory that spills to CPU RAM when the GPU runs short, so a memory spike (a long
    rollout) slows a step down instead of ending the run; `paged_adamw_8bit` does both
    and is the choice for QLoRA on one 24 GB GPU. On CPU, bitsandbytes runs all three
    and the paged ones fall back to ordinary memory (with a warning)."""
    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (not biases or norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment coefficients."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    warmup_ratio: float = 0.0
    """Share of the total optimizer steps spent warming up (ignored if warmup_steps is set)."""
    warmup_steps: int | None = None
    """Warm-up length in optimizer steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Shape after warm-up."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of lr."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by parameter name: each key is a regular expression
    searched in the parameter's name (the first key that matches wins), its value the
    factor on `lr` for those parameters, e.g. `{"visual": 0.1}` to train a vision
    tower ten times slower than the language model. Unmatched parameters train at `lr`;
    a key that matches no parameter is an error, one that matches only frozen ones is
    not (nothing to scale)."""

    def __post_init__(self) -> None:
        if self.name not in get_args(OptimizerName):
            raise PebrError(
                f"optim.name must be one of {', '.join(get_args(OptimizerName))}, got {self.name!r}"
            )
        if self.lr <= 0:
            raise PebrError(f"optim.lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise PebrError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for pattern, factor in self.lr_scale.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise PebrError(
                    f"optim.lr_scale key {pattern!r} is not a regular expression: {err}"
                ) from err
            if not factor > 0:
                raise PebrError(
                    f"optim.lr_scale[{pattern!r}] must be positive, got {factor}"
                    " (freeze parameters with the module's own switches instead)"
                )

    def scale_of(self, name: str) -> float:
        """The lr factor of parameter `name`: the first `lr_scale` key found in it, else 1."""
        for pattern, factor in self.lr_scale.items():
            if re.search(pattern, name):
                return factor
        return 1.0


def configure_adamw(
    params: list[tuple[str, nn.Parameter]], cfg: OptimConfig, total_steps: int
) -> dict[str, Any]:
    """Lightning's `configure_optimizers` answer for the trainable `params`."""
    trainable = [(n, p) for n, p in params if p.requires_grad]
    if not trainable:
        raise PebrError("no trainable parameters: check lora / freeze_vision settings")
    # A key that names no parameter at all is a typo; one that names only frozen ones
    # (the same config with the vision tower frozen, or LoRA) has nothing to scale.
    unused = [k for k in cfg.lr_scale if not any(re.search(k, n) for n, _ in params)]
    if unused:
        raise PebrError(
            f"optim.lr_scale: {', '.join(map(repr, unused))} matches no parameter"
            f" (names look like {trainable[0][0]!r})"
        )
    # One group per (decayed?, lr factor); LambdaLR scales each group's own lr. The
    # unscaled decayed group comes first: progress printers and monitors show group 0.
    by_key: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in trainable:
        by_key.setdefault((param.ndim >= 2, cfg.scale_of(name)), []).append(param)
    groups = [
        {
            "params": params,
            "weight_decay": cfg.weight_decay if decayed else 0.0,
            "lr": cfg.lr * factor,
        }
        for (decayed, factor), params in sorted(
            by_key.items(), key=lambda kv: (not kv[0][0], kv[0][1] != 1.0, kv[0][1])
        )
    ]
    optimizer = build_optimizer(groups, cfg)
    warmup = (
        cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    )
    if cfg.schedule == "cosine":

        def factor(step: int) -> float:
            return warmup_cosine(step, total_steps, warmup, cfg.min_lr_ratio)
    else:

        def factor(step: int) -> float:
            return min(1.0, step / warmup) if warmup > 0 else 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The AdamW `cfg.name` names over parameter `groups` (each with its weight decay)."""
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError as err:
        raise PebrError(
            f"optim.name {cfg.name!r} needs bitsandbytes ({err}); install it or use "
            "optim.name adamw"
        ) from err
    cls = getattr(bnb_optim, BNB_CLASSES[cfg.name])
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
