"""Batch sampling where every *global* batch comes from one group.

Used with one group (plain shuffled training) and with MCL's accumulated cluster labels. A global
batch is `world_size x grad_accum` micro-batches; every rank computes the same global batch list
from (seed, epoch) alone, so ranks agree without talking. Every sample appears at least once per
epoch; the last batch of a group is filled up with other samples *of that group* (drawn again),
never from another group, and nothing is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GroupBatchSampler:
    labels: np.ndarray | None  # group id per sample (None = one group)
    num_samples: int
    global_batch: int
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.global_batch % (self.world_size * self.grad_accum):
            raise ValueError(f"global batch {self.global_batch} must divide evenly into world_size "
                             f"{self.world_size} x grad_accum {self.grad_accum} micro-batches")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels)
            if len(self.labels) != self.num_samples:
                raise ValueError(f"{len(self.labels)} labels for {self.num_samples} samples")
        self.micro_batch = self.global_batch // (self.world_size * self.grad_accum)

    def groups(self) -> list[np.ndarray]:
        if self.labels is None:
            return [np.arange(self.num_samples)]
        order = np.argsort(self.labels, kind="stable")
        _, starts = np.unique(self.labels[order], return_index=True)
        return np.split(order, starts[1:])

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for members in self.groups():
            members = rng.permutation(members)
            short = (-len(members)) % self.global_batch
            if short:
                members = np.concatenate([members, rng.choice(members, size=short, replace=short > len(members))])
            batches.extend(members.reshape(-1, self.global_batch))
        return [batches[i] for i in rng.permutation(len(batches))]

    def steps_per_epoch(self) -> int:
        return sum(-(-len(g) // self.global_batch) for g in self.groups())

    def rank_micro_batches(self, global_batch: np.ndarray) -> list[list[int]]:
        """This rank's grad_accum micro-batches of one global batch (accumulation-major)."""
        chunks = global_batch.reshape(self.grad_accum, self.world_size, self.micro_batch)
        return [chunks[a, self.rank].tolist() for a in range(self.grad_accum)]
