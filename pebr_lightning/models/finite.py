"""Weights that hold NaN or inf are refused where they are loaded.

A run that diverged may already have written such weights (a checkpoint saved after
the step that broke them). Loaded again they produce nothing useful and say nothing:
a resumed fit skips every step as non-finite, `pebr eval` scores 0, `pebr export`
writes a broken model, each with exit 0. So resume, evaluation, sampling, the start of
every stage and export check the weights first and name the first bad tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from pebr_lightning.errors import PebrError


def nonfinite_names(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity (a sharded
    tensor: this process's shard; quantized and meta tensors are skipped)."""
    bad = []
    for name, tensor in named:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if not isinstance(local, Tensor) or local.is_meta or not local.is_floating_point():
            continue
        if not bool(torch.isfinite(local).all()):
            bad.append(name)
    return bad


def refuse_nonfinite(named: Iterable[tuple[str, Tensor]], source: str) -> None:
    """PebrError naming `source` and its first bad tensors when any is not finite."""
    refuse_names(nonfinite_names(named), source)


def refuse_names(bad: list[str], source: str) -> None:
    """The PebrError of `refuse_nonfinite` for the bad tensor names already found."""
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise PebrError(
            f"{source}: {len(bad)} weight tensor(s) hold NaN or inf ({listed}); the run that "
            "wrote them diverged: use an earlier checkpoint (a lower lr or max_grad_norm "
            "keeps the next run finite)"
        )


__all__ = ["nonfinite_names", "refuse_names", "refuse_nonfinite"]
