"""Read rows of a 2-D .npy file on demand with plain file reads.

A memmap would do, but every page it touches counts toward the process's resident memory until the
kernel reclaims it; reading each chunk into a fresh buffer keeps a million-row search at
chunk-size memory however it is measured. The file itself stays a normal, memmap-able .npy.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class NpyRows:
    """Read-only row access to an [N, D] .npy file: `rows[i]`, `rows[a:b]`, `.shape`, `.dtype`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                major, _ = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if major == 1
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            except ValueError as e:
                raise ValueError(f"{self.path}: not a .npy file ({e}); rebuild the index") from None
            self.offset = f.tell()
        if fortran or len(shape) != 2 or dtype.hasobject:
            raise ValueError(f"{self.path}: expected a C-order 2-D numeric array, found shape {shape}")
        self.shape, self.dtype = tuple(shape), dtype
        self.ndim = 2
        self._row_bytes = shape[1] * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise IndexError("NpyRows supports contiguous slices only")
            return self._read(start, max(stop, start))
        i = int(key) + (self.shape[0] if int(key) < 0 else 0)
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"row {key} out of range for {self.shape[0]} rows")
        return self._read(i, i + 1)[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self._row_bytes)
            out = np.fromfile(f, dtype=self.dtype, count=(stop - start) * self.shape[1])
        if out.size != (stop - start) * self.shape[1]:
            raise ValueError(f"{self.path}: file is shorter than its header says; rebuild the index")
        return out.reshape(stop - start, self.shape[1])
