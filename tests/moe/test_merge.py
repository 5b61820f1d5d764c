"""Merging an MoE back into a dense CLIP and pruning experts (moeclip.moe.merge)."""
import copy

import pytest
import torch

from moeclip.moe import MoEFFN, moe_layers, upcycle
from moeclip.moe.merge import kept_experts, merge_to_dense, prune_experts


def _perturb(model, seed=0, scale=0.05, router_std=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, layer in moe_layers(model):
            layer.router.proj.weight.copy_(torch.randn(layer.router.proj.weight.shape, generator=g) * router_std)
            for expert in layer.experts:
                for p in expert.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _encode(model, images, texts):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def test_merging_identical_experts_gives_the_dense_model(tiny_clip, images, texts):
    dense = tiny_clip()
    moe = upcycle(copy.deepcopy(dense), num_experts=3, top_k=2, router_init_std=1.0)  # routers differ, experts equal
    loads = {(t, b): [0.7, 0.2, 0.1] for t, b, _ in moe_layers(moe)}
    for merged in (merge_to_dense(copy.deepcopy(moe), loads), merge_to_dense(copy.deepcopy(moe), None)):
        assert not moe_layers(merged)
        assert merged.state_dict().keys() == dense.state_dict().keys()
        for k, v in dense.state_dict().items():
            assert torch.equal(merged.state_dict()[k], v), k
        for a, b in zip(_encode(merged, images, texts), _encode(dense, images, texts)):
            assert torch.equal(a, b)


def test_merge_is_the_weighted_average(tiny_clip):
    moe = _perturb(upcycle(tiny_clip(), num_experts=3, top_k=2))
    (tower, block, layer), *_ = moe_layers(moe)
    w = [3.0, 1.0, 0.0]  # any scale; normalised per layer
    loads = {(t, b): w for t, b, _ in moe_layers(moe)}
    expect = sum(wi / 4 * layer.experts[i].c_fc.weight for i, wi in enumerate(w))
    plain = sum(layer.experts[i].c_fc.weight for i in range(3)) / 3
    merged = merge_to_dense(copy.deepcopy(moe), loads)
    torch.testing.assert_close(merged.visual.transformer.resblocks[block].mlp.c_fc.weight, expect)
    mean = merge_to_dense(copy.deepcopy(moe), None)
    torch.testing.assert_close(mean.visual.transformer.resblocks[block].mlp.c_fc.weight, plain)
    with pytest.raises(ValueError, match="every expert load is 0"):
        merge_to_dense(copy.deepcopy(moe), {k: [0, 0, 0] for k in loads})
    with pytest.raises(ValueError, match="not 3 non-negative numbers"):
        merge_to_dense(copy.deepcopy(moe), {k: [1, 2] for k in loads})


def test_prune_to_all_experts_is_the_identity(tiny_clip, images, texts):
    moe = _perturb(upcycle(tiny_clip(), num_experts=3, top_k=2))
    loads = {(t, b): [0.1, 0.5, 0.4] for t, b, _ in moe_layers(moe)}
    pruned = copy.deepcopy(moe)
    kept = prune_experts(pruned, loads, 3)
    assert all(v == [0, 1, 2] for v in kept.values())
    for k, v in moe.state_dict().items():
        assert torch.equal(pruned.state_dict()[k], v), k
    for a, b in zip(_encode(pruned, images, texts), _encode(moe, images, texts)):
        assert torch.equal(a, b)


def test_prune_keeps_the_most_used_experts_and_their_router_rows(tiny_clip, images, texts):
    moe = _perturb(upcycle(tiny_clip(), num_experts=4, top_k=2))
    loads = {(t, b): [0.1, 0.4, 0.2, 0.3] for t, b, _ in moe_layers(moe)}
    pruned = copy.deepcopy(moe)
    prune_experts(pruned, loads, 2)
    for (t, b, old), (_, _, new) in zip(moe_layers(moe), moe_layers(pruned)):
        assert isinstance(new, MoEFFN) and new.num_experts == 2 and new.top_k == 2
        assert torch.equal(new.router.proj.weight, old.router.proj.weight[[1, 3]])
        assert torch.equal(new.experts[0].c_fc.weight, old.experts[1].c_fc.weight)
        assert torch.equal(new.experts[1].c_proj.bias, old.experts[3].c_proj.bias)
    one = copy.deepcopy(moe)
    prune_experts(one, loads, 1)
    assert all(layer.top_k == 1 and layer.num_experts == 1 for _, _, layer in moe_layers(one))
    # top-1 of one expert = that expert's FFN: equals merging with all weight on it
    merged = merge_to_dense(copy.deepcopy(moe), {k: [0, 1, 0, 0] for k in loads})
    for a, b in zip(_encode(one, images, texts), _encode(merged, images, texts)):
        torch.testing.assert_close(a, b)
    # the text padding mask reaches the new text layers
    one.encode_text(texts)
    assert moe_layers(one)[-1][2].last_mask is not None
    with pytest.raises(ValueError, match="keep 1..4"):
        prune_experts(copy.deepcopy(moe), loads, 5)


def test_kept_experts_ties_keep_the_lower_index():
    assert kept_experts([0.2, 0.4, 0.2, 0.2], 2) == [0, 1]
    assert kept_experts([0.1, 0.2, 0.3], 3) == [0, 1, 2]
