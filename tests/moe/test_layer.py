"""MoEFFN on its own: the mixture it computes and how it plugs into open_clip blocks."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from moeclip.moe import MoEFFN


def _dense(act: nn.Module, d: int = 8, h: int = 16) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, h)), ("gelu", act), ("c_proj", nn.Linear(h, d))]))


@pytest.mark.parametrize("dispatch", ["sorted", "loop"])
def test_all_experts_with_zero_router_is_mean_of_experts(dispatch):
    torch.manual_seed(0)
    layer = MoEFFN.from_dense(_dense(nn.GELU()), num_experts=3, top_k=3, router_init_std=0.0, dispatch=dispatch)
    for expert in layer.experts:  # make the experts genuinely different
        for p in expert.parameters():
            nn.init.normal_(p)
    assert torch.count_nonzero(layer.router.proj.weight) == 0
    x = torch.randn(2, 5, 8)
    want = torch.stack([expert(x) for expert in layer.experts]).mean(0)
    torch.testing.assert_close(layer(x), want)


def test_from_dense_copies_activation_and_weights():
    dense = _dense(QuickGELU())
    layer = MoEFFN.from_dense(dense, num_experts=2, top_k=1)
    for expert in layer.experts:
        assert isinstance(expert.gelu, QuickGELU)
        assert torch.equal(expert.c_fc.weight, dense.c_fc.weight)
        assert expert.c_fc.weight.data_ptr() != dense.c_fc.weight.data_ptr()  # a copy, not shared storage
    assert isinstance(MoEFFN.from_dense(_dense(nn.GELU()), 2, 1).experts[0].gelu, nn.GELU)
    assert layer.c_fc is layer.experts[0].c_fc  # open_clip's get_weight_dtype reads mlp.c_fc
    assert set(layer.state_dict()) >= {"router.proj.weight", "experts.1.c_fc.weight", "experts.1.c_proj.bias"}


def test_forward_keeps_shape_and_records_routing_and_mask():
    torch.manual_seed(0)
    layer = MoEFFN.from_dense(_dense(nn.GELU()), num_experts=4, top_k=2, router_init_std=1.0)
    x = torch.randn(3, 5, 8)
    assert layer(x).shape == x.shape
    assert layer.last_routing.experts.shape == (15, 2) and layer.last_mask is None
    mask = torch.rand(3, 5) > 0.5
    layer.token_mask = mask
    layer(x)
    assert torch.equal(layer.last_mask, mask.reshape(-1))
    layer(torch.randn(2, 5, 8))  # a batch of another shape: the stale mask must not be applied
    assert layer.last_mask is None


def test_unknown_dispatch_and_bad_dense_rejected():
    with pytest.raises(ValueError, match="dispatch"):
        MoEFFN.from_dense(_dense(nn.GELU()), 2, 1, dispatch="magic")
    with pytest.raises(ValueError, match="c_fc"):
        MoEFFN.from_dense(nn.Sequential(nn.Linear(4, 4)), 2, 1)
    with pytest.raises(ValueError, match="top_k"):
        MoEFFN.from_dense(_dense(nn.GELU()), 2, 3)
