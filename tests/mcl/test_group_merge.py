"""The vectorised merge against MCL's one-at-a-time merge (`merge.one_at_a_time`, still used for small problems)."""
import numpy as np
import pytest

from moeclip.mcl.merge import group_sums, merge_small_groups, one_at_a_time


def _old(labels: np.ndarray, features: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """main's `moeclip.mcl.cluster.merge_small_groups` before issue 15, verbatim: the frozen reference."""
    labels = np.unique(labels, return_inverse=True)[1]
    n = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    sums = np.zeros((n, features.shape[1]))
    np.add.at(sums, labels, features)
    target = np.arange(n)
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


def _existing_input():
    """tests/mcl/test_cluster.py's merge input."""
    rng = np.random.default_rng(0)
    labels = rng.choice(20, size=500, p=np.r_[np.full(5, 0.15), np.full(15, 0.25 / 15)])
    return labels, rng.normal(size=(500, 4)) + labels[:, None], 40


def _many_small(seed: int):
    """300 groups, 280 of them small (5-30 samples), each planted 0.5 from one of 20 large groups that lie
    far apart, along its own axis (so 0.71 from any other small group): accumulated groups around the
    groups they refine. Every small group's nearest neighbour is then its large group whatever the merge
    order, so pass-wise merging must give exactly the one-at-a-time result; on uniform noise it need not
    (next test)."""
    rng = np.random.default_rng(seed)
    dim = 320
    big = rng.normal(size=(20, dim)) * 20
    sizes = np.r_[rng.integers(60, 120, 20), rng.integers(5, 30, 280)]
    home = np.r_[np.arange(20), rng.integers(0, 20, 280)]
    offset = np.r_[np.zeros((20, dim)), 0.5 * np.eye(dim)[20:300]]
    centre = big[home] + offset
    labels = np.repeat(rng.permutation(300), sizes)
    feats = centre[np.repeat(np.arange(300), sizes)] + rng.normal(scale=0.005, size=(sizes.sum(), dim))
    return labels, feats, 50


@pytest.mark.parametrize("case", ["existing", "many_small_0", "many_small_1"])
def test_equals_one_at_a_time(case):
    labels, feats, m = _existing_input() if case == "existing" else _many_small(int(case[-1]))
    got, merges = merge_small_groups(labels, feats, m)
    want, want_merges = one_at_a_time(labels, feats, m)
    assert merges == want_merges > 0
    assert np.array_equal(got, want)


@pytest.mark.parametrize("case", ["existing", "many_small_0", "uniform"])
def test_one_at_a_time_equals_the_old_function(case):
    """`one_at_a_time` (chunked float64 sums, block-wise distances) merges exactly as the old code did."""
    if case == "uniform":
        rng = np.random.default_rng(3)
        labels, feats, m = rng.integers(0, 300, 3000), rng.normal(size=(3000, 8)).astype(np.float32), 30
    else:
        labels, feats, m = _existing_input() if case == "existing" else _many_small(0)
    got, want = one_at_a_time(labels, feats, m, rows=7), _old(labels, feats, m)
    assert np.array_equal(got[0], want[0]) and got[1] == want[1] > 0


def test_uniform_random_many_small_groups_invariants():
    """Uniform noise, 300 groups of ~10 (the worst case for pass-wise merging): the partition may differ
    from the one-at-a-time order's in a few merges, but every group reaches min_size, none is split."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 300, 3000)
    feats = rng.normal(size=(3000, 8)).astype(np.float16)
    got, merges = merge_small_groups(labels, feats, 30)
    want, want_merges = one_at_a_time(labels, feats.astype(np.float64), 30)
    assert np.bincount(got).min() >= 30
    for g in np.unique(labels):
        assert len(np.unique(got[labels == g])) == 1
    assert abs(merges - want_merges) <= 0.05 * want_merges


def test_within_blocks_merges_among_siblings_first():
    rng = np.random.default_rng(0)
    parent = np.repeat([0, 1], 200)
    labels = np.r_[rng.integers(0, 10, 200), 10 + rng.integers(0, 10, 200)]
    feats = rng.normal(size=(400, 4))
    got, _ = merge_small_groups(labels, feats, 60, within=parent)
    assert np.bincount(got).min() >= 60
    for g in np.unique(got):
        assert len(np.unique(parent[got == g])) == 1     # no group crosses a parent


def test_group_sums_chunked():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, 1000)
    x = rng.normal(size=(1000, 3)).astype(np.float16)
    want = np.zeros((7, 3))
    np.add.at(want, labels, x.astype(np.float64))
    assert np.allclose(group_sums(labels, x, 7, chunk=64), want)
