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
        """Sample ids per group (views into one sorted array: O(N) in all)."""
        if self.labels is None:
            return [np.arange(self.num_samples)]
        order = np.argsort(self.labels, kind="stable")
        _, starts = np.unique(self.labels[order], return_index=True)
        return np.split(order, starts[1:])

    def global_batches(self, epoch: int) -> np.ndarray:
        """(steps, global_batch) sample ids, written into one preallocated array: steps x global_batch is
        N plus less than one batch of padding per group (<= 2N once groups are merged to >= a global batch)."""
        rng = np.random.default_rng([self.seed, epoch])
        groups = self.groups()
        out = np.empty((sum(-(-len(g) // self.global_batch) for g in groups), self.global_batch), dtype=np.int64)
        row = 0
        for members in groups:
            members = rng.permutation(members)
            steps = -(-len(members) // self.global_batch)
            flat = out[row:row + steps].reshape(-1)
            flat[:len(members)] = members
            short = len(flat) - len(members)
            if short:
                flat[len(members):] = rng.choice(members, size=short, replace=short > len(members))
            row += steps
        return out[rng.permutation(len(out))]

    def steps_per_epoch(self) -> int:
        if self.labels is None:
            return -(-self.num_samples // self.global_batch)
        return int((-(-np.unique(self.labels, return_counts=True)[1] // self.global_batch)).sum())

    def rank_micro_batches(self, global_batch: np.ndarray) -> list[list[int]]:
        """This rank's grad_accum micro-batches of one global batch (accumulation-major)."""
        chunks = global_batch.reshape(self.grad_accum, self.world_size, self.micro_batch)
        return [chunks[a, self.rank].tolist() for a in range(self.grad_accum)]
