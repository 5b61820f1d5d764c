"""Embedding store: float16 memory-mapped feature files, read in chunks.

Features of a CLIP are L2-normalised, so float16 (3 significant digits) loses nothing k-means can see,
and halves disk and page cache against float32: 1M pairs x 512 x 2 modalities is 2 GB instead of 4 GB.
Readers never hold the whole matrix in float32: they convert one chunk at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

DTYPE = np.float16
CHUNK = 65_536


def chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def open_memmap(path: str | Path, rows: int, dim: int, mode: str, dtype=DTYPE) -> np.memmap:
    """A (rows, dim) memmap; mode 'w+' creates, 'r+'/'r' reopen (at least one row: numpy refuses 0)."""
    return np.memmap(path, dtype=dtype, mode=mode, shape=(max(rows, 1), dim))


def read_chunks(x: np.ndarray, size: int = CHUNK, rows: np.ndarray | None = None,
                dtype=np.float32) -> Iterator[tuple[slice, np.ndarray]]:
    """(output slice, float32 chunk) over `x` (or over `x[rows]`), never converting more than `size` rows."""
    n = len(x) if rows is None else len(rows)
    for sl in chunks(n, size):
        part = x[sl] if rows is None else x[rows[sl]]
        yield sl, np.asarray(part, dtype=dtype)


def normalised(parts: list[np.ndarray], directions: list[np.ndarray | None] | None = None,
               size: int = CHUNK) -> np.ndarray:
    """float16 [l2(parts[0]) | l2(parts[1]) | ...], each part optionally with the span of its `directions`
    rows projected out (then re-normalised); built chunkwise, so the only full copy is this float16 one."""
    n = len(parts[0])
    dims = [p.shape[1] for p in parts]
    out = np.empty((n, sum(dims)), dtype=DTYPE)
    qs = [None if d is None else np.linalg.qr(np.asarray(d, dtype=np.float64).T)[0].astype(np.float32)
          for d in (directions or [None] * len(parts))]
    for sl in chunks(n, size):
        col = 0
        for p, q, d in zip(parts, qs, dims):
            x = l2(np.asarray(p[sl], dtype=np.float32))
            if q is not None:
                x = l2(x - (x @ q) @ q.T)
            out[sl, col:col + d] = x
            col += d
    return out


def l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
