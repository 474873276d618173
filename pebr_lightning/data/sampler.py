"""Training order that does not depend on the number of processes.

Lightning gives each process a `DistributedSampler`, which deals a shuffled index
list out round-robin: the global batch at step k then depends on the world size,
and a 2-process run trains on different batches than a 1-process run. Here one
permutation per epoch (seeded by seed + epoch) is cut into global batches of
`batch_size x world_size` indices, and process r takes the r-th slice of each:
the union of what all processes train on at step k is the same for any world
size, so runs at different scales (and their tests) compare step for step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


def global_batch_order(
    n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool
) -> list[int]:
    """The indices process `rank` reads in an epoch, batch after batch.

    Only whole global batches are used (the remainder, n mod batch_size x world_size,
    is dropped), so every process runs the same number of steps.
    """
    order = (
        torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        if shuffle
        else list(range(n))
    )
    global_batch = batch_size * world_size
    picked: list[int] = []
    for start in range(0, n - global_batch + 1, global_batch):
        first = start + rank * batch_size
        picked += order[first : first + batch_size]
    return picked


class GlobalOrderSampler(DistributedSampler):
    """A DistributedSampler (so Lightning keeps it as it is) dealing global batches.

    Lightning calls `set_epoch` before each epoch. A run resumed mid-epoch passes
    `resume_epoch` and `resume_batches`: that epoch then starts after the batches
    already trained on, and its length stays the full epoch's, which Lightning's
    restored batch counter completes.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        resume_epoch: int | None = None,
        resume_batches: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.num_samples = len(dataset) // (batch_size * world_size) * batch_size
        self.total_size = self.num_samples * world_size
        self.resume_epoch = resume_epoch
        self.resume_batches = resume_batches

    def __iter__(self) -> Iterator[int]:
        order = global_batch_order(
            len(self.dataset),
            self.batch_size,
            self.rank,
            self.num_replicas,
            self.seed,
            self.epoch,
            self.shuffle,
        )
        if self.epoch == self.resume_epoch:
            order = order[self.resume_batches * self.batch_size :]
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples
