"""One GRPO step's figures, reduced across processes through torchmetrics.

Each process sees only its own prompts. Averaging per-process means and stds
(Lightning's `sync_dist=True`) is wrong for a std or a share of groups whenever
processes hold different counts, so every figure here is kept as sums (and a max
for wall time), which torchmetrics adds up across processes before dividing.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.aggregation import MaxMetric, MeanMetric, SumMetric


class GroupSpread(Metric):
    """Mean, std, and share of zero-spread groups of values laid out in groups.

    `update(values [B*G])` with each group's G values contiguous; NaN marks "not
    applicable" and is left out. A group with fewer than two values, or with all
    values equal, is zero-spread: its advantage is 0 and it teaches nothing.
    `compute()` -> {"mean", "std" (population), "zero_std_frac", "applicable_frac"},
    with mean/std NaN when no process had a value.
    """

    full_state_update = False

    def __init__(self, group_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.group_size = group_size
        for name in ("total", "total_sq", "count", "slots", "groups", "zero_groups"):
            # float64: sums of squares of many rewards lose digits in float32.
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        grouped = values.detach().double().view(-1, self.group_size)  # [B, G]
        valid = ~grouped.isnan()  # [B, G]
        flat = grouped[valid]  # [N]
        high = grouped.masked_fill(~valid, -math.inf).amax(-1)  # [B]
        low = grouped.masked_fill(~valid, math.inf).amin(-1)  # [B]
        zero = (valid.sum(-1) < 2) | (high == low)  # [B]
        self.total += flat.sum()
        self.total_sq += (flat * flat).sum()
        self.count += flat.numel()
        self.slots += grouped.numel()
        self.groups += grouped.shape[0]
        self.zero_groups += zero.sum()

    def compute(self) -> dict[str, Tensor]:
        mean = self.total / self.count  # NaN when count == 0
        var = (self.total_sq / self.count - mean * mean).clamp(min=0.0)
        return {
            "mean": mean,
            "std": var.sqrt(),
            "zero_std_frac": self.zero_groups / self.groups.clamp(min=1),
            "applicable_frac": self.count / self.slots.clamp(min=1),
        }


class StepMetrics:
    """Collects one step's figures on this process; `compute()` reduces them globally.

    Figures are registered by name: `group` (GroupSpread of per-completion values,
    logged as `name/mean`, `name/std`...), `mean` (weighted mean), `total` (sum) and
    `max`. Processes may register different names (a reward component that only some
    batches produce): `compute` first agrees on the union of names, so every process
    runs the same collectives in the same order.

    One instance serves every step: `reset()` empties it and keeps the metric
    objects, since building ~30 torchmetrics objects per step cost more than the
    tiny model's optimizer step (docs/BENCHMARKS.md).
    """

    def __init__(self, group_size: int, device: torch.device | str = "cpu") -> None:
        self.group_size = group_size
        self.device = torch.device(device)
        self._metrics: dict[str, Metric] = {}
        self._used: set[str] = set()  # names updated since the last reset

    def reset(self) -> None:
        """Forget the figures so far (the next step starts empty)."""
        for name in self._used:
            self._metrics[name].reset()
        self._used.clear()

    def _get(self, name: str, kind: str) -> Metric:
        if name not in self._metrics:
            self._metrics[name] = _new_metric(kind, self.group_size).to(self.device)
        self._used.add(name)
        return self._metrics[name]

    def group(self, name: str, values: Tensor) -> None:
        self._get(f"group:{name}", "group").update(values.to(self.device))

    def mean(self, name: str, value: float, weight: float = 1.0) -> None:
        self._get(f"mean:{name}", "mean").update(
            torch.tensor(value, dtype=torch.float64, device=self.device),
            torch.tensor(weight, dtype=torch.float64, device=self.device),
        )

    def total(self, name: str, value: float) -> None:
        self._get(f"total:{name}", "total").update(
            torch.tensor(value, dtype=torch.float64, device=self.device)
        )

    def max(self, name: str, value: float) -> None:
        self._get(f"max:{name}", "max").update(
            torch.tensor(value, dtype=torch.float64, device=self.device)
        )

    def compute(self) -> dict[str, float]:
        """Name -> global value; NaN results (nothing to average anywhere) are left out."""
        keys = sorted(self._used)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(everyone, keys)
            keys = sorted({k for ks in everyone for k in ks})
        out: dict[str, float] = {}
        for key in keys:
            kind, name = key.split(":", 1)
            if key not in self._used:  # another process had this figure; contribute nothing
                _update_empty(self._get(key, kind), kind, self.group_size, self.device)
            metric = self._metrics[key]
            value = metric.compute()
            parts = value.items() if isinstance(value, dict) else [("", value)]
            for suffix, number in parts:
                number = float(number)
                if not math.isnan(number):
                    out[f"{name}/{suffix}" if suffix else name] = number
        return out


def _new_metric(kind: str, group_size: int) -> Metric:
    if kind == "group":
        return GroupSpread(group_size)
    if kind == "mean":
        # "ignore": a NaN figure from one micro-batch must not poison the step's mean.
        return MeanMetric(nan_strategy="ignore")
    if kind == "total":
        return SumMetric()
    if kind == "max":
        return MaxMetric()
    raise ValueError(f"unknown metric kind {kind!r}")


def _update_empty(metric: Metric, kind: str, group_size: int, device: torch.device) -> None:
    """An update that adds nothing, so compute() neither warns nor shifts the result."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    if kind == "group":
        metric.update(torch.empty(0, device=device))
    elif kind == "mean":
        metric.update(zero, zero)
    elif kind == "total":
        metric.update(zero)
    else:
        metric.update(torch.tensor(-math.inf, dtype=torch.float64, device=device))
