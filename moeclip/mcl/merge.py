"""Merging groups smaller than a global batch into their nearest neighbour: one at a time, or in vectorised passes.

MCL's merge (`one_at_a_time`: smallest first, centroids recomputed after every merge) is O(groups^2 x dim)
per merge, which at 23k groups (50k pairs, stage 2) ran for over 11 minutes; it stays for small problems
(`moeclip.mcl.cluster.merge_stage`), so their groups do not change. `merge_small_groups` is the scalable
one: a
pass finds the nearest live centroid of *every* small group at once (one matmul per block of small
groups) and applies a conflict-free subset of those merges together; passes repeat until no small group
is left. Rules, in this order:

- a group is small if its count < min_size; small groups are visited by (count, id) ascending, the
  order the one-at-a-time merge used;
- the nearest neighbour is the live group with the smallest squared Euclidean distance between
  centroids (float64, from float32 sums), itself excluded; ties go to the lowest group id;
- `within` (optional, one label per sample) restricts neighbours to groups with the same `within`
  label (every group must lie inside one); groups whose whole block is still small afterwards are
  then merged without the restriction;
- in one pass a small group s merging into t is applied unless s already received a merge in this
  pass, t was already merged away in this pass, or t was small at the start of the pass and has
  already reached min_size in it (then s waits for the next pass, with fresh centroids). So each pass
  is a set of stars, every merge uses centroids from the start of its pass, and a star around a small
  group stops growing once it is large enough (otherwise, where every group is small - the default
  recipe's stage 1, k = N / 256 with min size 1,024 - one pass gathers dozens of groups into one).

This equals the one-at-a-time merge whenever no small group's nearest neighbour changes because of an
earlier merge of the same pass (true on the tests' inputs; `tests/mcl/test_group_merge.py` checks it against
`one_at_a_time`); in general the two can differ where the old order would have moved a centroid first
(on 20,000 synthetic pairs at k = 78, stage 2, one at a time ends with one group, the passes with six).
"""
from __future__ import annotations

import numpy as np
from scipy import sparse

from moeclip.mcl.store import CHUNK, read_chunks


def group_sums(labels: np.ndarray, features: np.ndarray, n: int, chunk: int = CHUNK,
               dtype=np.float32) -> np.ndarray:
    """Per-group feature sums, read from `features` (float16, a memmap or a `Normalised` view) in chunks;
    each chunk is summed by a sparse one-hot matmul (scipy: ~20x faster here than np.add.reduceat along
    rows). float32 by default: at 142k groups x 1,024-d (stage 3 at 1M pairs) float64 sums alone were
    1.2 GB; distances are then taken in float64 (`_nearest`)."""
    sums = np.zeros((n, features.shape[1]), dtype=dtype)
    for sl, part in read_chunks(features, chunk, dtype=dtype):
        keys, inv = np.unique(labels[sl], return_inverse=True)
        onehot = sparse.csr_matrix((np.ones(len(inv), dtype=dtype), (inv, np.arange(len(inv)))),
                                   shape=(len(keys), len(inv)))
        sums[keys] += onehot @ part
    return sums


def one_at_a_time(labels: np.ndarray, features: np.ndarray, min_size: int,
                  rows: int = 512) -> tuple[np.ndarray, int]:
    """MCL's original merge: the smallest group below `min_size` merges into the group with the nearest
    centroid, repeatedly; dense group ids and the number of merges. Unchanged but for two costs: the float64
    sums come from `group_sums` (chunked, summed in another order: ~1e-16 apart) instead of np.add.at over
    all rows (5 s at 100k x 1,024), and each merge's distances are taken `rows` live groups at a time (the
    same per-row values without a fresh groups x dim array per merge)."""
    labels = np.unique(labels, return_inverse=True)[1]
    n = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    sums = group_sums(labels, features, n, dtype=np.float64)
    target = np.arange(n)  # where each original group ended up
    alive = np.ones(n, dtype=bool)
    merges = 0
    while alive.sum() > 1:
        live = np.flatnonzero(alive)
        small = live[np.argmin(counts[live])]
        if counts[small] >= min_size:
            break
        q = sums[small] / counts[small]
        d = np.concatenate([((sums[b] / counts[b, None] - q) ** 2).sum(1)
                            for b in np.split(live, range(rows, len(live), rows))])
        d[live == small] = np.inf
        into = live[np.argmin(d)]
        sums[into] += sums[small]
        counts[into] += counts[small]
        alive[small] = False
        target[target == small] = into
        merges += 1
    return np.unique(target[labels], return_inverse=True)[1].astype(np.int64), merges


def merge_small_groups(labels: np.ndarray, features: np.ndarray, min_size: int,
                       within: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Dense group ids after merging every group below `min_size` (unless only one is left), and the number
    of merges. `features` may be float16 or a memmap: it is read once, in chunks, for group sums."""
    labels = np.unique(labels, return_inverse=True)[1].astype(np.int64)
    n = int(labels.max()) + 1 if len(labels) else 0
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    sums = group_sums(labels, features, n)
    parent = np.arange(n)
    alive = np.ones(n, dtype=bool)
    merges = 0
    if within is not None:
        block = np.zeros(n, dtype=np.int64)
        block[labels] = np.asarray(within, dtype=np.int64)
        merges += _passes(sums, counts, alive, parent, min_size, block)
    merges += _passes(sums, counts, alive, parent, min_size, None)
    root = _roots(parent)
    return np.unique(root[labels], return_inverse=True)[1].astype(np.int64), merges


def _passes(sums, counts, alive, parent, min_size: int, block: np.ndarray | None) -> int:
    merges = 0
    while True:
        live = np.flatnonzero(alive)
        if len(live) <= 1:
            return merges
        small = live[counts[live] < min_size]
        if not len(small):
            return merges
        small = small[np.lexsort((small, counts[small]))]   # (count, id) ascending
        if block is None:
            into = _nearest(sums, counts, small, live)
        else:
            into = np.full(len(small), -1)
            bl, bs = block[live], block[small]
            for b in np.unique(bs):
                cand, mine = live[bl == b], np.flatnonzero(bs == b)
                if len(cand) > 1:
                    into[mine] = _nearest(sums, counts, small[mine], cand)
        done = _apply(small, into, sums, counts, alive, parent, min_size)
        if not done:
            return merges
        merges += done


def _nearest(sums: np.ndarray, counts: np.ndarray, query: np.ndarray, cand: np.ndarray,
             rows: int = 1024) -> np.ndarray:
    """For each query group, the candidate group (ids ascending) with the nearest centroid, itself excluded;
    ties to the lowest id (argmin takes the first). Squared distances up to a per-query constant,
    |c|^2 - 2 q.c, in float64 on centroids centred on the candidates' mean. (float32 would halve the matmul
    but flipped a merge of tests/mcl/test_group_merge.py's planted input, whose centroids lie ~350 apart and
    ~0.5 from their neighbours.)"""
    cents = sums[cand] / counts[cand, None]
    mu = cents.mean(0)
    cents = cents - mu
    sq = np.einsum("ij,ij->i", cents, cents)
    out = np.empty(len(query), dtype=np.int64)
    pos = np.searchsorted(cand, query)
    for i in range(0, len(query), rows):
        q = sums[query[i:i + rows]] / counts[query[i:i + rows], None] - mu
        d = sq[None, :] - 2.0 * (q @ cents.T)
        d[np.arange(len(q)), pos[i:i + rows]] = np.inf
        out[i:i + rows] = cand[np.argmin(d, axis=1)]
    return out


def _apply(small: np.ndarray, into: np.ndarray, sums, counts, alive, parent, min_size: int) -> int:
    """Apply, in `small`'s order, every merge whose source has not received one and whose target has not
    been merged away in this pass; a target that was small at the start of the pass takes merges only until
    it reaches min_size (as in the one-at-a-time order, where it would then stop being merged into by
    groups that have a nearer neighbour after its centroid moved; this keeps groups near min_size
    instead of gathering every small neighbour into one star)."""
    received = np.zeros(len(alive), dtype=bool)
    gone = np.zeros(len(alive), dtype=bool)
    size = counts.copy()
    src, dst = [], []
    for s, t in zip(small.tolist(), into.tolist()):
        if t < 0 or received[s] or gone[t] or (counts[t] < min_size <= size[t]):
            continue
        received[t] = True
        gone[s] = True
        size[t] += size[s]
        src.append(s); dst.append(t)
    if not src:
        return 0
    src, dst = np.array(src), np.array(dst)
    np.add.at(sums, dst, sums[src])
    np.add.at(counts, dst, counts[src])
    alive[src] = False
    parent[src] = dst
    return len(src)


def _roots(parent: np.ndarray) -> np.ndarray:
    """Follow merge pointers to the surviving group (pointer jumping)."""
    root = parent.copy()
    while True:
        nxt = root[root]
        if (nxt == root).all():
            return root
        root = nxt
