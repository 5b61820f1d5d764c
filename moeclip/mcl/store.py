"""Embedding store: float16 memory-mapped feature files, read in chunks.

Features of a CLIP are L2-normalised, so float16 (3 significant digits) loses nothing k-means can see,
and halves disk and page cache against float32: 1M pairs x 512 x 2 modalities is 2 GB instead of 4 GB.
Readers never hold the whole matrix in float32: they convert one chunk at a time, and the normalised
[image | text] rows clustering works on are made per read (`Normalised`), never stored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

DTYPE = np.float16
CHUNK = 8_192   # rows per float32 chunk: 32 MB at 1,024-d, below glibc's mmap threshold cap, so
                # chunk buffers are reused instead of mapped and page-faulted afresh each time


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


class Normalised:
    """Rows of [l2(parts[0]) | l2(parts[1]) | ...], each part optionally with the span of its `directions`
    rows projected out (then re-normalised), made when they are read: `view[slice or index array]` is float32.

    Clustering reads the store a few times (k-means fits on samples, assignment, group sums), and making
    the rows per read costs less than holding them: a float16 copy of [image | text] at 1M pairs is 2 GB
    on top of the caller's features, a float32 one 4 GB."""

    def __init__(self, parts: list[np.ndarray], directions: list[np.ndarray | None] | None = None) -> None:
        self.parts = parts
        self.dims = [p.shape[1] for p in parts]
        self.shape = (len(parts[0]), sum(self.dims))
        # float64 as main computed it (x @ q then promotes): the projected rows equal its, chunk for chunk
        self.qs = [None if d is None else np.linalg.qr(np.asarray(d, dtype=np.float64).T)[0]
                   for d in (directions or [None] * len(parts))]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        pieces = []
        for p, q in zip(self.parts, self.qs):
            x = l2(p[rows])
            if q is not None:
                x = l2(x - (x @ q) @ q.T)
            pieces.append(x)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)


def l2(x: np.ndarray) -> np.ndarray:
    """Unit rows, a new float32 array. The norm is main's `np.linalg.norm` formula on purpose: k-means on
    weakly clustered rows is chaotic: a norm summed in another order (einsum) changed full KMeans's partition
    of 20,000 synthetic float32 pairs at k = 78 (the default's shape) against main's."""
    y = np.array(x, dtype=np.float32)
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return y
