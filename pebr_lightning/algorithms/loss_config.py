"""GRPO's policy-gradient settings: `model.init_args.loss` of a config.

The variants it names by class path are built from here: the advantage estimator
(advantages.py) and the loss reduction (reductions.py); each is a small class a user
can replace with their own (variants.py). Checked once, when the config is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pebr_lightning.algorithms.advantages import AdvantageEstimator
from pebr_lightning.algorithms.reductions import FORMER_LOSS_TYPES, LossReduction
from pebr_lightning.algorithms.variants import build_variant, variant_spec
from pebr_lightning.errors import PebrError

DEFAULT_ADVANTAGE = "pebr_lightning.algorithms.advantages.GroupNormalized"  # GRPO
DEFAULT_REDUCTION = "pebr_lightning.algorithms.reductions.GlobalTokenMean"  # DAPO, the paper


@dataclass(frozen=True)
class GRPOLossConfig:
    """Policy-gradient settings (defaults: the paper's)."""

    mu: int = 1
    """Policy-gradient passes over each rollout."""
    eps_low: float = 0.2
    """Lower clip range: ratios below 1 - eps_low stop pushing for A < 0."""
    eps_high: float = 0.3
    """Upper clip range (the paper's clip-higher 0.3)."""
    dual_clip: float | None = 3.0
    """Dual-clip constant c: for A < 0 the loss is capped at -c*A; null disables it."""
    beta: float = 1e-2
    """Weight of the k3 KL to the reference model in the loss; 0 builds no reference."""
    reduction: dict[str, Any] = field(default_factory=lambda: {"class_path": DEFAULT_REDUCTION})
    """How per-token losses become one scalar, by class path (algorithms/reductions.py):
    GlobalTokenMean (DAPO; the paper's token mean over the update batch of all
    processes), TokenMean (BNPO), SequenceMean (GRPO), ConstantLength (Dr. GRPO), or
    a class of your own with `reduce` and `share`."""
    loss_type: str | None = None
    """Replaced by `reduction` (2026-12-06); set, it stops with the new key to write."""
    importance_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token (GRPO) or per sequence (GSPO)."""
    advantage: dict[str, Any] = field(default_factory=lambda: {"class_path": DEFAULT_ADVANTAGE})
    """The advantage estimator, by class path (algorithms/advantages.py): GroupNormalized
    (GRPO, the paper), BatchNormalized, GroupCentred (Dr. GRPO), LeaveOneOut (RLOO), or
    any class of your own with the same call."""
    advantage_scale: str | None = None
    """Replaced by `advantage` (2026-12-05); set, it stops with the new key to write."""
    drop_zero_variance: bool = False
    """Leave groups whose rewards are all equal out of the loss (their advantage is 0)."""
    engine_correction: Literal[
        "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"
    ] = "none"
    """Weight each token's policy-gradient term by pi_old / pi_engine, capped (truncated
    importance sampling), for an engine that samples from a slightly different policy
    (vLLM); none: the trainer's log-probs alone (exact GRPO when the engine is exact)."""
    engine_correction_cap: float = 2.0
    """The cap C of those weights (algorithms/engine_correction.py)."""
    trained_section: Literal["all", "description", "reasoning"] = "all"
    """Completion tokens in the loss: all (the paper), the image description alone
    (what Stage 1's perception rewards score), or everything after it (what Stage 2's
    answer reward scores). A completion without the section header keeps every token
    (algorithms/sections.py)."""

    def __post_init__(self) -> None:
        if self.advantage_scale is not None:
            raise PebrError(
                f"loss.advantage_scale ({self.advantage_scale}) was replaced by loss.advantage; "
                f"write advantage: {{class_path: {_former_advantage(self.advantage_scale)}}}"
            )
        if self.loss_type is not None:
            raise PebrError(
                f"loss.loss_type ({self.loss_type}) was replaced by loss.reduction; write "
                f"reduction: {{class_path: {_former_reduction(self.loss_type)}}}"
            )
        object.__setattr__(self, "advantage", variant_spec(self.advantage, "loss.advantage"))
        object.__setattr__(self, "reduction", variant_spec(self.reduction, "loss.reduction"))
        if self.mu < 1:
            raise PebrError(f"loss.mu must be >= 1, got {self.mu}")
        if self.beta < 0:
            raise PebrError(f"loss.beta must be >= 0, got {self.beta}")
        if not self.engine_correction_cap > 0:
            raise PebrError(
                f"loss.engine_correction_cap must be > 0, got {self.engine_correction_cap}"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Checkpoints written before 2026-12-05 hold advantage_scale: they load with
        # the estimator it meant (pickle restores attributes without __init__).
        state = dict(state)
        scale = state.pop("advantage_scale", None)
        if "advantage" not in state:
            state["advantage"] = {"class_path": _former_advantage(scale), "init_args": {}}
        state["advantage_scale"] = None
        # ... and those before 2026-12-06 hold loss_type, the reduction's former name.
        loss_type = state.pop("loss_type", None)
        if "reduction" not in state:
            state["reduction"] = {"class_path": _former_reduction(loss_type), "init_args": {}}
        state["loss_type"] = None
        self.__dict__.update(state)

    def build_advantage(self) -> AdvantageEstimator:
        """The advantage estimator `advantage` names."""
        return build_variant(self.advantage, AdvantageEstimator, "model.init_args.loss.advantage")

    def build_reduction(self) -> LossReduction:
        """The loss reduction `reduction` names."""
        return build_variant(self.reduction, LossReduction, "model.init_args.loss.reduction")


def _former_advantage(scale: Any) -> str:
    """The estimator an `advantage_scale` value (before 2026-12-05) selected."""
    name = {"batch": "BatchNormalized", "none": "GroupCentred"}.get(str(scale), "GroupNormalized")
    return f"pebr_lightning.algorithms.advantages.{name}"


def _former_reduction(loss_type: Any) -> str:
    """The reduction a `loss_type` value (before 2026-12-06) selected; dapo was the default."""
    return FORMER_LOSS_TYPES.get(str(loss_type), FORMER_LOSS_TYPES["dapo"])
