"""A shared expert beside the routed ones: exact at the start, saved and rebuilt, trained by mode."""
import copy

import pytest
import torch

from moeclip.moe import MoEFFN, build_moe, moe_config, moe_layers, set_trainable, upcycle


def test_shared_expert_starts_as_the_dense_ffn(tiny_clip, images, texts):
    """Gate 0.5 over two copies of the dense FFN (shared and routed): the output is the dense one."""
    dense = tiny_clip()
    moe = upcycle(copy.deepcopy(dense), num_experts=4, top_k=2, shared_expert=True)
    with torch.no_grad():
        torch.testing.assert_close(moe.encode_image(images), dense.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe.encode_text(texts), dense.encode_text(texts), atol=1e-5, rtol=1e-5)


def test_gate_mixes_shared_and_routed(tiny_clip):
    mlp = tiny_clip().visual.transformer.resblocks[0].mlp
    layer = MoEFFN.from_dense(mlp, num_experts=2, top_k=1, shared_expert=True)
    with torch.no_grad():
        for e in layer.experts:
            e.c_proj.bias.add_(1.0)  # routed output = shared output + 1
        layer.fusion.bias.fill_(torch.logit(torch.tensor(0.25)))
    x = torch.randn(3, 5, mlp.c_fc.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), mlp(x) + 0.75, atol=1e-5, rtol=1e-5)


def test_config_round_trip_and_trainable_modes(tiny_clip):
    moe = upcycle(tiny_clip(), num_experts=3, top_k=2, shared_expert=True)
    cfg = moe_config(moe)
    assert cfg["shared_expert"] is True
    rebuilt = build_moe(tiny_clip(), cfg)
    rebuilt.load_state_dict(moe.state_dict())  # strict: the same parameters, shared and fusion included
    assert "shared_expert" not in moe_config(upcycle(tiny_clip(), num_experts=3, top_k=2))
    router = set_trainable(moe, "router")
    assert any(".fusion." in n for n in router) and not any(".shared." in n or ".experts." in n for n in router)
    both = set_trainable(moe, "router+experts")
    assert any(".shared." in n for n in both) and any(".experts." in n for n in both)
    kept = set_trainable(moe, "router+experts", freeze_shared=True)  # the base's FFN kept as it was
    assert set(kept) == {n for n in both if ".shared." not in n} and any(".fusion." in n for n in kept)
    assert not any(p.requires_grad for n, p in moe.named_parameters() if ".shared." in n)
    with pytest.raises(ValueError, match="freeze_shared"):
        set_trainable(moe, "full", freeze_shared=True)


def test_merge_refuses_shared_expert_layers(tiny_clip):
    from moeclip.moe.merge import merge_to_dense
    moe = upcycle(tiny_clip(), num_experts=2, top_k=1, shared_expert=True)
    with pytest.raises(ValueError, match="shared expert"):
        merge_to_dense(moe, None)
