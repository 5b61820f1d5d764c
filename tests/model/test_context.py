"""Long captions: the Long-CLIP stretch of a text tower's positions, its tokenizer, and its saved form."""
import pytest
import torch

import moeclip
from moeclip.model.context import causal_mask, stretch_context, stretched_positions
from moeclip.model.factory import build_dense, model_config, model_tokenizer


def _micro(context: int = 77):
    cfg = model_config("moeclip-micro")
    cfg["text_cfg"]["context_length"] = context
    torch.manual_seed(0)
    return build_dense("moeclip-micro", cfg).eval()


def test_longclip_248_keeps_20_and_interpolates_fourfold():
    model = _micro(77)
    old = model.positional_embedding.detach().clone()
    stretch_context(model, 248)
    new = model.positional_embedding.detach()
    assert new.shape == (248, old.shape[1]) and model.context_length == 248
    assert torch.equal(new[:20], old[:20])  # positions 0-19 exactly as trained
    for i in range(56):  # Long-CLIP's table: four new positions between old ones
        for r in range(4):
            want = (4 - r) / 4 * old[20 + i] + r / 4 * old[21 + i]
            assert torch.allclose(new[20 + 4 * i + r], want, atol=1e-6), (i, r)
    for r in range(4):  # the last four: extrapolated from the last step, as Long-CLIP does
        assert torch.allclose(new[244 + r], old[76] + r / 4 * (old[76] - old[75]), atol=1e-6)
    assert torch.equal(model.attn_mask, causal_mask(248))
    assert model.attn_mask[0, 1] == float("-inf") and model.attn_mask[1, 0] == 0
    assert model.moeclip_arch["model_cfg"]["text_cfg"]["context_length"] == 248
    assert model.positional_embedding.requires_grad


def test_any_target_length_and_bad_lengths():
    table = torch.randn(77, 8)
    same = stretched_positions(table, 77)
    assert torch.allclose(same, table)  # the identity at the same length
    odd = stretched_positions(table, 100)
    assert odd.shape == (100, 8) and torch.equal(odd[:21], table[:21])  # position 20 sits on old 20
    model = _micro(77)
    with pytest.raises(ValueError, match="must be a whole number >= the model's current context length 77"):
        stretch_context(model, 50)
    short = _micro(20)  # shorter than Long-CLIP's kept part: all but the last two kept
    before = short.positional_embedding.detach().clone()
    stretch_context(short, 40)
    assert torch.equal(short.positional_embedding[:18].detach(), before[:18])
    assert short.positional_embedding.shape[0] == 40


def test_long_caption_tail_changes_only_the_stretched_embedding():
    model = _micro(77)
    head = " ".join(f"word{i}" for i in range(60))  # well over 77 tokens before the tail
    a, b = head + " a red cube on the left", head + " a blue ball on the right"
    tok77 = model_tokenizer(model)
    assert tok77([a]).shape[1] == 77
    with torch.no_grad():
        e77 = model.encode_text(tok77([a, b]))
    assert torch.equal(e77[0], e77[1])  # the 77-token model cannot see the tail
    stretch_context(model, 248)
    tok = model_tokenizer(model)
    ids = tok([a, b])
    assert ids.shape[1] == 248 and (ids[0] != 0).sum() > 77
    with torch.no_grad():
        e = model.encode_text(ids)
    assert not torch.allclose(e[0], e[1], atol=1e-4)


def test_saved_stretched_model_reloads_with_its_length(tmp_path):
    model = _micro(77)
    stretch_context(model, 248)
    moeclip.upcycle(model, None, num_experts=2, top_k=1)
    out = moeclip.save_model_dir(model, tmp_path / "m")
    loaded, _, tok = moeclip.load(out)
    assert loaded.positional_embedding.shape[0] == 248 and loaded.attn_mask.shape == (248, 248)
    assert loaded.context_length == 248
    texts = ["short", " ".join(["long"] * 200)]
    ids = tok(texts)
    assert ids.shape == (2, 248)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(ids), model.encode_text(ids), atol=1e-6)
