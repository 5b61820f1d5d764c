import numpy as np
import pytest
import torch

from moeclip.search.store import NpyRows
from moeclip.search.topk import chunked_topk


def _brute(emb: np.ndarray, q: torch.Tensor, k: int, count: int):
    scores = q @ torch.from_numpy(emb[:count].astype(np.float32)).t()
    ids = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, ids), ids


@pytest.mark.parametrize("reader", ["memmap", "rows"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 100_000])
@pytest.mark.parametrize("k", [1, 5, 37, 10_000])
def test_chunked_topk_equals_brute_force(tmp_path, chunk_rows, k, reader):
    rng = np.random.default_rng(k + chunk_rows)
    np.save(tmp_path / "e.npy", rng.standard_normal((300, 16)).astype(np.float16))
    emb = np.load(tmp_path / "e.npy", mmap_mode="r") if reader == "memmap" else NpyRows(tmp_path / "e.npy")
    q = torch.from_numpy(rng.standard_normal((3, 16)).astype(np.float32))
    count = 250  # rows past `count` (uncommitted or unused) must never be returned
    scores, ids = chunked_topk(emb, q, k, chunk_rows=chunk_rows, count=count)
    ref_scores, ref_ids = _brute(emb, q, min(k, count), count)
    assert scores.shape == (3, min(k, count))
    assert torch.equal(ids, ref_ids)  # scores differ in the last bit only (BLAS blocking per chunk size)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert int(ids.max()) < count


def test_ties_prefer_the_lower_row():
    emb = np.ones((10, 4), dtype=np.float16)
    scores, ids = chunked_topk(emb, torch.ones(1, 4), 4, chunk_rows=3)
    assert ids.tolist() == [[0, 1, 2, 3]]


def test_dimension_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="dim 8, the index has dim 4"):
        chunked_topk(np.zeros((5, 4), np.float16), torch.zeros(1, 8), 3)


def test_npy_rows_reads_what_numpy_wrote(tmp_path):
    a = np.arange(60, dtype=np.float16).reshape(12, 5)
    np.save(tmp_path / "a.npy", a)
    rows = NpyRows(tmp_path / "a.npy")
    assert rows.shape == (12, 5) and rows.dtype == np.float16
    assert np.array_equal(rows[3:7], a[3:7]) and np.array_equal(rows[-1], a[-1]) and rows[12:20].shape == (0, 5)
    (tmp_path / "b.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-10])
    with pytest.raises(ValueError, match="shorter than its header"):
        NpyRows(tmp_path / "b.npy")[0:12]
