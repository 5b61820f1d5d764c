"""Batched, no-grad encoding of image datasets and caption lists into L2-normalised fp32 features.

Shared by MCL's embedding pass, evaluation and search, so every consumer sees the same features.
Runs on the runtime's device under its autocast; features come back on the CPU in fp32.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from moeclip.data.dataset import CaptionDataset, Collate, record_skips
from moeclip.runtime import Runtime


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 512,
                 runtime: Runtime | None = None, progress: bool = False) -> torch.Tensor:
    rt = runtime or Runtime.local()
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="encode text", disable=not progress, leave=False):
        tok = tokenizer(list(texts[i:i + batch_size])).to(rt.device)
        with rt.autocast():
            out.append(model.encode_text(tok, normalize=True).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def iter_image_batches(model: nn.Module, dataset: CaptionDataset, indices: Sequence[int], batch_size: int = 256,
                       runtime: Runtime | None = None, num_workers: int = 0, progress: bool = True,
                       desc: str = "encode images") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (row indices that loaded, their normalised image features) batch by batch; skips are recorded."""
    rt = runtime or Runtime.local()
    batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=Collate(None),
                                         num_workers=num_workers, pin_memory=rt.device.type == "cuda")
    for batch in tqdm(loader, total=len(batches), desc=desc, disable=not progress, leave=False):
        record_skips(batch, dataset.skips)
        if "image" not in batch:
            continue
        with rt.autocast():
            feats = model.encode_image(batch["image"].to(rt.device, non_blocking=True), normalize=True)
        yield batch["index"], feats.float().cpu()


def encode_image_rows(model: nn.Module, dataset: CaptionDataset, rows: Sequence[int], batch_size: int,
                      runtime: Runtime, num_workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `rows` in order ([len(rows), d], zeros where the image failed) and the loaded mask."""
    position = {int(r): i for i, r in enumerate(rows)}
    feats: torch.Tensor | None = None
    ok = torch.zeros(len(rows), dtype=torch.bool)
    for idx, f in iter_image_batches(model, dataset, rows, batch_size, runtime, num_workers, progress):
        if feats is None:
            feats = torch.zeros(len(rows), f.shape[1])
        where = torch.as_tensor([position[int(i)] for i in idx])
        feats[where] = f
        ok[where] = True
    if feats is None:
        feats = torch.zeros(len(rows), output_dim(model, runtime))
    return feats, ok


def sharded_image_features(model: nn.Module, dataset: CaptionDataset, rows: Sequence[int], batch_size: int,
                           runtime: Runtime, num_workers: int = 0, progress: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_image_rows` split over the runtime's ranks and gathered: every rank gets all rows, in order."""
    part = runtime.shard(len(rows))
    feats, ok = encode_image_rows(model, dataset, [rows[i] for i in part], batch_size, runtime, num_workers,
                                  progress)
    return runtime.gather_rows(feats), runtime.gather_rows(ok)


def sharded_text_features(model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int,
                          runtime: Runtime, progress: bool = False) -> torch.Tensor:
    part = runtime.shard(len(texts))
    feats = encode_texts(model, tokenizer, [texts[i] for i in part], batch_size, runtime, progress)
    if feats.numel() == 0:
        feats = torch.zeros(0, output_dim(model, runtime))
    return runtime.gather_rows(feats)


@torch.no_grad()
def output_dim(model: nn.Module, runtime: Runtime) -> int:
    """Embedding width, by encoding one token (works for any open_clip tower)."""
    tok = torch.zeros(1, getattr(model, "context_length", 77) or 77, dtype=torch.long, device=runtime.device)
    with runtime.autocast():
        return int(model.encode_text(tok).shape[-1])


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
