"""Router contract and the two dispatch implementations held against each other."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeclip.moe import Routing, TopKRouter, loop_dispatch, sorted_dispatch
from moeclip.moe import router as router_module


def test_router_outputs_fp32_probs_and_renormalised_weights():
    torch.manual_seed(0)
    router = TopKRouter(16, num_experts=5, top_k=2, init_std=1.0).to(torch.bfloat16)
    x = torch.randn(30, 16, dtype=torch.bfloat16)
    r = router(x)
    assert r.logits.dtype == r.probs.dtype == torch.float32
    assert r.weights.dtype == torch.bfloat16 and r.experts.dtype == torch.long
    assert r.weights.shape == r.experts.shape == (30, 2)
    torch.testing.assert_close(r.weights.float().sum(-1), torch.ones(30), atol=1e-2, rtol=0)
    # the chosen experts are the two most probable, best first
    assert torch.equal(r.experts, r.probs.topk(2, dim=-1).indices)
    expected_logits = x.float() @ router.proj.weight.float().T
    torch.testing.assert_close(r.logits, expected_logits)


def test_router_matmul_runs_once(monkeypatch):
    calls = []
    real_linear = F.linear

    def counting_linear(*args, **kwargs):
        calls.append(1)
        return real_linear(*args, **kwargs)

    monkeypatch.setattr(router_module.F, "linear", counting_linear)
    TopKRouter(8, 4, 2, init_std=1.0)(torch.randn(5, 8))
    assert len(calls) == 1


def test_jitter_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2, jitter=0.5, init_std=1.0)
    x = torch.randn(64, 8)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    assert not torch.allclose(router(x).logits, router(x).logits)


def _random_routing(num_tokens: int, num_experts: int, top_k: int, empty_expert: int | None,
                    seed: int = 0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    if empty_expert is not None:
        logits[:, empty_expert] = -1e4  # never chosen: exercises the skip of empty experts
    probs = logits.softmax(-1)
    top, experts = probs.topk(top_k, dim=-1)
    weights = (top / top.sum(-1, keepdim=True)).requires_grad_(True)
    return Routing(logits=logits, probs=probs, weights=weights, experts=experts)


@pytest.mark.parametrize("top_k,empty_expert", [(1, None), (2, None), (2, 3), (4, None)])
def test_sorted_dispatch_matches_loop_dispatch(top_k, empty_expert):
    num_experts, d = 4, 6
    torch.manual_seed(0)
    mats = [torch.randn(d, d, requires_grad=True) for _ in range(num_experts)]
    x = torch.randn(37, d, requires_grad=True)
    routing = _random_routing(37, num_experts, top_k, empty_expert)

    def expert_fn(e: int, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ mats[e]) + e  # nonlinear and expert-specific

    results = []
    for dispatch in (sorted_dispatch, loop_dispatch):
        out = dispatch(x, routing, expert_fn, num_experts)
        upstream = torch.randn_like(out, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad(out, [x, routing.weights, *mats], upstream, allow_unused=True)
        results.append((out.detach(), grads))
    (out_s, grads_s), (out_l, grads_l) = results
    torch.testing.assert_close(out_s, out_l)
    for g_s, g_l in zip(grads_s, grads_l):
        if g_l is None:  # only the never-used expert's matrix
            assert g_s is None or torch.count_nonzero(g_s) == 0
        else:
            torch.testing.assert_close(g_s, g_l)
    # independent check of the contract on a few tokens
    for t in (0, 11, 36):
        want = sum(routing.weights[t, j] * expert_fn(int(routing.experts[t, j]), x[t:t + 1])[0]
                   for j in range(top_k))
        torch.testing.assert_close(out_s[t], want.detach())


def test_top1_router_gets_task_gradient():
    """Top-1 weights are exactly 1 in the forward, yet the router learns from the task loss."""
    import torch
    from moeclip.moe import TopKRouter
    torch.manual_seed(0)
    r = TopKRouter(8, 4, top_k=1, init_std=0.1)
    x = torch.randn(16, 8)
    routing = r(x)
    assert torch.equal(routing.weights, torch.ones_like(routing.weights))
    (routing.weights * torch.randn(16, 1)).sum().backward()
    assert r.proj.weight.grad is not None and r.proj.weight.grad.abs().sum() > 0
