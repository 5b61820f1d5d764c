import numpy as np

from moeclip.mcl.store import DTYPE, Normalised, chunks, l2, open_memmap, read_chunks


def test_float16_round_trip_and_chunked_read(tmp_path):
    rng = np.random.default_rng(0)
    x = l2(rng.normal(size=(1000, 24)))
    mm = open_memmap(tmp_path / "f.f16", 1000, 24, "w+")
    for sl in chunks(1000, 300):
        mm[sl] = x[sl]
    mm.flush()
    back = open_memmap(tmp_path / "f.f16", 1000, 24, "r")
    assert back.dtype == DTYPE and (tmp_path / "f.f16").stat().st_size == 1000 * 24 * 2
    assert np.abs(back.astype(np.float32) - x).max() < 1e-3      # float16: ~3 significant digits
    got = np.empty_like(x)
    sizes = []
    for sl, part in read_chunks(back, size=256):
        assert part.dtype == np.float32
        sizes.append(len(part))
        got[sl] = part
    assert sizes == [256, 256, 256, 232] and np.array_equal(got, back.astype(np.float32))
    rows = np.array([5, 999, 0, 5])
    assert np.array_equal(np.concatenate([p for _, p in read_chunks(back, size=3, rows=rows)]),
                          back[rows].astype(np.float32))


def test_normalised_view_concatenates_and_projects_when_read():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(500, 6)) * 3, rng.normal(size=(500, 4))
    both = Normalised([a.astype(np.float16), b])
    assert both.shape == (500, 10) and len(both) == 500
    rows = np.array([7, 0, 499])
    assert both[rows].dtype == np.float32 and both[10:74].shape == (64, 10)
    assert np.allclose(both[:][:, :6], l2(a), atol=1e-3) and np.allclose(both[:][:, 6:], l2(b), atol=1e-6)
    assert np.array_equal(both[rows], both[:][rows])
    assert np.array_equal(np.concatenate([p for _, p in read_chunks(both, size=64)]), both[:])
    d = rng.normal(size=(2, 6))
    proj = Normalised([a, b], [d, None])[:][:, :6]
    assert np.abs(proj @ d.T).max() < 1e-5 and np.allclose(np.linalg.norm(proj, axis=1), 1, atol=1e-6)
