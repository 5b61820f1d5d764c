"""Dispatch under autocast: the MoE layer computes and returns what a dense FFN would (bf16/fp16),
on whatever device autocast runs, and both dispatchers keep agreeing."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from moeclip.moe import DISPATCHERS, MoEFFN, upcycle
from moeclip.moe.dispatch import compute_dtype

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _mlp(d: int = 16) -> nn.Module:
    return nn.Sequential(OrderedDict(c_fc=nn.Linear(d, 4 * d), gelu=nn.GELU(), c_proj=nn.Linear(4 * d, d)))


def _distinct_moe(num_experts: int, top_k: int, device: str) -> MoEFFN:
    torch.manual_seed(0)
    layer = MoEFFN.from_dense(_mlp(), num_experts, top_k, router_init_std=0.5)
    with torch.no_grad():
        for expert in layer.experts:
            for p in expert.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return layer.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_compute_dtype_follows_autocast(device):
    x = torch.randn(3, 4, device=device)
    assert compute_dtype(x) == torch.float32
    with torch.autocast(device, dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
    assert compute_dtype(x.to(torch.bfloat16)) == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_autocast_output_dtype_like_dense_and_dispatchers_agree(device, top_k):
    layer = _distinct_moe(4, top_k, device)
    x = torch.randn(2, 29, 16, device=device)
    results = {}
    for name in DISPATCHERS:
        layer.dispatch = name
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            y = layer(xi)
            dense_dtype = layer.experts[0](xi).dtype
        assert y.dtype == dense_dtype == torch.bfloat16
        assert layer.last_routing.probs.dtype == torch.float32  # the router stays fp32
        y.float().square().sum().backward()
        assert xi.grad.dtype == torch.float32  # gradients reach the fp32 input in its own dtype
        results[name] = (y.detach().float(), xi.grad, layer.router.proj.weight.grad.clone(),
                         layer.experts[1].c_fc.weight.grad.clone())
        layer.zero_grad(set_to_none=True)
    for a, b in zip(results["sorted"], results["loop"]):  # bf16 rounding differs in order: compare norms
        assert (a - b).norm() <= 2e-2 * b.norm()


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_close_to_fp32(device):
    layer = _distinct_moe(4, 2, device)
    x = torch.randn(64, 16, device=device)
    ref = layer(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        low = layer(x)
    assert torch.equal(layer.last_routing.experts, layer.router(x).experts)  # same routing decisions
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_copy_upcycled_equals_dense_under_autocast(device, tiny_clip, images, texts):
    """With identical experts the MoE CLIP equals the dense one under autocast too (same dtypes out)."""
    dense = tiny_clip().to(device)
    moe = upcycle(tiny_clip(), num_experts=3, top_k=2, router_init_std=1.0).to(device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        outs = [(m.encode_image(images.to(device)), m.encode_text(texts.to(device))) for m in (dense, moe)]
    for a, b in zip(*outs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_empty_batch_under_autocast():
    layer = _distinct_moe(3, 2, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name in DISPATCHERS:
            layer.dispatch = name
            y = layer(torch.randn(0, 16))
            assert y.shape == (0, 16) and y.dtype == torch.bfloat16
