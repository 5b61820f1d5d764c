"""Drop-Upcycling: exactly `ratio` of each expert's hidden units re-drawn, the rest the dense FFN's."""
import copy

import pytest
import torch

from moeclip.moe import moe_layers, upcycle
from moeclip.moe.drop import drop_reinit


def test_drop_redraws_ratio_of_units_per_expert(tiny_clip):
    dense = tiny_clip()
    moe = upcycle(copy.deepcopy(dense), num_experts=4, top_k=2)
    _, block, layer = moe_layers(moe)[0]
    mlp = dense.visual.transformer.resblocks[block].mlp
    hidden = mlp.c_fc.out_features
    dropped = drop_reinit(layer, 0.5, torch.Generator().manual_seed(0))
    for expert, units in zip(layer.experts, dropped):
        assert units.numel() == hidden // 2
        changed = (expert.c_fc.weight != mlp.c_fc.weight).any(dim=1)
        assert torch.equal(changed.nonzero().flatten().sort().values, units.sort().values)
        keep = ~changed
        assert torch.equal(expert.c_proj.weight[:, keep], mlp.c_proj.weight[:, keep])
        assert torch.equal(expert.c_proj.bias, mlp.c_proj.bias)  # output bias: not a hidden unit
        redrawn = expert.c_fc.weight[units]
        assert abs(float(redrawn.std() / mlp.c_fc.weight.std()) - 1) < 0.2
    assert not torch.equal(dropped[0].sort().values, dropped[1].sort().values)  # each expert its own units


def test_upcycle_drop_ratio_zero_is_copy_upcycling(tiny_clip, images):
    dense = tiny_clip()
    plain = upcycle(copy.deepcopy(dense), num_experts=4, top_k=2, drop_ratio=0.0)
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), dense.encode_image(images), atol=1e-5, rtol=1e-5)
    dropped = upcycle(copy.deepcopy(dense), num_experts=4, top_k=2, drop_ratio=0.5)
    with torch.no_grad():
        assert not torch.allclose(dropped.encode_image(images), dense.encode_image(images), atol=1e-3)
    with pytest.raises(ValueError, match="drop ratio"):
        drop_reinit(moe_layers(dropped)[0][2], 1.5)
