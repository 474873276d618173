"""Optimizer and LR schedule shared by the SFT and GRPO modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pebr_lightning.algorithms.schedules import warmup_cosine
from pebr_lightning.errors import PebrError


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and a cosine (or constant) schedule."""

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

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise PebrError(f"optim.lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise PebrError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def configure_adamw(
    params: list[tuple[str, nn.Parameter]], cfg: OptimConfig, total_steps: int
) -> dict[str, Any]:
    """Lightning's `configure_optimizers` answer for the trainable `params`."""
    trainable = [(n, p) for n, p in params if p.requires_grad]
    if not trainable:
        raise PebrError("no trainable parameters: check lora / freeze_vision settings")
    groups = [
        {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )
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
