"""Sample lists kept as columns of packed strings instead of one Python dict per row.

A list of dicts costs ~1 KB of Python objects per row (10 GB at 10M rows), copied into every process and,
through reference counts touching every page, into every DataLoader worker. Here each column is one UTF-8
byte buffer plus an offsets array: ~the text's own size, and two numpy arrays that forked workers share
untouched. `rows[i]` still reads as a dict, so code written for a list of dicts keeps working (read-only).
"""
from __future__ import annotations

from array import array
from typing import Iterable, Iterator, Mapping, Sequence, overload

import numpy as np


class StringColumn(Sequence[str]):
    """Strings packed into one uint8 buffer; item i is `buf[offsets[i]:offsets[i+1]]` decoded."""

    def __init__(self, buf: np.ndarray, offsets: np.ndarray) -> None:
        self.buf, self.offsets = buf, offsets

    @classmethod
    def from_strings(cls, values: Iterable[str]) -> "StringColumn":
        builder = _ColumnBuilder()
        for v in values:
            builder.append(v)
        return builder.finish()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> "StringColumn": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        return self.buf[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

    def take(self, idx: np.ndarray) -> "StringColumn":
        """The column restricted to rows `idx`, in that order (a copy), gathered as bytes: no row is decoded,
        so a subset of millions of rows (a specialist's partition) costs numpy time, not a Python loop."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        starts, lengths = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return StringColumn(self.buf[positions], offsets)

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes + self.offsets.nbytes)


class _ColumnBuilder:
    """Appends into a bytearray + array('q'): no per-row Python object survives the append."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.offsets = array("q", [0])

    def append(self, value: str) -> None:
        self.data += value.encode("utf-8")
        self.offsets.append(len(self.data))

    def finish(self) -> StringColumn:
        # views, not copies: the builder's buffers become the column's
        return StringColumn(np.frombuffer(self.data, dtype=np.uint8), np.frombuffer(self.offsets, dtype=np.int64))


class Rows(Sequence[Mapping[str, str]]):
    """A table of string columns; `rows[i]` is a fresh dict of row i, `rows.column(name)` one column."""

    def __init__(self, columns: dict[str, StringColumn]) -> None:
        lengths = {len(c) for c in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths: { {k: len(c) for k, c in columns.items()} }")
        self.columns = columns
        self._len = lengths.pop() if lengths else 0

    @classmethod
    def from_dicts(cls, rows: Iterable[Mapping[str, str]], names: Sequence[str] | None = None) -> "Rows":
        """Columns `names` of `rows`, read once; a missing key is ''. Default names: every key of a list's
        rows; for a stream (CSV reader), the first row's keys, and a later row with another key is an error."""
        if names is None and isinstance(rows, list):
            names = list(dict.fromkeys(k for row in rows for k in row))
        builders: dict[str, _ColumnBuilder] | None = None
        if names is not None:
            builders = {k: _ColumnBuilder() for k in names}
        for row in rows:
            if builders is None:
                builders = {k: _ColumnBuilder() for k in row}
            if names is None and row.keys() != builders.keys():
                raise ValueError(f"row keys {sorted(row)} differ from the first row's {sorted(builders)}")
            for k, b in builders.items():
                v = row.get(k)
                b.append("" if v is None else str(v))
        return cls({k: b.finish() for k, b in (builders or {}).items()})

    def __len__(self) -> int:
        return self._len

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def column(self, name: str) -> StringColumn:
        return self.columns[name]

    @overload
    def __getitem__(self, i: int) -> dict[str, str]: ...
    @overload
    def __getitem__(self, i: slice) -> "Rows": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(self._len)[i])
        return {k: c[i] for k, c in self.columns.items()}

    def __iter__(self) -> Iterator[dict[str, str]]:
        for i in range(self._len):
            yield self[i]

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows({k: c.take(idx) for k, c in self.columns.items()})

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.columns.values())
