import numpy as np
import pytest

from moeclip.data.sampler import GroupBatchSampler


def _labels(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    # uneven groups, some smaller than a global batch
    return rng.choice(7, size=n, p=[0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01])


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2), (4, 2), (3, 1)])
def test_invariants(world, accum):
    labels = _labels()
    gb = 48
    samplers = [GroupBatchSampler(labels, len(labels), gb, world, r, accum, seed=5) for r in range(world)]
    batches = samplers[0].global_batches(epoch=2)
    assert len(batches) == samplers[0].steps_per_epoch()
    seen = np.concatenate(batches)
    assert set(seen.tolist()) == set(range(len(labels)))           # no sample lost
    for b in batches:
        assert len(b) == gb
        assert len(set(labels[b].tolist())) == 1                    # one group per global batch
        parts = [samplers[r].rank_micro_batches(b) for r in range(world)]
        # ranks partition the global batch exactly, each seeing grad_accum micro-batches
        flat = sorted(i for p in parts for mb in p for i in mb)
        assert flat == sorted(b.tolist())
        assert all(len(p) == accum and all(len(mb) == gb // (world * accum) for mb in p) for p in parts)
    # rank agreement: every rank derives the same global batches independently
    for s in samplers[1:]:
        assert all((a == c).all() for a, c in zip(batches, s.global_batches(epoch=2)))


def test_deterministic_and_epoch_dependent():
    labels = _labels()
    a = GroupBatchSampler(labels, len(labels), 32, seed=1)
    b = GroupBatchSampler(labels, len(labels), 32, seed=1)
    assert all((x == y).all() for x, y in zip(a.global_batches(0), b.global_batches(0)))
    assert any((x != y).any() for x, y in zip(a.global_batches(0), a.global_batches(1)))


def test_duplicates_only_pad_the_last_batch_of_a_group():
    labels = np.array([0] * 10 + [1] * 70)
    s = GroupBatchSampler(labels, 80, 32)
    batches = s.global_batches(0)
    counts = np.bincount(np.concatenate(batches), minlength=80)
    assert (counts >= 1).all() and counts.sum() == len(batches) * 32
    assert len(batches) == 1 + 3


def test_bad_geometry():
    with pytest.raises(ValueError, match="divide evenly"):
        GroupBatchSampler(None, 100, 30, world_size=4)


def test_epoch_is_one_array_covering_every_sample_once_per_group_padding():
    """Many small groups: one (steps, global_batch) array, every sample present, one group per batch,
    and the padding (< one batch per group) is all that exceeds N."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 300, 5000)
    s = GroupBatchSampler(labels, 5000, 64, seed=3)
    batches = s.global_batches(0)
    assert isinstance(batches, np.ndarray) and batches.shape == (s.steps_per_epoch(), 64)
    assert (np.bincount(batches.reshape(-1), minlength=5000) >= 1).all()
    assert all(len(np.unique(labels[b])) == 1 for b in batches)
    assert batches.size - 5000 < 300 * 64
