"""One DataLoader per training run, over every epoch's micro-batches from the resume step on.

A loader per epoch restarted its workers (and their image caches) at every epoch boundary; here workers
start once, persist across epochs, and on a GPU hand over pinned batches. The batch order is the sampler's,
so it is the same whatever the worker count, and a resumed run skips the steps it has done without reading
them.
"""
from __future__ import annotations

from typing import Iterator

import torch

from moeclip.data.dataset import CaptionDataset, Collate
from moeclip.data.sampler import GroupBatchSampler


class RunBatches:
    """This rank's micro-batches for global steps [start, stop), epoch after epoch (a DataLoader batch_sampler)."""

    def __init__(self, sampler: GroupBatchSampler, start: int, stop: int) -> None:
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        spe = self.sampler.steps_per_epoch()
        step = self.start
        while step < self.stop:
            epoch, first = divmod(step, spe)
            for global_batch in self.sampler.global_batches(epoch)[first:]:
                if step >= self.stop:
                    return
                yield from self.sampler.rank_micro_batches(global_batch)
                step += 1

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.sampler.grad_accum


def run_loader(dataset: CaptionDataset, sampler: GroupBatchSampler, start: int, stop: int, collate: Collate,
               num_workers: int, pin_memory: bool, prefetch_factor: int | None) -> Iterator[dict]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=RunBatches(sampler, start, stop), collate_fn=collate, num_workers=num_workers,
        pin_memory=pin_memory, prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=False)  # one pass over the whole run: the workers live as long as it does
    return iter(loader)
