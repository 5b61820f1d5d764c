"""Auxiliary router losses: values on known routings, and blindness to padding."""
from __future__ import annotations

import math

import torch

from moeclip.moe import Routing, TopKRouter, aux_losses, load_balancing_loss, moe_layers, router_z_loss, upcycle


def _routing_from_logits(logits: torch.Tensor, top_k: int) -> Routing:
    probs = logits.softmax(-1)
    top, experts = probs.topk(top_k, dim=-1)
    return Routing(logits=logits, probs=probs, weights=top / top.sum(-1, keepdim=True), experts=experts)


def test_load_balancing_is_one_for_uniform_routing_and_e_when_collapsed():
    num_experts = 4
    # every token has uniform probs, and the chosen slots cover the experts evenly
    uniform = Routing(logits=torch.zeros(8, num_experts), probs=torch.full((8, num_experts), 0.25),
                      weights=torch.full((8, 2), 0.5), experts=torch.tensor([[0, 1], [2, 3]] * 4))
    torch.testing.assert_close(load_balancing_loss(uniform, None, num_experts), torch.tensor(1.0))
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    collapsed = _routing_from_logits(logits, top_k=1)
    # f = (1, 0, 0, 0), P_0 = softmax(10, 0, 0, 0)_0  ->  E * P_0
    want = num_experts * math.exp(10) / (math.exp(10) + 3)
    torch.testing.assert_close(load_balancing_loss(collapsed, None, num_experts), torch.tensor(want))


def test_padding_tokens_do_not_change_the_losses():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2, init_std=1.0)
    real = torch.randn(10, 8)
    padding = 100.0 * torch.randn(6, 8)  # extreme logits, skewed routing
    mask = torch.cat([torch.ones(10, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)])
    real_only = router(real)
    with_padding = router(torch.cat([real, padding]))
    for loss in (lambda r, m: load_balancing_loss(r, m, 4), router_z_loss):
        torch.testing.assert_close(loss(with_padding, mask), loss(real_only, None))
        assert not torch.allclose(loss(with_padding, None), loss(real_only, None))  # padding would matter


def test_text_hook_sets_mask_and_aux_losses_use_it(tiny_clip, images, texts):
    model = upcycle(tiny_clip(), num_experts=4, top_k=2, router_init_std=1.0)
    model.encode_image(images)
    model.encode_text(texts)
    real = (texts != 0).reshape(-1)
    assert not real.all()
    text_layers = [layer for tower, _, layer in moe_layers(model) if tower == "text"]
    for layer in text_layers:
        assert torch.equal(layer.last_mask, real)
    for _, _, layer in moe_layers(model):
        if layer not in text_layers:
            assert layer.last_mask is None  # image tokens are all real

    losses = aux_losses(model)
    assert set(losses) == {"visual", "text"} and set(losses["text"]) == {"lb", "z"}
    want_lb = torch.stack([load_balancing_loss(l.last_routing, real, 4) for l in text_layers]).mean()
    want_z = torch.stack([router_z_loss(l.last_routing, real) for l in text_layers]).mean()
    torch.testing.assert_close(losses["text"]["lb"], want_lb)
    torch.testing.assert_close(losses["text"]["z"], want_z)
    unmasked = torch.stack([load_balancing_loss(l.last_routing, None, 4) for l in text_layers]).mean()
    assert not torch.allclose(losses["text"]["lb"], unmasked)


def test_aux_losses_only_for_towers_with_moe_layers(tiny_clip, images):
    model = upcycle(tiny_clip(), num_experts=2, top_k=1, towers=("visual",), router_init_std=1.0)
    model.encode_image(images)
    losses = aux_losses(model)
    assert set(losses) == {"visual"}
    assert losses["visual"]["lb"].requires_grad and losses["visual"]["lb"] >= 1.0 - 1e-6
