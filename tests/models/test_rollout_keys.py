"""Sampling keys of a group rollout."""

from __future__ import annotations

from pebr_lightning.models.rollout import group_keys


def test_keys_depend_on_sample_not_on_batch_neighbours():
    both = group_keys(0, 5, 0, ["a", "b"], 4)
    assert both.shape == (8,) and len(set(both.tolist())) == 8
    assert group_keys(0, 5, 0, ["b"], 4).tolist() == both[4:].tolist()
    assert (both >= 0).all() and (both < 2**32).all()


def test_keys_change_with_seed_step_and_attempt():
    base = group_keys(0, 5, 0, ["a"], 2).tolist()
    assert group_keys(1, 5, 0, ["a"], 2).tolist() != base
    assert group_keys(0, 6, 0, ["a"], 2).tolist() != base
    assert group_keys(0, 5, 1, ["a"], 2).tolist() != base
