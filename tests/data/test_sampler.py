"""Training order cut into global batches: the same data per step on any process count."""

from __future__ import annotations

import pytest

from pebr_lightning.data.sampler import GlobalOrderSampler, global_batch_order


def test_one_process_reads_the_permutation_in_whole_batches():
    order = global_batch_order(10, 3, rank=0, world_size=1, seed=0, epoch=0, shuffle=False)
    assert order == list(range(9))  # 3 batches of 3; the tenth record waits for next epoch


def test_processes_split_each_global_batch_in_rank_order():
    """16 records, batch 2 per process, 2 processes: global batch k = records 4k..4k+3;
    rank 0 takes the first two of each, rank 1 the last two."""
    r0 = global_batch_order(16, 2, rank=0, world_size=2, seed=0, epoch=0, shuffle=False)
    r1 = global_batch_order(16, 2, rank=1, world_size=2, seed=0, epoch=0, shuffle=False)
    assert r0 == [0, 1, 4, 5, 8, 9, 12, 13]
    assert r1 == [2, 3, 6, 7, 10, 11, 14, 15]


@pytest.mark.parametrize("world", [2, 4])
def test_union_of_a_step_is_the_one_process_batch(world):
    one = global_batch_order(50, 8, 0, 1, seed=3, epoch=1, shuffle=True)
    per_rank = [global_batch_order(50, 8 // world, r, world, 3, 1, True) for r in range(world)]
    b = 8 // world
    for step in range(len(one) // 8):
        union = [i for order in per_rank for i in order[step * b : (step + 1) * b]]
        assert union == one[step * 8 : (step + 1) * 8]


def test_epochs_reshuffle_and_seed_matters():
    first = global_batch_order(20, 4, 0, 1, seed=0, epoch=0, shuffle=True)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert global_batch_order(20, 4, 0, 1, seed=0, epoch=1, shuffle=True) != first
    assert global_batch_order(20, 4, 0, 1, seed=1, epoch=0, shuffle=True) != first
    assert global_batch_order(20, 4, 0, 1, seed=0, epoch=0, shuffle=True) == first


def test_sampler_follows_set_epoch_and_reports_its_length():
    dataset = list(range(21))
    sampler = GlobalOrderSampler(dataset, batch_size=2, rank=1, world_size=2, seed=5)
    assert len(sampler) == 10 and len(list(sampler)) == 10  # 5 global batches of 4
    before = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != before
    assert list(sampler) == global_batch_order(21, 2, 1, 2, 5, 1, True)
