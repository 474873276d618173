"""AccuracyByType: hand-checked values, and the same figures from two real processes
(gloo) as from one process holding both processes' data."""

from __future__ import annotations

import pytest
import torch

from pebr_demo.testing.processes import run_gloo
from pebr_lightning.metrics.accuracy import AccuracyByType

TYPES = ["count", "colour", "choice", "left_of"]
# (correct, type index, ungraded): 7 graded answers; "left_of" is never asked.
PREDICTIONS = [
    (1.0, 0, False),
    (0.0, 0, False),
    (1.0, 0, False),
    (1.0, 1, False),
    (0.0, 1, True),  # the reward returned None: counted wrong, and counted as ungraded
    (0.0, 2, False),
    (1.0, 2, False),
]
# Rank 0 holds the first 4 answers, rank 1 the last 3.
SPLIT = 4


def update(metric: AccuracyByType, rows) -> None:
    metric.update(
        torch.tensor([c for c, _, _ in rows]),
        torch.tensor([t for _, t, _ in rows]),
        ungraded=torch.tensor([u for _, _, u in rows]),
    )


def test_accuracy_by_hand():
    """count 1, 0, 1 -> 2/3; colour 1, ungraded -> 1/2; choice 0, 1 -> 1/2;
    overall 4 right of 7 -> 4/7; left_of has no question -> no key; 1 ungraded."""
    metric = AccuracyByType(TYPES)
    update(metric, PREDICTIONS)
    out = {k: float(v) for k, v in metric.compute().items()}
    assert out == pytest.approx(
        {"accuracy": 4 / 7, "accuracy/count": 2 / 3, "accuracy/colour": 0.5, "accuracy/choice": 0.5}
    )
    assert metric.counts() == {"n": 7, "ungraded": 1, "n/count": 3, "n/colour": 2, "n/choice": 2}


def test_bool_input_and_updates_accumulate():
    """The same answers as bools, in two updates, give the same figures."""
    metric = AccuracyByType(TYPES)
    for rows in (PREDICTIONS[:SPLIT], PREDICTIONS[SPLIT:]):
        metric.update(
            torch.tensor([c == 1.0 for c, _, _ in rows]), torch.tensor([t for _, t, _ in rows])
        )
    assert float(metric.compute()["accuracy"]) == pytest.approx(4 / 7)
    assert metric.counts()["ungraded"] == 0  # no `ungraded` given: none counted


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="repeat"):
        AccuracyByType(["a", "a"])
    metric = AccuracyByType(["a", "b"])
    with pytest.raises(ValueError, match="out of range"):
        metric.update(torch.tensor([1.0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="type_index"):
        metric.update(torch.tensor([1.0, 0.0]), torch.tensor([0]))


def worker(rank: int) -> tuple[dict, dict]:
    metric = AccuracyByType(TYPES)
    update(metric, PREDICTIONS[:SPLIT] if rank == 0 else PREDICTIONS[SPLIT:])
    return {k: float(v) for k, v in metric.compute().items()}, metric.counts()


def test_two_processes_reduce_to_the_single_process_figures():
    """Rank 0: 3 of 4 right; rank 1: 1 of 3 and no `count` question. Both ranks must
    report the one-process figures (4/7, count 2/3), not the mean of 3/4 and 1/3."""
    single = AccuracyByType(TYPES)
    update(single, PREDICTIONS)
    want = {k: float(v) for k, v in single.compute().items()}
    want_counts = single.counts()

    results = run_gloo(worker)
    for rank in (0, 1):
        values, counts = results[rank]
        assert values == pytest.approx(want), rank
        assert counts == want_counts, rank
    naive = (3 / 4 + 1 / 3) / 2
    assert naive != pytest.approx(want["accuracy"])  # the test can tell them apart
