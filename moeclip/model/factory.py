"""Dense CLIP construction: moeclip's own JSON architectures and every open_clip one.

moeclip's small architectures live in `configs/*.json` and are registered with open_clip, so
`open_clip.create_model("moeclip-tiny")` works too. A model remembers the config it was built
from (`model.moeclip_arch`), which is what makes a saved model directory self-describing.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)

Tokenizer = Callable[[list[str]], torch.Tensor]


def model_config(arch: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise ValueError(f"unknown architecture '{arch}'; moeclip ships {known}, and open_clip.list_models() "
                         "lists the rest")
    return copy.deepcopy(cfg)


def build_dense(arch: str, model_cfg: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised dense CLIP from a config dict (the saved one, or the registered one)."""
    cfg = copy.deepcopy(model_cfg) if model_cfg is not None else model_config(arch)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cfg.pop("multimodal_cfg", None)
    model = (CustomTextCLIP if custom_text else CLIP)(**cfg)
    model.moeclip_arch = {"arch": arch, "model_cfg": model_cfg if model_cfg is not None else model_config(arch)}
    return model


def create_open_clip(arch: str, pretrained: str | None, device: str | torch.device | None = None) -> nn.Module:
    """An open_clip architecture with a pretrained tag (hub; needs the network) or a local weights file."""
    if pretrained and Path(pretrained).exists():
        model = build_dense(arch)
        _load_foreign_weights(model, Path(pretrained))
    else:
        cfg = model_config(arch)
        kwargs: dict[str, Any] = {}
        if pretrained:
            quick = pretrained_quick_gelu(arch, pretrained)
            if quick is not None and quick != bool(cfg.get("quick_gelu", False)):
                cfg["quick_gelu"] = quick
                kwargs = {"force_quick_gelu": True} if quick else {"quick_gelu": False}
        model = open_clip.create_model(arch, pretrained=pretrained, **kwargs)
        model.moeclip_arch = {"arch": arch, "model_cfg": cfg, "pretrained": pretrained}
    return model.to(device) if device is not None else model


def pretrained_quick_gelu(arch: str, tag: str) -> bool | None:
    """The activation a pretrained tag was trained with (True = QuickGELU), None when open_clip does not say.

    open_clip 3.x builds an architecture's own activation (nn.GELU for `ViT-B-32`) even for QuickGELU-trained
    weights such as `openai`, and only warns; loading such weights into GELU silently shifts every embedding.
    """
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    quick = tag_cfg.get("quick_gelu")
    return None if quick is None else bool(quick)


def _load_foreign_weights(model: nn.Module, path: Path) -> None:
    """open_clip's loader does the format fix-ups; torch files are read with weights_only=True (no code runs)."""
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load these weights into '{model.moeclip_arch['arch']}' ({e}). "
                         "Check the architecture name matches the checkpoint") from None


def preprocess_for(model: nn.Module) -> Callable:
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    return open_clip.image_transform(model.visual.image_size, is_train=False,
                                     mean=cfg.get("mean"), std=cfg.get("std"))


def tokenizer_for(arch: str, model_cfg: dict[str, Any]) -> Tokenizer:
    """The tokenizer of `text_cfg.context_length` tokens (a stretched model's config says its new length)."""
    ctx = model_cfg.get("text_cfg", {}).get("context_length")
    if open_clip.get_model_config(arch) is not None:
        return open_clip.get_tokenizer(arch, context_length=ctx)
    return open_clip.SimpleTokenizer(context_length=ctx or 77)


def model_tokenizer(model: nn.Module) -> Tokenizer:
    """The tokenizer for a model built or loaded by moeclip, from the config it remembers (`model.moeclip_arch`)."""
    arch = model.moeclip_arch
    return tokenizer_for(arch["arch"], arch["model_cfg"])
