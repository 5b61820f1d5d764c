"""k-means on each modality, joint labels, accumulation across stages, and small-group merging.

Group ids are renumbered densely after accumulation (the partition is what matters), so any
number of stages fits in int64. Small groups are merged into their nearest neighbour by centroid
instead of being dropped, as the published code did: no sample is lost.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import normalized_mutual_info_score


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


def kmeans(features: np.ndarray, k: int, seed: int, minibatch_above: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """Labels and centroids; MiniBatchKMeans (k-means++ init) for large N, full KMeans below."""
    x = _l2(features)
    if len(x) < k:
        raise ValueError(f"cannot make {k} clusters from {len(x)} samples; lower k_img/k_txt")
    if len(x) > minibatch_above:
        km = MiniBatchKMeans(n_clusters=k, init="k-means++", random_state=seed, batch_size=4096, n_init=3)
    else:
        km = KMeans(n_clusters=k, init="k-means++", random_state=seed, n_init=3)
    labels = km.fit_predict(x)
    return labels.astype(np.int64), km.cluster_centers_.astype(np.float32)


def accumulate(previous: np.ndarray | None, joint: np.ndarray) -> np.ndarray:
    """Dense ids of the pair (previous group, this stage's joint label): `acc * K + label`, renumbered."""
    if previous is None:
        return np.unique(joint, return_inverse=True)[1].astype(np.int64)
    key = previous.astype(np.int64) * (int(joint.max()) + 1) + joint
    return np.unique(key, return_inverse=True)[1].astype(np.int64)


def merge_small_groups(labels: np.ndarray, features: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """Merge the smallest group below `min_size` into the group with the nearest centroid, repeatedly."""
    labels = np.unique(labels, return_inverse=True)[1]
    n = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    sums = np.zeros((n, features.shape[1]))
    np.add.at(sums, labels, features)
    target = np.arange(n)  # where each original group ended up
    alive = np.ones(n, dtype=bool)
    merges = 0
    while alive.sum() > 1:
        live = np.flatnonzero(alive)
        small = live[np.argmin(counts[live])]
        if counts[small] >= min_size:
            break
        cents = sums[live] / counts[live, None]
        d = ((cents - sums[small] / counts[small]) ** 2).sum(1)
        d[live == small] = np.inf
        into = live[np.argmin(d)]
        sums[into] += sums[small]
        counts[into] += counts[small]
        alive[small] = False
        target[target == small] = into
        merges += 1
    return np.unique(target[labels], return_inverse=True)[1].astype(np.int64), merges


def cluster_stage(image_features: np.ndarray, text_features: np.ndarray, previous: np.ndarray | None,
                  k_img: int, k_txt: int, min_group: int, seed: int, features: str = "separate",
                  project_out: tuple[np.ndarray, np.ndarray] | None = None) -> StageClusters:
    """One stage's clustering.

    features="separate" is the published recipe (k-means per modality, joint label t * k_img + i);
    "joint" clusters the concatenated image+text features into k_img * k_txt clusters (joint label
    = cluster id; the per-modality labels are then that id too). `project_out` = (image, text)
    directions to remove first, e.g. the previous stage's centroids, so the stage cannot simply
    re-find the partition it already used.
    """
    img, txt = _l2(image_features), _l2(text_features)
    if project_out is not None:
        img, txt = _remove_directions(img, project_out[0]), _remove_directions(txt, project_out[1])
    if features == "separate":
        il, ic = kmeans(img, k_img, seed)
        tl, tc = kmeans(txt, k_txt, seed + 1)
        joint = tl * k_img + il
    elif features == "joint":
        joint, cents = kmeans(np.concatenate([img, txt], axis=1), k_img * k_txt, seed)
        il, tl = joint, joint
        ic, tc = cents[:, :img.shape[1]], cents[:, img.shape[1]:]
    else:
        raise ValueError(f"mcl.cluster_features must be 'separate' or 'joint', got {features!r}")
    acc = accumulate(previous, joint)
    both = np.concatenate([img, txt], axis=1)
    groups, merges = merge_small_groups(acc, both, min_group)
    return StageClusters(il, tl, joint, acc, groups, ic, tc, merges)


def _remove_directions(x: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Project out the span of `directions` (rows) and re-normalise."""
    q, _ = np.linalg.qr(np.asarray(directions, dtype=np.float64).T)
    y = x - (x @ q) @ q.T
    return _l2(y)


def alignment(labels: np.ndarray, columns: dict[str, list[str]]) -> dict[str, float]:
    """Normalised mutual information of a labelling with each factor column: what the clusters follow."""
    return {name: round(float(normalized_mutual_info_score(values, labels)), 4) for name, values in columns.items()}


def group_sizes(labels: np.ndarray) -> list[int]:
    return sorted(np.bincount(labels).tolist(), reverse=True)


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
