"""The novelty-gated shared expert: the gate tells training-like samples from others, a gated sample gets the
base FFN exactly, and the gate is saved and rebuilt with the model."""
import copy

import pytest
import torch

from moeclip.moe import MoEFFN, build_moe, moe_config, moe_layers, set_trainable, upcycle
from moeclip.moe.novelty import NoveltyGate, novelty_gates


def _clouds(n: int, L: int = 6, d: int = 16, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    """n samples of L tokens around 4 directions (+ `shift` along one more axis: a different domain)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d)[:4] * 3
    tokens = centres[torch.randint(0, 4, (n, L), generator=g)] + 0.3 * torch.randn(n, L, d, generator=g)
    tokens[..., 5] += shift
    return tokens


def test_gate_opens_for_training_like_samples_and_closes_for_others():
    gate = NoveltyGate(width=16, clusters=8)
    fitted = gate.fit(_clouds(500), seed=0, quantile=0.99)
    assert fitted["held_out"] == 100 and fitted["clusters"] == 8
    same, other = gate(_clouds(300, seed=1)), gate(_clouds(300, seed=2, shift=3.0))
    assert (same > 0.5).float().mean() < 0.05  # ~1% by the quantile; held-out scores make it unbiased
    assert (other > 0.5).float().mean() > 0.95
    # one novel token is enough to make a sample novel (the sample's score is its most novel token's)
    mixed = _clouds(50, seed=3)
    mixed[:, 0, 5] += 3.0
    assert (gate(mixed) > 0.5).float().mean() > 0.95


def test_gate_fit_with_few_tokens_uses_fewer_centroids_and_refuses_too_few_samples():
    gate = NoveltyGate(width=16, clusters=64)
    assert gate.fit(_clouds(120, L=2), seed=0)["clusters"] == 48  # 96 samples x 2 tokens / 4
    with pytest.raises(ValueError, match="at least 100 training samples"):
        NoveltyGate(16, 4).fit(_clouds(50))
    with pytest.raises(ValueError, match="quantile"):
        NoveltyGate(16, 4).fit(_clouds(200), quantile=1.0)


def test_sample_gate_picks_shared_or_routed_per_sample(tiny_clip):
    mlp = tiny_clip().visual.transformer.resblocks[0].mlp
    layer = MoEFFN.from_dense(mlp, num_experts=2, top_k=1, shared_expert=True, shared_gate="novelty")
    assert layer.fusion is None
    with torch.no_grad():
        for e in layer.experts:
            e.c_proj.bias.add_(1.0)  # routed output = shared output + 1
    x = torch.randn(3, 5, mlp.c_fc.in_features)
    layer.sample_gate = torch.tensor([[1.0], [0.0], [0.25]])  # [B, 1]: batch-first blocks
    with torch.no_grad():
        out, dense = layer(x), mlp(x)
    torch.testing.assert_close(out[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], dense[1] + 1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], dense[2] + 0.75, atol=1e-5, rtol=1e-5)
    layer.sample_gate = None
    with pytest.raises(RuntimeError, match="novelty-gated"):
        layer(x)


def _fitted_moe(tiny_clip, images, texts):
    """Drop-style MoE with a novelty-gated shared expert, gates fitted on `images`/`texts` repeated with noise."""
    dense = tiny_clip()
    moe = upcycle(copy.deepcopy(dense), num_experts=3, top_k=2, shared_expert=True, shared_gate="novelty",
                  novelty_clusters=16, drop_ratio=0.5)
    captured = {}
    for name, gate in novelty_gates(moe).items():
        norm = moe.get_submodule(name.rsplit(".", 1)[0]).resblocks[0].ln_2
        captured[name] = norm.register_forward_hook(lambda m, a, o, name=name: captured.__setitem__(name + "!", o))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.encode_image(images.repeat(40, 1, 1, 1) + 0.05 * torch.randn(160, *images.shape[1:], generator=g))
        moe.encode_text(texts.repeat(40, 1))
    for name, gate in novelty_gates(moe).items():
        captured[name].remove()
        gate.fit(captured[name + "!"], seed=0)
    return dense, moe


def test_novel_images_get_the_base_tower_exactly(tiny_clip, images, texts):
    dense, moe = _fitted_moe(tiny_clip, images, texts)
    assert set(novelty_gates(moe)) == {"visual.transformer.novelty_gate", "transformer.novelty_gate"}
    far = images.flip(-1) * 4 + 2  # not like the fitted images
    with torch.no_grad():
        torch.testing.assert_close(moe.encode_image(far), dense.encode_image(far), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(moe.encode_image(images), dense.encode_image(images), atol=1e-3)
    assert all(float(layer.sample_gate.max()) < 0.5 for t, _, layer in moe_layers(moe) if t == "visual")


def test_config_round_trip_keeps_the_fitted_gate(tiny_clip, images, texts):
    _, moe = _fitted_moe(tiny_clip, images, texts)
    cfg = moe_config(moe)
    assert cfg["shared_gate"] == "novelty" and cfg["novelty_clusters"] == 16
    rebuilt = build_moe(tiny_clip(), cfg)
    rebuilt.load_state_dict(moe.state_dict())  # strict: gate buffers included
    twin = copy.deepcopy(rebuilt)  # the hooks follow the copy's gates and layers
    probe = torch.cat([images, images.flip(-1) * 4 + 2])
    with torch.no_grad():
        torch.testing.assert_close(twin.encode_image(probe), moe.encode_image(probe))
        torch.testing.assert_close(twin.encode_text(texts), moe.encode_text(texts))
    assert not any(".fusion." in n for n in set_trainable(moe, "router+experts", freeze_shared=True))
    with pytest.raises(ValueError, match="shared_expert=True"):
        upcycle(tiny_clip(), num_experts=2, top_k=1, shared_gate="novelty")


def test_gate_flops_are_counted(tiny_clip):
    """The gate's distance matmul is in the inference FLOPs (as one matmul FlopCounterMode sees), and the learned
    gate's fusion layers are not there to count."""
    from moeclip.analysis.flops import inference_flops
    learned = upcycle(tiny_clip(), num_experts=2, top_k=1, shared_expert=True)
    gated = upcycle(tiny_clip(), num_experts=2, top_k=1, shared_expert=True, shared_gate="novelty",
                    novelty_clusters=16)
    tokens, width, blocks = 17, 32, 2  # 16 patches + class token; the tiny tower's width and depth
    gate = 2 * tokens * 16 * width
    fusion = blocks * 2 * tokens * width
    assert inference_flops(gated)["image"] - inference_flops(learned)["image"] == gate - fusion


def test_wise_ft_keeps_the_fitted_gate(tiny_clip, images, texts):
    """WiSE-FT pulls experts and the shared expert towards the base; the gate's statistics have no base value."""
    from moeclip.moe.interpolate import interpolate_with_base
    dense, moe = _fitted_moe(tiny_clip, images, texts)
    before = {k: v.clone() for k, v in moe.state_dict().items() if ".novelty_gate." in k}
    interpolate_with_base(moe, dense, 0.5)
    after = moe.state_dict()
    assert before and all(torch.equal(after[k], v) for k, v in before.items())
