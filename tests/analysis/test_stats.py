"""The statistics on routings built by hand, where every number is known in advance."""
import math

import numpy as np
import pytest
import torch

from moeclip.analysis.stats import LayerStats, mutual_information, normalised_mi
from moeclip.moe.router import Routing


def _routing(experts: list[list[int]], num_experts: int = 4, probs: torch.Tensor | None = None) -> Routing:
    ex = torch.tensor(experts, dtype=torch.long)
    if probs is None:
        probs = torch.full((len(experts), num_experts), 1.0 / num_experts)
    k = ex.shape[1]
    return Routing(logits=probs.log(), probs=probs, weights=torch.full((len(experts), k), 1.0 / k), experts=ex)


def _stats_for(choice_of_group: dict[int, list[list[int]]], items_per_group: int = 4, tokens_per_item: int = 6):
    """Items of group g route their tokens by cycling through choice_of_group[g]."""
    groups = sorted(choice_of_group)
    n_items = len(groups) * items_per_group
    stats = LayerStats(4, n_items)
    item_groups = []
    experts, items = [], []
    for item in range(n_items):
        g = groups[item // items_per_group]
        item_groups.append(g)
        for t in range(tokens_per_item):
            options = choice_of_group[g]
            experts.append(options[t % len(options)])
            items.append(item)
    stats.update(_routing(experts), None, torch.tensor(items))
    return stats.summary(item_groups, len(groups), null_permutations=50)


def test_mi_is_zero_when_routing_ignores_the_group():
    same = [[0, 1], [2, 3], [1, 2]]
    s = _stats_for({0: same, 1: same, 2: same})
    assert s["groups"]["mi_bits"] == pytest.approx(0.0, abs=1e-9)
    assert s["groups"]["mi_norm"] == pytest.approx(0.0, abs=1e-9)


def test_mi_is_one_bit_for_a_perfectly_group_specialised_router():
    s = _stats_for({0: [[0, 1]], 1: [[2, 3]]})
    g = s["groups"]
    assert g["mi_bits"] == pytest.approx(1.0) and g["mi_norm"] == pytest.approx(1.0)
    assert g["share"] == [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    assert g["mi_null_p95_bits"] < 0.5 * g["mi_bits"]  # far above what shuffled groups give
    assert g["tokens"] == [24.0, 24.0] and g["items"] == [4, 4]


def test_loads_top1_coselection_and_padding_mask():
    stats = LayerStats(4, 2)
    routing = _routing([[0, 1], [0, 2], [1, 0], [3, 2]])
    mask = torch.tensor([True, True, True, False])  # the last token is padding: it must not count
    stats.update(routing, mask, torch.tensor([0, 0, 1, 1]))
    s = stats.summary()
    assert s["tokens"] == 3
    assert s["load"] == pytest.approx([3 / 6, 2 / 6, 1 / 6, 0.0], abs=1e-4)
    assert s["top1"] == pytest.approx([2 / 3, 1 / 3, 0, 0], abs=1e-4)
    co = np.array(s["coselect"])
    assert co[0, 1] == co[1, 0] == pytest.approx(2 / 3, abs=1e-4) and co[0, 2] == pytest.approx(1 / 3, abs=1e-4)
    assert co[3].sum() == 0 and np.diag(co) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0], abs=1e-4)
    assert s["entropy_bits"] == pytest.approx(2.0) and s["max_entropy_bits"] == pytest.approx(2.0)
    load = np.array([3, 2, 1, 0]) / 6
    assert s["load_cv"] == pytest.approx(load.std() / load.mean(), abs=1e-4)


def test_entropy_of_peaked_router():
    stats = LayerStats(2, 1)
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    stats.update(_routing([[0], [1]], 2, probs), None, torch.tensor([0, 0]))
    assert stats.summary()["entropy_bits"] == pytest.approx(0.5)  # (0 + 1) / 2


def test_mutual_information_known_table():
    mi, hg, he = mutual_information(np.array([[3, 1], [1, 3]]))
    p = 0.75
    assert mi == pytest.approx(1 + p * math.log2(p) + (1 - p) * math.log2(1 - p))
    assert hg == pytest.approx(1.0) and he == pytest.approx(1.0)
    assert normalised_mi(0.3, 0.0, 2.0) == 0.0
