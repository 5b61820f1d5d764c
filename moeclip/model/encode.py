"""Batched, no-grad encoding of image datasets and caption lists into L2-normalised features.

Shared by MCL's embedding pass, evaluation and search, so every consumer sees the same features.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from moeclip.data.dataset import CaptionDataset, Collate, record_skips


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 512,
                 device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="encode text", disable=not progress, leave=False):
        tok = tokenizer(list(texts[i:i + batch_size])).to(device)
        out.append(model.encode_text(tok, normalize=True).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def iter_image_batches(model: nn.Module, dataset: CaptionDataset, indices: Sequence[int], batch_size: int = 256,
                       device: str | torch.device = "cpu", num_workers: int = 0, progress: bool = True,
                       desc: str = "encode images") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (row indices that loaded, their normalised image features) batch by batch; skips are recorded."""
    batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=Collate(None),
                                         num_workers=num_workers)
    for batch in tqdm(loader, total=len(batches), desc=desc, disable=not progress, leave=False):
        record_skips(batch, dataset.skips)
        if "image" not in batch:
            continue
        yield batch["index"], model.encode_image(batch["image"].to(device), normalize=True).float().cpu()


def unique_first(values: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Unique values in first-seen order, the row of each one's first occurrence, and each row's unique id."""
    index: dict[str, int] = {}
    first, inverse = [], np.empty(len(values), dtype=np.int64)
    for row, v in enumerate(values):
        if v not in index:
            index[v] = len(index)
            first.append(row)
        inverse[row] = index[v]
    return list(index), np.asarray(first, dtype=np.int64), inverse
