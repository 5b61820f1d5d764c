"""The MoE CLIP still behaves as an open_clip model: full forward, autocast, bf16 weights, copies."""
from __future__ import annotations

import copy

import torch

from moeclip.moe import aux_losses, moe_layers, upcycle


def test_full_forward_and_backward_with_aux_losses(tiny_clip, images, texts):
    model = upcycle(tiny_clip(), num_experts=4, top_k=2, jitter=0.1, router_init_std=0.1).train()
    image_features, text_features, logit_scale = model(images, texts)
    assert image_features.shape == text_features.shape == (4, 32)
    losses = aux_losses(model)
    total = (image_features @ text_features.T).sum() + 0.01 * sum(v["lb"] + v["z"] for v in losses.values())
    total.backward()
    router = moe_layers(model)[0][2].router.proj.weight
    assert router.grad is not None and torch.count_nonzero(router.grad) > 0


def test_autocast_bf16(tiny_clip, images, texts):
    model = upcycle(tiny_clip(), num_experts=4, top_k=2, router_init_std=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_features, text_features, _ = model(images, texts)
        losses = aux_losses(model)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
    layer = moe_layers(model)[0][2]
    assert layer.last_routing.logits.dtype == torch.float32  # router stays fp32 under autocast
    assert all(torch.isfinite(v).all() for tower in losses.values() for v in tower.values())


def test_bf16_weights_cast_dtype_follows_experts(tiny_clip, images, texts):
    """open_clip's encode_text casts to blocks[0].mlp.c_fc.weight.dtype: must still resolve on an MoE layer."""
    model = upcycle(tiny_clip(), num_experts=2, top_k=2, router_init_std=1.0).to(torch.bfloat16)
    assert model.transformer.get_cast_dtype() == torch.bfloat16
    text_features = model.encode_text(texts)
    image_features = model.encode_image(images.to(torch.bfloat16))
    assert text_features.dtype == image_features.dtype == torch.bfloat16
    assert torch.isfinite(text_features.float()).all()


def test_deepcopy_after_forward_gets_its_own_hook(tiny_clip, images, texts):
    model = upcycle(tiny_clip(), num_experts=2, top_k=1, router_init_std=1.0).train()
    model(images, texts)  # leaves a routing attached to the autograd graph on every layer
    clone = copy.deepcopy(model)
    clone.encode_text(texts[:2])
    assert moe_layers(clone)[-1][2].last_mask.numel() == texts[:2].numel()
    assert moe_layers(model)[-1][2].last_mask.numel() == texts.numel()  # the original is untouched


def test_grad_checkpointing_gives_the_same_gradients(tiny_clip, images, texts):
    """Checkpointed blocks re-run the MoE layer in backward: the recomputed routing must match."""
    model = upcycle(tiny_clip(), num_experts=3, top_k=2, jitter=0.2, router_init_std=1.0).train()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(0)  # same jitter noise in both runs
        image_features, text_features, _ = model(images, texts)
        ((image_features @ text_features.T).sum() + aux_losses(model)["text"]["lb"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if ".mlp." in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
