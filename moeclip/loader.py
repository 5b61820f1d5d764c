"""The front door: `moeclip.load` for open_clip models and moeclip model directories.

A moeclip model directory is `config.json` (architecture, full model config, MoE layout) plus
`model.safetensors`. config.json is written last, so its presence means the directory is whole.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moeclip import io
from moeclip.model.factory import (Tokenizer, build_dense, create_open_clip, model_config, preprocess_for,
                                   tokenizer_for)

FORMAT = "moeclip-model"
FORMAT_VERSION = 1
CLIP_MOE_SUFFIXES = (".pt", ".pth")  # torch files in the CLIP-MoE authors' layout (moeclip.model.clip_moe_layout)


def load(name_or_path: str | os.PathLike, pretrained: str | None = None,
         device: str | torch.device | None = None, top_k: int | None = None) -> tuple[nn.Module, Callable, Tokenizer]:
    """Return (model in eval mode, preprocess, tokenizer); `device` None leaves the weights in host memory.

    Accepts a moeclip model directory (dense or MoE), `ARCH:TAG` / `ARCH` + `pretrained=TAG`
    (an open_clip pretrained tag; needs the network), `ARCH` + `pretrained=FILE`, or a CLIP-MoE
    release file (`clip-moe-4-2-sharegpt4v.pt`; `top_k` experts per token, default 2).
    """
    path = Path(name_or_path)
    if top_k is not None and not (path.is_file() and path.suffix in CLIP_MOE_SUFFIXES):
        raise ValueError(f"{path}: top_k applies to a CLIP-MoE checkpoint file ({', '.join(CLIP_MOE_SUFFIXES)})")
    if path.is_dir():
        model = load_model_dir(path, device)
    elif path.is_file() and path.suffix in CLIP_MOE_SUFFIXES:
        from moeclip.model.clip_moe_layout import load_clip_moe
        model = load_clip_moe(path, top_k=top_k, device=device)
    elif path.suffix in (".json", ".safetensors") or path.exists():
        raise ValueError(f"{path}: expected a moeclip model directory (config.json + model.safetensors), "
                         "a CLIP-MoE .pt file, or an architecture name such as 'ViT-B-32:openai'")
    elif "/" in str(name_or_path) or "\\" in str(name_or_path) or str(name_or_path).startswith("."):
        raise FileNotFoundError(f"{path}: no such model directory or checkpoint file")
    else:
        arch, _, tag = str(name_or_path).partition(":")
        model_config(arch)  # unknown names fail here, with the list of what exists
        model = create_open_clip(arch, pretrained or tag or None, device)
    model.eval()
    arch_info = model.moeclip_arch
    return model, preprocess_for(model), tokenizer_for(arch_info["arch"], arch_info["model_cfg"])


def load_model_dir(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path}: no config.json; not a moeclip model directory (or an unfinished one)")
    cfg = io.read_json(cfg_path)
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: 'format' is {cfg.get('format')!r}, expected {FORMAT!r}")
    for key in ("arch", "model_cfg"):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing key '{key}'")
    model = build_dense(cfg["arch"], cfg["model_cfg"])
    if cfg.get("moe"):
        from moeclip.moe import build_moe
        build_moe(model, cfg["moe"])
    state = io.load_tensors(path / "model.safetensors")
    load_state_strict(model, state, path / "model.safetensors")
    model.moeclip_dir_config = cfg
    return model.to(device) if device is not None else model


def save_model_dir(model: nn.Module, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Weights first, config.json last; both atomic."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = model.moeclip_arch
    moe = None
    from moeclip.moe import moe_config, moe_layers
    if moe_layers(model):
        moe = moe_config(model)
    io.save_tensors(out / "model.safetensors", model.state_dict(), metadata={"format": FORMAT})
    io.write_json(out / "config.json", {"format": FORMAT, "format_version": FORMAT_VERSION,
                                        "arch": arch["arch"], "model_cfg": arch["model_cfg"],
                                        "moe": moe, **(extra or {})})
    return out


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], where: Path | str,
                      reshape_same_numel: bool = False) -> None:
    """Load every key or fail naming the first mismatch. `reshape_same_numel` accepts 1-element
    stand-ins of 0-dim parameters (DeepSpeed cannot broadcast a 0-dim `logit_scale`)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise ValueError(f"{where}: weights do not match the architecture ({what}; {len(missing)} missing, "
                         f"{len(unexpected)} unexpected). Were they written for another architecture?")
    state = dict(state)
    for k, v in state.items():
        if own[k].shape != v.shape:
            if reshape_same_numel and v.numel() == own[k].numel():
                state[k] = v.reshape(own[k].shape)
                continue
            raise ValueError(f"{where}: '{k}' has shape {tuple(v.shape)}, the architecture expects "
                             f"{tuple(own[k].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
