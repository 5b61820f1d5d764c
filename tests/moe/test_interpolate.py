"""WiSE-FT against the base: the MoE at alpha 0 computes what the base does, at 1 what it was trained to."""
import copy

import pytest
import torch

from moeclip.moe import upcycle
from moeclip.moe.interpolate import base_name, interpolate_with_base


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every float weight moved, routers and fusion gates included, as a fine-tune would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _outputs(model, images, texts):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def test_base_name_maps_experts_and_shared_to_the_dense_ffn():
    assert base_name("visual.transformer.resblocks.1.mlp.experts.3.c_fc.weight") == \
        "visual.transformer.resblocks.1.mlp.c_fc.weight"
    assert base_name("transformer.resblocks.0.mlp.shared.c_proj.bias") == "transformer.resblocks.0.mlp.c_proj.bias"
    assert base_name("transformer.resblocks.0.attn.in_proj_weight") == "transformer.resblocks.0.attn.in_proj_weight"


@pytest.mark.parametrize("shared", [False, True])
def test_moe_at_alpha_zero_is_the_base(tiny_clip, images, texts, shared):
    base = tiny_clip()
    tuned = _perturbed(upcycle(copy.deepcopy(base), num_experts=4, top_k=2, shared_expert=shared), seed=3)
    router = {n: p.clone() for n, p in tuned.named_parameters() if ".router." in n or ".fusion." in n}
    interpolate_with_base(tuned, base, 0.0)
    for a, b in zip(_outputs(tuned, images, texts), _outputs(base, images, texts)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for n, p in tuned.named_parameters():  # the router is new: nothing to pull it towards
        if n in router:
            torch.testing.assert_close(p, router[n])


def test_alpha_one_keeps_the_model_and_half_is_the_midpoint(tiny_clip, images, texts):
    base = tiny_clip()
    tuned = _perturbed(upcycle(copy.deepcopy(base), num_experts=3, top_k=2), seed=4)
    before = _outputs(tuned, images, texts)
    for a, b in zip(_outputs(interpolate_with_base(copy.deepcopy(tuned), base, 1.0), images, texts), before):
        torch.testing.assert_close(a, b)
    half = interpolate_with_base(copy.deepcopy(tuned), base, 0.5).state_dict()
    key = "visual.transformer.resblocks.0.mlp.experts.2.c_fc.weight"
    want = 0.5 * (tuned.state_dict()[key] + base.state_dict()[base_name(key)])
    torch.testing.assert_close(half[key], want)
    assert not torch.equal(half[key], tuned.state_dict()[key])


def test_dense_fine_tune_interpolates_every_weight(tiny_clip, images, texts):
    base = tiny_clip()
    tuned = _perturbed(copy.deepcopy(base), seed=5)
    quarter = interpolate_with_base(copy.deepcopy(tuned), base, 0.25)
    for name, value in quarter.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * base.state_dict()[name] + 0.25 * tuned.state_dict()[name])


def test_refuses_a_foreign_base_and_a_bad_alpha(tiny_clip):
    from open_clip.model import CLIP
    tuned = upcycle(tiny_clip(), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_with_base(tuned, tiny_clip(), 1.5)
    wider = CLIP(embed_dim=32, vision_cfg={"image_size": 16, "patch_size": 4, "width": 48, "layers": 2,
                                           "head_width": 16},
                 text_cfg={"context_length": 12, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2})
    with pytest.raises(ValueError, match="not the base"):
        interpolate_with_base(tuned, wider, 0.5)
    deeper = CLIP(embed_dim=32, vision_cfg={"image_size": 16, "patch_size": 4, "width": 32, "layers": 3,
                                            "head_width": 16},
                  text_cfg={"context_length": 12, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2})
    with pytest.raises(ValueError, match="lacks"):
        interpolate_with_base(tuned, deeper, 0.5)
