"""Upcycling a dense CLIP: exactness of copy-upcycling, expert placement, errors, rebuild."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from moeclip.model.ffn import ffn_state_dict
from moeclip.moe import MoEFFN, build_moe, expert_ffn_state_dict, moe_config, moe_layers, upcycle


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dispatch", ["sorted", "loop"])
def test_moe_forward_vs_dense(tiny_clip, images, texts, top_k, dispatch):
    dense = tiny_clip(quick_gelu=True)
    moe = upcycle(copy.deepcopy(dense), num_experts=4, top_k=top_k, router_init_std=1.0)
    for _, _, layer in moe_layers(moe):
        layer.dispatch = dispatch
        assert torch.count_nonzero(layer.router.proj.weight) > 0
    with torch.no_grad():
        torch.testing.assert_close(moe.encode_image(images), dense.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moe.encode_text(texts), dense.encode_text(texts), atol=1e-5, rtol=1e-5)
    # routing really spread tokens over several experts, so the equality is not trivial
    used = torch.cat([layer.last_routing.experts.reshape(-1) for _, _, layer in moe_layers(moe)]).unique()
    assert used.numel() > top_k


def _perturbed_sets(model, n: int) -> list[dict[str, torch.Tensor]]:
    base = ffn_state_dict(model)
    return [{k: v + 0.1 * (i + 1) * torch.randn_like(v) for k, v in base.items()} for i in range(n)]


def test_distinct_expert_sets_land_in_their_experts(tiny_clip, images, texts):
    model = tiny_clip()
    sets = _perturbed_sets(model, 3)
    upcycle(model, experts=sets, top_k=2, layers=[-1])
    assert [(t, i) for t, i, _ in moe_layers(model)] == [("visual", 1), ("text", 1)]
    assert not isinstance(model.visual.transformer.resblocks[0].mlp, MoEFFN)
    for tower, block, layer in moe_layers(model):
        prefix = "visual.transformer.resblocks" if tower == "visual" else "transformer.resblocks"
        assert layer.num_experts == 3
        for i, expert in enumerate(layer.experts):
            for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
                want = sets[i][f"{prefix}.{block}.mlp.{name}"]
                assert torch.equal(expert.get_parameter(name), want)
    out = expert_ffn_state_dict(model, 2)
    key = "transformer.resblocks.1.mlp.c_proj.weight"
    assert set(out) == {k for k in sets[2] if ".1.mlp." in k} and torch.equal(out[key], sets[2][key])
    model(images, texts)


def test_bad_expert_sets_raise_naming_key_and_expert(tiny_clip):
    model = tiny_clip()
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    sets = _perturbed_sets(model, 2)
    sets[1][key] = sets[1][key][:, :-1]
    with pytest.raises(ValueError, match=rf"expert 1.*{key}"):
        upcycle(model, experts=sets)
    assert moe_layers(model) == []  # a failed upcycle leaves the model untouched
    sets = _perturbed_sets(model, 2)
    del sets[0]["visual.transformer.resblocks.1.mlp.c_proj.bias"]
    with pytest.raises(ValueError, match=r"expert 0.*visual\.transformer\.resblocks\.1\.mlp\.c_proj\.bias"):
        upcycle(model, experts=sets)
    with pytest.raises(ValueError, match="num_experts"):
        upcycle(model, experts=_perturbed_sets(model, 2), num_experts=4)
    upcycle(model, num_experts=2, top_k=1, layers=[0])
    with pytest.raises(ValueError, match="already"):
        upcycle(model, num_experts=2, top_k=1, layers=[0])


def test_build_moe_and_load_state_dict_round_trip(tiny_clip, images, texts):
    model = tiny_clip(seed=0)
    upcycle(model, experts=_perturbed_sets(model, 3), top_k=2, layers=[1], towers=("text",), router_init_std=1.0)
    upcycle(model, num_experts=3, top_k=2, layers=[0, 1], towers=("visual",), router_init_std=1.0)
    cfg = json.loads(json.dumps(moe_config(model)))
    assert cfg == {"num_experts": 3, "top_k": 2, "jitter": 0.0, "layers": {"visual": [0, 1], "text": [1]}}

    fresh = build_moe(tiny_clip(seed=123), cfg)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(images), model.encode_image(images))
        assert torch.equal(fresh.encode_text(texts), model.encode_text(texts))
    assert torch.equal(moe_layers(fresh)[-1][2].last_mask, (texts != 0).reshape(-1))  # hook rebuilt too


def test_custom_text_clip_hook_uses_text_tower(tiny_clip, texts):
    model = upcycle(tiny_clip(custom_text=True), num_experts=2, top_k=1, router_init_std=1.0)
    assert [t for t, _, _ in moe_layers(model)].count("text") == 2
    model.encode_text(texts)
    text_layer = model.text.transformer.resblocks[0].mlp
    assert torch.equal(text_layer.last_mask, (texts != model.text.pad_id).reshape(-1))


def _chosen_sets(model, images) -> set[tuple[int, ...]]:
    with torch.no_grad():
        model.encode_image(images)
    return {tuple(sorted(row.tolist())) for tower, _, layer in moe_layers(model) if tower == "visual"
            for row in layer.last_routing.experts}


def test_zero_gate_ties_every_token_and_the_default_does_not(tiny_clip, images):
    """The defect the default fixes: with an all-zero gate every token of every layer takes the same top-k
    experts; the default small random gate spreads them from the first step."""
    zero = upcycle(tiny_clip(), num_experts=4, top_k=2, router_init_std=0.0)
    assert len(_chosen_sets(zero, images)) == 1
    default = upcycle(tiny_clip(), num_experts=4, top_k=2)
    std = torch.cat([layer.router.proj.weight.flatten() for _, _, layer in moe_layers(default)]).std()
    assert 0.015 < float(std) < 0.025
    assert len(_chosen_sets(default, images)) > 1


def test_pipeline_router_init_depends_on_the_seed_only(tiny_clip):
    """A run resumed after MCL (no RNG used by training) starts its routers where a fresh run did."""
    from moeclip.pipeline.dmu import DMUConfig, _upcycled
    base, cfg = tiny_clip(), DMUConfig()
    a = _upcycled(base, None, 4, cfg)
    torch.rand(1000)  # what an MCL stage's training would have drawn
    b = _upcycled(base, None, 4, cfg)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    assert torch.count_nonzero(moe_layers(a)[0][2].router.proj.weight) > 0
