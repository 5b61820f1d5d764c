"""On a GPU under bf16 autocast: the router still decides in fp32 and the MoE layer stays close to fp32."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from moeclip.moe import DISPATCHERS, MoEFFN

pytestmark = pytest.mark.cuda


def _layer(d: int = 64, experts: int = 4, top_k: int = 2) -> MoEFFN:
    torch.manual_seed(0)
    mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=nn.GELU(), c_proj=nn.Linear(4 * d, d)))
    layer = MoEFFN.from_dense(mlp, experts, top_k, router_init_std=0.5)
    with torch.no_grad():
        for e in layer.experts:
            for p in e.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return layer.cuda()


@pytest.mark.parametrize("dispatch", sorted(DISPATCHERS))
def test_bf16_dispatch_and_router_against_fp32(dispatch):
    layer = _layer()
    layer.dispatch = dispatch
    x = torch.randn(8, 50, 64, device="cuda")
    ref = layer(x)
    ref_routing = layer.last_routing
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    routing = layer.last_routing
    assert out.device.type == "cuda" and routing.logits.dtype == torch.float32
    same = (routing.experts == ref_routing.experts).all(dim=1).float().mean().item()
    assert same > 0.99, f"bf16 changed the experts of {100 * (1 - same):.1f}% of tokens"
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"bf16 output is {rel:.3%} off fp32"
    # the backward pass reaches the router and the experts on the GPU
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x).float().pow(2).mean().backward()
    assert layer.router.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for e in layer.experts for p in e.parameters())
