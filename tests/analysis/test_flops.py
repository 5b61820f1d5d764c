"""FLOPs counted from the real forward: top-2 MoE layers cost two FFNs a token, router-only training less."""
import copy

import pytest

from moeclip import load
from moeclip.analysis.flops import inference_flops, train_flops_per_pair
from moeclip.model.ffn import ffn_param_names
from moeclip.moe import set_trainable, upcycle


@pytest.fixture(scope="module")
def base_tiny():
    return load("checkpoints/base-tiny")[0].eval()


def _ffn_flops_per_token(model) -> int:
    mlp = model.visual.transformer.resblocks[0].mlp
    return 2 * 2 * mlp.c_fc.in_features * mlp.c_fc.out_features  # c_fc + c_proj, 2 FLOPs a multiply-add


def test_top_k_experts_each_cost_one_ffn(base_tiny):
    dense = inference_flops(base_tiny)
    moe = upcycle(copy.deepcopy(base_tiny), num_experts=4, top_k=2, towers=("visual",))
    top1 = upcycle(copy.deepcopy(base_tiny), num_experts=4, top_k=1, towers=("visual",))
    blocks = len(base_tiny.visual.transformer.resblocks)
    size = base_tiny.visual.image_size
    tokens = (size[0] // base_tiny.visual.patch_size[0]) ** 2 + 1
    router = 2 * base_tiny.visual.transformer.width * 4 * tokens * blocks
    extra_ffn = _ffn_flops_per_token(base_tiny) * tokens * blocks
    assert inference_flops(top1)["image"] == dense["image"] + router
    combine = 2 * 2 * base_tiny.visual.transformer.width * tokens * blocks  # weighting the 2 outputs a token
    assert inference_flops(moe)["image"] == dense["image"] + router + extra_ffn + combine
    assert inference_flops(moe)["caption"] == dense["caption"]  # the text tower stayed dense


def test_router_only_training_costs_less_than_training_experts(base_tiny):
    moe = upcycle(copy.deepcopy(base_tiny), num_experts=4, top_k=2)
    forward = sum(inference_flops(moe).values())
    router = train_flops_per_pair(moe, set_trainable(moe, "router"))
    experts = train_flops_per_pair(moe, set_trainable(moe, "router+experts"))
    assert forward < router < experts < 3.5 * forward
    dense_ffn = train_flops_per_pair(base_tiny, ffn_param_names(base_tiny))
    assert sum(inference_flops(base_tiny).values()) < dense_ffn < 3 * sum(inference_flops(base_tiny).values())
    assert all(p.requires_grad for p in base_tiny.parameters())  # restored
