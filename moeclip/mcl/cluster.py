"""k-means on each modality, joint labels, accumulation across stages, and small-group merging.

Group ids are renumbered densely after accumulation (the partition is what matters), so any
number of stages fits in int64. Small groups are merged into their nearest neighbour by centroid
instead of being dropped, as the published code did: no sample is lost (`moeclip.mcl.merge`).
k-means is today's full KMeans on small corpora (the shipped default included) and hierarchical
MiniBatchKMeans at corpus scale (`kmeans_path`): sklearn's, not faiss, which fitted a leaf 1.7x faster here
but is not a dependency and would make the clusters depend on what is installed (docs/benchmarks.md 4.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import normalized_mutual_info_score
from threadpoolctl import threadpool_limits

from moeclip.mcl.merge import merge_small_groups, one_at_a_time
from moeclip.mcl.store import Normalised, l2, read_chunks


@dataclass
class StageClusters:
    image_labels: np.ndarray
    text_labels: np.ndarray
    joint: np.ndarray            # t * k_img + i
    accumulated: np.ndarray      # dense ids of (previous accumulated, joint)
    groups: np.ndarray           # accumulated after merging small groups: what the sampler uses
    image_centroids: np.ndarray
    text_centroids: np.ndarray
    merges: int


BRANCH = 64                 # most clusters one k-means fit makes in the sampled and hierarchical paths
FULL_KMEANS_ROWS = 100_000  # full KMeans on every row only up to this many rows...
FULL_KMEANS_WORK = FULL_KMEANS_ROWS * BRANCH  # ...and this much N x k: the largest flat fit the code ran before
# Small groups merge one at a time among all groups (as MCL always did) up to this many accumulated groups:
# O(groups^2 x dim), ~20 s at 4k groups x 1,024-d, and the default corpus makes at most 78^2 = 6,084. Above
# it, in passes within their previous-stage group (stage 2 at 1M pairs has ~70k groups: hours one at a time).
MERGE_GLOBAL_GROUPS = 8_192


def kmeans_path(n: int, k: int) -> str:
    """Which k-means `kmeans` runs for n rows and k clusters.

    'full': sklearn KMeans on every row, n_init 3, the algorithm MCL has always used on small corpora; kept
    wherever N <= 100k and N x k <= 100k x 64 (the most work a flat fit did before), which includes the
    shipped default corpus (20,000 pairs, k = 78: 1.6M) so its clusters do not change with corpus-scale
    code. Its cost is ~N x k x dim x iterations x 3, so past that it would take minutes to hours:
    'sampled' (k <= 64: MiniBatchKMeans on a sample, then every row assigned) or 'hierarchical'."""
    if n <= FULL_KMEANS_ROWS and n * k <= FULL_KMEANS_WORK:
        return "full"
    return "sampled" if k <= BRANCH else "hierarchical"


def kmeans(features: np.ndarray, k: int, seed: int, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and centroids of the L2-normalised rows of `features` (float16, a memmap or a `Normalised`
    view: read in chunks except on the 'full' path, whose N x dim float32 copy is at most 100k rows).

    Paths by `kmeans_path` unless `path` names one. 'hierarchical' (MCL's k = N / group_size on a large corpus):
    MiniBatchKMeans into b = min(64, ceil(sqrt(k))) clusters, k shared among them by size, and each split again
    until k <= 64. Every row is assigned to the nearest centroid of each level once, so the cost is about N x
    dim x (b per level x levels) instead of N x dim x k: ~N^1.5 while two levels suffice (k <= 4096), N log N
    beyond. Deterministic for a seed (every fit has a seed derived from it and the cluster's path).
    """
    n = len(features)
    if n < k:
        raise ValueError(f"cannot make {k} clusters from {n} samples; lower k_img/k_txt")
    path = path or kmeans_path(n, k)
    if path == "full":
        km = KMeans(n_clusters=k, init="k-means++", random_state=seed, n_init=3)
        labels = km.fit_predict(l2(features[:]))
        return labels.astype(np.int64), km.cluster_centers_.astype(np.float32)
    labels = np.empty(n, dtype=np.int64)
    cents: list[np.ndarray] = []
    if (path == "sampled") != (k <= BRANCH):
        raise ValueError(f"k-means path {path!r} needs k {'<=' if path == 'sampled' else '>'} {BRANCH}, got {k}")
    _split(features, np.arange(n), k, seed, labels, cents, flat=path == "sampled")
    return labels, np.concatenate(cents).astype(np.float32)


def _split(x: np.ndarray, rows: np.ndarray, k: int, seed: int, labels: np.ndarray, cents: list[np.ndarray],
           flat: bool) -> None:
    if k <= BRANCH:
        c = _fit(x, rows, k, seed, flat)
        labels[rows] = _assign(x, rows, c) + sum(len(a) for a in cents)
        cents.append(c)
        return
    b = min(BRANCH, int(np.ceil(np.sqrt(k))))
    coarse = _assign(x, rows, _fit(x, rows, b, seed, flat))
    sizes = np.bincount(coarse, minlength=b)
    ks = _share(k, sizes)
    order = np.argsort(coarse, kind="stable")
    bounds = np.r_[0, np.cumsum(sizes)]
    for c in range(b):
        if ks[c]:
            _split(x, rows[order[bounds[c]:bounds[c + 1]]], int(ks[c]), (seed * 1_000_003 + 7919 * (c + 1)) % 2**31,
                   labels, cents, flat)


def _share(k: int, sizes: np.ndarray) -> np.ndarray:
    """k split over clusters in proportion to their sizes (largest remainder), >= 1 and <= size each."""
    ks = np.minimum(np.maximum(np.floor(k * sizes / sizes.sum()).astype(np.int64), (sizes > 0).astype(np.int64)), sizes)
    rem = k * sizes / sizes.sum() - ks
    while ks.sum() < k:
        room = np.flatnonzero(ks < sizes)
        ks[room[np.argmax(rem[room])]] += 1
        rem[room[np.argmax(rem[room])]] -= 1
    while ks.sum() > k:
        over = np.flatnonzero(ks > 1)
        ks[over[np.argmin(rem[over])]] -= 1
        rem[over[np.argmin(rem[over])]] += 1
    return ks


def _fit(x: np.ndarray, rows: np.ndarray, k: int, seed: int, flat: bool = True) -> np.ndarray:
    """Centroids from a seeded sample of `rows` (all of them if few): 128 rows per cluster (at least 32k for
    a flat k-means); every row is assigned afterwards by `_assign`. Inside the hierarchy, early stopping after
    3 mini-batches without improvement (10 for a flat fit): 0.1% more inertia, a third less time."""
    if k == 1:
        return _mean(x, rows)
    take = min(len(rows), max(128 * k, 32_768) if flat else 128 * k)
    sample = np.sort(np.random.default_rng(seed).choice(rows, take, replace=False)) if take < len(rows) else rows
    # one k-means++ start per fit inside the hierarchy (it makes ~k/64 + 1 fits; 3 starts cost ~3x the
    # fit time), three for a flat k-means as before
    # k-means++ on 16 rows per cluster (init_size), not sklearn's default 3 x 4,096: it was half of each
    # fit's time (sklearn computes its float32 distances in float64 chunks) for 0.2% more inertia
    km = MiniBatchKMeans(n_clusters=k, init="k-means++", random_state=seed, batch_size=4096,
                         n_init=3 if flat else 1, max_no_improvement=10 if flat else 3, init_size=16 * k)
    # one thread: these fits are small (<= 64 clusters, batches of 4,096), and on this 2-core shared machine
    # sklearn's two OpenMP threads spin-wait: measured 2.9 s with one thread against 12-36 s with two
    # for the same 62-cluster fit of 16k x 1024 rows; the large matmuls (`_assign`) keep every thread
    with threadpool_limits(1):
        km.fit(l2(x[sample]))
    return km.cluster_centers_.astype(np.float32)


def _mean(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    total = np.zeros(x.shape[1])
    for _, part in read_chunks(x, rows=rows):
        total += l2(part).sum(0, dtype=np.float64)
    return (total / len(rows))[None].astype(np.float32)


def _assign(x: np.ndarray, rows: np.ndarray, cents: np.ndarray) -> np.ndarray:
    """Nearest centroid of each row (float32 chunks; ties to the lowest index)."""
    out = np.empty(len(rows), dtype=np.int64)
    half = 0.5 * (cents.astype(np.float32) ** 2).sum(1)
    for sl, part in read_chunks(x, rows=rows):
        out[sl] = np.argmax(l2(part) @ cents.T - half, axis=1)
    return out


def accumulate(previous: np.ndarray | None, joint: np.ndarray) -> np.ndarray:
    """Dense ids of the pair (previous group, this stage's joint label): `acc * K + label`, renumbered."""
    if previous is None:
        return np.unique(joint, return_inverse=True)[1].astype(np.int64)
    key = previous.astype(np.int64) * (int(joint.max()) + 1) + joint
    return np.unique(key, return_inverse=True)[1].astype(np.int64)


def merge_stage(accumulated: np.ndarray, features: np.ndarray, min_group: int,
                previous_groups: np.ndarray | None) -> tuple[np.ndarray, int]:
    """A stage's small-group merging: up to MERGE_GLOBAL_GROUPS accumulated groups as MCL always merged (one
    at a time among all groups: small corpora, the shipped default included, keep their groups), above it in
    vectorised passes, first within the previous stage's groups (`merge.merge_small_groups`)."""
    if len(accumulated) and accumulated.max() + 1 <= MERGE_GLOBAL_GROUPS:
        return one_at_a_time(accumulated, features, min_group)
    return merge_small_groups(accumulated, features, min_group, within=previous_groups)


def cluster_stage(image_features: np.ndarray, text_features: np.ndarray, previous: np.ndarray | None,
                  k_img: int, k_txt: int, min_group: int, seed: int, features: str = "separate",
                  project_out: tuple[np.ndarray, np.ndarray] | None = None,
                  previous_groups: np.ndarray | None = None) -> StageClusters:
    """One stage's clustering.

    features="separate" is the published recipe (k-means per modality, joint label t * k_img + i);
    "joint" clusters the concatenated image+text features into k_img * k_txt clusters (joint label
    = cluster id; the per-modality labels are then that id too). `project_out` = (image, text)
    directions to remove first, e.g. the previous stage's centroids, so the stage cannot simply
    re-find the partition it already used. Inputs may be float16 memmaps: rows are normalised when read
    (`store.Normalised`), so no second copy of the features is made. `previous_groups` (the previous
    stage's merged groups) makes small groups merge among groups of the same previous group first, once
    there are more than `MERGE_GLOBAL_GROUPS` groups (`merge_stage`).
    """
    dirs = list(project_out) if project_out is not None else [None, None]
    img, txt = Normalised([image_features], dirs[:1]), Normalised([text_features], dirs[1:])
    both = Normalised([image_features, text_features], dirs)
    if features == "separate":
        il, ic = kmeans(img, k_img, seed)
        tl, tc = kmeans(txt, k_txt, seed + 1)
        joint = tl * k_img + il
    elif features == "joint":
        joint, cents = kmeans(both, k_img * k_txt, seed)
        il, tl = joint, joint
        ic, tc = cents[:, :img.shape[1]], cents[:, img.shape[1]:]
    else:
        raise ValueError(f"mcl.cluster_features must be 'separate' or 'joint', got {features!r}")
    acc = accumulate(previous, joint)
    groups, merges = merge_stage(acc, both, min_group, previous_groups if previous is not None else None)
    return StageClusters(il, tl, joint, acc, groups, ic, tc, merges)


def alignment(labels: np.ndarray, columns: dict[str, list[str]]) -> dict[str, float]:
    """Normalised mutual information of a labelling with each factor column: what the clusters follow."""
    return {name: round(float(normalized_mutual_info_score(values, labels)), 4) for name, values in columns.items()}


def group_sizes(labels: np.ndarray) -> list[int]:
    return sorted(np.bincount(labels).tolist(), reverse=True)
