"""set_trainable: gradients reach exactly the parameters each mode names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeclip.moe import TRAINABLE_MODES, moe_layers, set_trainable, upcycle


def _clip_loss(model, images, texts) -> torch.Tensor:
    image_features, text_features, logit_scale = model(images, texts)
    logits = logit_scale.exp() * image_features @ text_features.T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("mode", TRAINABLE_MODES)
def test_gradients_exactly_on_named_parameters(tiny_clip, images, texts, mode):
    model = upcycle(tiny_clip(), num_experts=3, top_k=2, layers=[-1], router_init_std=1.0).train()
    trainable = set_trainable(model, mode)
    _clip_loss(model, images, texts).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)

    all_names = {n for n, _ in model.named_parameters()}
    routers = {n for n in all_names if ".mlp.router." in n}
    experts = {n for n in all_names if ".mlp.experts." in n}
    assert len(routers) == len(moe_layers(model)) == 2
    want = {"router": routers, "router+experts": routers | experts, "full": all_names}[mode]
    assert set(trainable) == want
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want


def test_unknown_mode_and_dense_model_rejected(tiny_clip):
    with pytest.raises(ValueError, match="mode"):
        set_trainable(upcycle(tiny_clip(), num_experts=2, top_k=1), "experts")
    with pytest.raises(ValueError, match="upcycle"):
        set_trainable(tiny_clip(), "router")
