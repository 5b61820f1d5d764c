"""A pretrained tag is built with the activation its weights were trained with (QuickGELU for OpenAI),
and that choice is saved, so a model directory loads back with the same activation. No weights are fetched:
open_clip's download and checkpoint loading are replaced by local stand-ins."""
import json

import open_clip
import open_clip.factory
import pytest
import torch
from open_clip.transformer import QuickGELU

from moeclip import load, save_model_dir


def _activations(model):
    return {type(blk.mlp.gelu) for blk in [*model.visual.transformer.resblocks, *model.transformer.resblocks]}


def test_openai_tag_builds_quick_gelu(monkeypatch):
    fetched, loaded = [], []
    monkeypatch.setattr(open_clip.factory, "download_pretrained",
                        lambda cfg, cache_dir=None: fetched.append(cfg) or "/nonexistent/ViT-B-32.pt")
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda model, path, **kw: loaded.append(path))
    model, _, _ = load("ViT-B-32:openai")
    assert fetched and fetched[0]["quick_gelu"] is True and loaded == ["/nonexistent/ViT-B-32.pt"]
    assert _activations(model) == {QuickGELU}
    assert model.moeclip_arch["model_cfg"]["quick_gelu"] is True
    assert model.moeclip_arch["pretrained"] == "openai"


def test_quick_gelu_tag_round_trips_through_a_model_dir(micro_dir, tmp_path, monkeypatch):
    from open_clip.pretrained import _PRETRAINED
    monkeypatch.setitem(_PRETRAINED, "moeclip-micro", {"qg": {"url": "", "hf_hub": "", "quick_gelu": True}})
    monkeypatch.setattr(open_clip.factory, "download_pretrained",
                        lambda cfg, cache_dir=None: str(micro_dir / "model.safetensors"))
    model, _, tok = load("moeclip-micro", pretrained="qg")
    dense, _, _ = load(micro_dir)
    assert _activations(model) == {QuickGELU} and _activations(dense) == {torch.nn.GELU}
    img, txt = torch.randn(2, 3, 32, 32), tok(["a red circle", "a blue square"])
    with torch.no_grad():
        ref = model.encode_image(img), model.encode_text(txt)
        assert not torch.allclose(ref[0], dense.encode_image(img))  # same weights, other activation

    save_model_dir(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_cfg"]["quick_gelu"] is True
    back, _, _ = load(tmp_path / "m")
    assert _activations(back) == {QuickGELU}
    with torch.no_grad():
        assert torch.equal(ref[0], back.encode_image(img)) and torch.equal(ref[1], back.encode_text(txt))


def test_tag_without_activation_keeps_the_config(micro_dir, monkeypatch):
    from open_clip.pretrained import _PRETRAINED
    monkeypatch.setitem(_PRETRAINED, "moeclip-micro", {"plain": {"url": "", "hf_hub": ""}})
    monkeypatch.setattr(open_clip.factory, "download_pretrained",
                        lambda cfg, cache_dir=None: str(micro_dir / "model.safetensors"))
    model, _, _ = load("moeclip-micro", pretrained="plain")
    assert _activations(model) == {torch.nn.GELU} and "quick_gelu" not in model.moeclip_arch["model_cfg"]
