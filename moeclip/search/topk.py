"""Exact top-k over an on-disk embedding matrix, one chunk of rows at a time.

A million 512-d float16 embeddings are 1 GB; scoring them chunk by chunk keeps memory at
`chunk_rows x dim` floats plus a running [queries, k] best list, whatever the index size.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def chunked_topk(embeddings: Any, queries: torch.Tensor, k: int, chunk_rows: int = 32768,
                 count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and row ids [Q, min(k, count)] of the best rows by dot product, best first.

    embeddings: [N, D] rows with `.shape` and contiguous slicing (an array, a memmap, or `NpyRows`);
        only rows < `count` are searched.
    queries: [Q, D] (L2-normalised, so scores are cosine similarities).
    """
    n = embeddings.shape[0] if count is None else min(count, embeddings.shape[0])
    if queries.dim() == 1:
        queries = queries[None]
    if queries.shape[1] != embeddings.shape[1]:
        raise ValueError(f"queries have dim {queries.shape[1]}, the index has dim {embeddings.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    q = queries.detach().float().cpu()
    k = min(k, n)
    best_scores = torch.empty(q.shape[0], 0)
    best_ids = torch.empty(q.shape[0], 0, dtype=torch.long)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        chunk = torch.from_numpy(np.asarray(embeddings[start:stop], dtype=np.float32))
        scores = q @ chunk.t()
        top = scores.topk(min(k, stop - start), dim=1)
        # merge this chunk's best with the running best; ties keep the lower row id first
        cand_scores = torch.cat([best_scores, top.values], dim=1)
        cand_ids = torch.cat([best_ids, top.indices + start], dim=1)
        keep = _stable_topk(cand_scores, cand_ids, k)
        best_scores = cand_scores.gather(1, keep)
        best_ids = cand_ids.gather(1, keep)
    return best_scores, best_ids


def _stable_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k best candidates, highest score first, lower row id first on ties."""
    order = torch.argsort(ids, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, order), dim=1, descending=True, stable=True)
    return order.gather(1, by_score)[:, :k]
