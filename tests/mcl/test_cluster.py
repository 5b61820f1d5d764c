import numpy as np
from sklearn.cluster import KMeans

from moeclip.mcl.cluster import (MERGE_GLOBAL_GROUPS, accumulate, alignment, cluster_stage, kmeans, kmeans_path,
                                 merge_small_groups, merge_stage)
from moeclip.mcl.merge import one_at_a_time
from moeclip.mcl.store import l2


def test_accumulate_refines_partition():
    a = accumulate(None, np.array([0, 0, 1, 1, 2]))
    b = accumulate(a, np.array([0, 1, 0, 1, 0]))
    assert len(np.unique(b)) == 5
    # same pair -> same group
    c = accumulate(np.array([0, 0, 1]), np.array([3, 3, 3]))
    assert c[0] == c[1] != c[2]


def test_merge_keeps_every_sample_and_reaches_min_size():
    rng = np.random.default_rng(0)
    labels = rng.choice(20, size=500, p=np.r_[np.full(5, 0.15), np.full(15, 0.25 / 15)])
    feats = rng.normal(size=(500, 4)) + labels[:, None]
    merged, merges = merge_small_groups(labels, feats, min_size=40)
    assert len(merged) == 500 and merges > 0
    assert np.bincount(merged).min() >= 40
    # merging only joins groups, never splits one
    for g in np.unique(labels):
        assert len(np.unique(merged[labels == g])) == 1


def test_kmeans_finds_planted_clusters_and_nmi():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    centers = np.eye(8)[:3] * 5
    x = centers[truth] + rng.normal(scale=0.3, size=(300, 8))
    labels, cents = kmeans(x, 3, seed=0)
    nmi = alignment(labels, {"truth": truth.tolist(), "noise": rng.integers(0, 3, 300).tolist()})
    assert nmi["truth"] > 0.95 and nmi["noise"] < 0.1
    assert cents.shape == (3, 8)


def test_cluster_stage_joint_label():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(200, 6))
    txt = rng.normal(size=(200, 6))
    c = cluster_stage(img, txt, None, 3, 2, min_group=10, seed=0)
    assert ((c.joint == c.text_labels * 3 + c.image_labels)).all()
    assert c.groups.max() + 1 <= len(np.unique(c.joint))


def test_project_out_moves_clusters_to_the_next_factor():
    """Two planted factors; removing the dominant factor's centroid directions exposes the weaker one."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, 600)
    b = rng.integers(0, 3, 600)
    x = np.zeros((600, 12))
    x[np.arange(600), a] = 6.0          # dominant factor in dims 0-2
    x[np.arange(600), 3 + b] = 2.0      # weaker factor in dims 3-5
    x += rng.normal(scale=0.2, size=x.shape)
    first = cluster_stage(x, x, None, 3, 3, min_group=1, seed=0)
    assert alignment(first.image_labels, {"a": a.tolist()})["a"] > 0.9
    second = cluster_stage(x, x, None, 3, 3, min_group=1, seed=0,
                           project_out=(first.image_centroids, first.text_centroids))
    nmi = alignment(second.image_labels, {"a": a.tolist(), "b": b.tolist()})
    assert nmi["b"] > 0.8 and nmi["a"] < 0.1


def test_joint_features_mode():
    rng = np.random.default_rng(2)
    c = cluster_stage(rng.normal(size=(120, 4)), rng.normal(size=(120, 4)), None, 4, 1, min_group=5, seed=0,
                      features="joint")
    assert len(np.unique(c.joint)) == 4 and (c.image_labels == c.joint).all()


def test_hierarchical_kmeans_is_deterministic_and_makes_k_clusters():
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 300, 6000)
    x = (rng.normal(size=(300, 16))[truth] + 0.05 * rng.normal(size=(6000, 16))).astype(np.float16)
    a, ca = kmeans(x, 150, seed=3, path="hierarchical")
    b, cb = kmeans(x, 150, seed=3, path="hierarchical")
    assert np.array_equal(a, b) and np.array_equal(ca, cb)
    assert len(np.unique(a)) == 150 and ca.shape == (150, 16)
    # clusters follow the planted ones: every cluster is (almost) a union of planted clusters
    assert alignment(a, {"truth": truth.tolist()})["truth"] > 0.85


def test_kmeans_path_keeps_full_kmeans_for_the_default_corpus():
    """The shipped default (20,000 pairs, k = 20,000 // 256 = 78) and anything up to 100k rows x 64 clusters
    keep full KMeans; only corpus-scale problems take the sampled or hierarchical path."""
    assert kmeans_path(20_000, 78) == "full"
    assert kmeans_path(100_000, 64) == "full" and kmeans_path(50_000, 128) == "full"
    assert kmeans_path(100_000, 390) == "hierarchical" and kmeans_path(1_000_000, 3_906) == "hierarchical"
    assert kmeans_path(200_000, 9) == "sampled"


def test_full_path_is_sklearn_kmeans_on_the_normalised_rows():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2_000, 16)) + 3 * rng.normal(size=(78, 16))[rng.integers(0, 78, 2_000)]
    labels, cents = kmeans(x, 78, seed=0)
    km = KMeans(n_clusters=78, init="k-means++", random_state=0, n_init=3)
    want = km.fit_predict(l2(x))
    assert np.array_equal(labels, want) and np.allclose(cents, km.cluster_centers_)


def test_small_corpora_merge_one_at_a_time_and_large_ones_within_previous_groups():
    """Up to MERGE_GLOBAL_GROUPS accumulated groups a stage merges as MCL always did (one at a time, among
    all groups, whatever the previous stage's groups); above, in passes inside the previous groups."""
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 300, 3000)
    feats = rng.normal(size=(3000, 8)).astype(np.float16)
    prev = (labels >= 150).astype(np.int64)
    got = merge_stage(labels, feats, 30, prev)
    want = one_at_a_time(labels, feats, 30)
    assert np.array_equal(got[0], want[0]) and got[1] == want[1]
    many = np.arange(MERGE_GLOBAL_GROUPS + 1000).repeat(2)
    prev = (many % 2).astype(np.int64)           # two previous groups, each holding every other group
    groups, merges = merge_stage(many, rng.normal(size=(len(many), 4)), 10, prev)
    assert np.bincount(groups).min() >= 10 and merges > 0
    for g in np.unique(groups):
        assert len(np.unique(prev[groups == g])) == 1
