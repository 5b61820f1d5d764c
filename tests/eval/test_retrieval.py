import numpy as np
import pytest
import torch

from moeclip.eval.retrieval import protocol_pairs, recall_at_k, retrieval_metrics


def test_recall_counts_any_positive():
    # 3 queries, 4 gallery items; query 0's positives are {1, 2}
    q = torch.eye(4)[:3]
    g = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
    g = g / g.norm(dim=1, keepdim=True)
    qi = np.array([0, 0, 1, 2])
    gi = np.array([1, 2, 0, 3])
    r = recall_at_k(q, g, qi, gi, ks=(1, 2))
    # q0 top-1 is g0 (not positive), top-2 includes g1 -> hit at 2
    # q1 = e1: top-1 g2 (not positive: positive is g0) -> miss at 1; top-2 {g2, g1}: miss
    # q2 = e2: all zero similarity except none... ties resolved arbitrarily; positive g3 has 0 too
    assert r[1] <= 1 / 3 + 1e-9
    assert r[2] >= 1 / 3 - 1e-9


def test_perfect_and_shared_positives():
    feats = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    pairs = np.arange(10)
    m = retrieval_metrics(feats, feats, pairs, pairs)
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0 and m["mean_R@1"] == 1.0
    # two images share one caption: both count as hits for that caption
    img = feats[:2]
    txt = feats[:1]
    m = retrieval_metrics(img, txt, np.array([0, 1]), np.array([0, 0]), ks=(1,))
    assert m["image_to_text_R@1"] == 1.0 and m["text_to_image_R@1"] == 1.0


def test_chunking_does_not_change_result():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    g = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    qi = np.random.default_rng(0).integers(0, 50, 80)
    gi = np.random.default_rng(1).integers(0, 40, 80)
    a = recall_at_k(q, g, qi, gi, chunk=7)
    b = recall_at_k(q, g, qi, gi, chunk=1000)
    assert a == b


def _protocol_metrics(protocol):
    """Image A = e0, image B = e1; rows (A, "x"), (A, "y"), (B, "x"); "x" looks like B, "y" like A."""
    images = torch.eye(2)
    captions = torch.nn.functional.normalize(torch.tensor([[0.2, 1.0], [1.0, 0.0]]), dim=1)  # "x", "y"
    image_ids, text_ids, caption_of_item = protocol_pairs(protocol, np.array([0, 0, 1]), np.array([0, 1, 0]))
    return retrieval_metrics(images, captions[torch.as_tensor(caption_of_item)], image_ids, text_ids, ks=(1, 2))


def test_per_caption_gives_each_row_its_own_image_only():
    m = _protocol_metrics("per_caption")
    # row 0 ("x" of A) retrieves B first: a miss, although "x" also describes B
    assert m["text_to_image_R@1"] == 2 / 3 and m["text_to_image_R@2"] == 1.0
    assert m["image_to_text_R@2"] == 1.0


def test_multi_positive_merges_identical_captions():
    m = _protocol_metrics("multi_positive")
    # one "x" query whose positives are A and B: B first is a hit
    assert m["text_to_image_R@1"] == 1.0 and m["image_to_text_R@1"] == 1.0


def test_unknown_protocol_is_named():
    with pytest.raises(ValueError, match="protocol 'papers': expected one of per_caption, multi_positive"):
        protocol_pairs("papers", np.array([0]), np.array([0]))
