"""StepMetrics / GroupSpread: hand-checked values, and the same figures from two
real processes (gloo) as from one process holding both processes' data."""

from __future__ import annotations

import math

import pytest
import torch

from pebr_demo.testing.processes import run_gloo
from pebr_lightning.metrics.step import GroupSpread, StepMetrics

NAN = math.nan


def test_group_spread_by_hand():
    """Groups of 2: [1, 3] spread; [2, 2] flat; [NaN, 5] one value -> flat.
    Values 1, 3, 2, 2, 5: mean 13/5 = 2.6; squares 1+9+4+4+25 = 43, 43/5 - 2.6² =
    8.6 - 6.76 = 1.84, std sqrt(1.84). Zero-spread 2 of 3 groups; applicable 5 of 6."""
    metric = GroupSpread(2)
    metric.update(torch.tensor([1.0, 3.0, 2.0, 2.0, NAN, 5.0]))
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out["mean"] == pytest.approx(2.6)
    assert out["std"] == pytest.approx(math.sqrt(1.84))
    assert out["zero_std_frac"] == pytest.approx(2 / 3)
    assert out["applicable_frac"] == pytest.approx(5 / 6)


def test_step_metrics_names_and_skips_nan():
    """A reward that never applied logs no mean (rather than NaN) but still its shares."""
    stats = StepMetrics(group_size=2)
    stats.group("reward/none", torch.tensor([NAN, NAN]))
    stats.mean("train/kl", 0.5, weight=1.0)
    stats.mean("train/kl", 2.0, weight=3.0)  # weighted: (0.5 + 6) / 4
    stats.total("faults", 2.0)
    stats.max("seconds", 1.5)
    out = stats.compute()
    assert "reward/none/mean" not in out and out["reward/none/zero_std_frac"] == 1.0
    assert out["reward/none/applicable_frac"] == 0.0
    assert out["train/kl"] == pytest.approx(1.625)
    assert out["faults"] == 2.0 and out["seconds"] == 1.5


# Rank 0 holds 2 groups of 2, rank 1 one group; rank 1 alone has a component and a
# larger wall time. Correct global figures need sums, not a mean of per-rank results.
RANK_DATA = {
    0: {"rewards": [1.0, 3.0, 2.0, 2.0], "kl": (0.1, 4.0), "seconds": 1.0, "component": None},
    1: {"rewards": [0.0, 10.0], "kl": (1.0, 2.0), "seconds": 3.0, "component": 7.0},
}


def fill(stats: StepMetrics, rank: int) -> None:
    data = RANK_DATA[rank]
    stats.group("reward/total", torch.tensor(data["rewards"]))
    stats.mean("train/kl", *data["kl"])
    stats.total("rollout/tokens", float(len(data["rewards"])))
    stats.max("rollout/seconds", data["seconds"])
    if data["component"] is not None:
        stats.mean("component/only_rank_1", data["component"])


def expected() -> dict[str, float]:
    values = torch.tensor(RANK_DATA[0]["rewards"] + RANK_DATA[1]["rewards"], dtype=torch.float64)
    return {
        "reward/total/mean": float(values.mean()),
        "reward/total/std": float(values.std(unbiased=False)),
        "reward/total/zero_std_frac": 1 / 3,  # [2, 2] is flat; 1 of 3 groups
        "reward/total/applicable_frac": 1.0,
        "train/kl": (0.1 * 4.0 + 1.0 * 2.0) / 6.0,
        "rollout/tokens": 6.0,
        "rollout/seconds": 3.0,
        "component/only_rank_1": 7.0,
    }


def worker(rank: int) -> dict[str, float]:
    stats = StepMetrics(group_size=2)
    # an earlier step on the same instance, with a figure this step does not have
    stats.group("reward/total", torch.tensor([50.0, 60.0]))
    stats.mean("component/earlier_only", 1.0)
    stats.compute()
    stats.reset()
    fill(stats, rank)
    return stats.compute()


def test_reset_forgets_the_last_step_and_its_names():
    stats = StepMetrics(group_size=2)
    stats.group("reward/total", torch.tensor([50.0, 60.0]))
    stats.mean("train/kl", 9.0)
    stats.max("seconds", 9.0)
    stats.compute()
    stats.reset()
    stats.group("reward/total", torch.tensor([1.0, 3.0]))
    stats.max("seconds", 0.5)
    out = stats.compute()
    assert out["reward/total/mean"] == 2.0 and out["reward/total/std"] == 1.0
    assert out["seconds"] == 0.5  # not the earlier step's 9.0
    assert "train/kl" not in out


def test_two_processes_reduce_to_the_global_figures():
    results = run_gloo(worker)
    want = expected()
    for rank in (0, 1):
        assert set(results[rank]) == set(want), rank
        for key, value in want.items():
            assert results[rank][key] == pytest.approx(value), (rank, key)
    # The naive mean of per-rank stds would differ: the test can tell them apart.
    naive = (
        torch.tensor(RANK_DATA[0]["rewards"]).std(unbiased=False)
        + torch.tensor(RANK_DATA[1]["rewards"]).std(unbiased=False)
    ) / 2
    assert float(naive) != pytest.approx(want["reward/total/std"])
