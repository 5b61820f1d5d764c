"""Where the FFNs of an open_clip CLIP live, and how to take them out and put them back.

An FFN weight set is a plain dict keyed by the dense model's own state-dict names
(`visual.transformer.resblocks.3.mlp.c_fc.weight`, ...): self-describing, and loadable
into the dense model with `load_state_dict(strict=False)`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

TOWERS = ("visual", "text")
FFN_PARTS = ("c_fc", "c_proj")


def tower_prefix(model: nn.Module, tower: str) -> str:
    """State-dict prefix of a tower's block list (CLIP keeps text blocks at top level)."""
    if tower == "visual":
        if not hasattr(getattr(model.visual, "transformer", None), "resblocks"):
            raise ValueError("the image tower has no transformer blocks (ResNet/timm towers are not supported)")
        return "visual.transformer.resblocks"
    if tower == "text":
        if hasattr(model, "transformer") and hasattr(model.transformer, "resblocks"):
            return "transformer.resblocks"
        if hasattr(model, "text") and hasattr(getattr(model.text, "transformer", None), "resblocks"):
            return "text.transformer.resblocks"
        raise ValueError("the text tower has no transformer blocks (HF text towers are not supported)")
    raise ValueError(f"unknown tower {tower!r}; expected one of {TOWERS}")


def tower_blocks(model: nn.Module, tower: str) -> nn.ModuleList:
    return model.get_submodule(tower_prefix(model, tower))


def select_blocks(n_blocks: int, blocks: Sequence[int] | None) -> list[int]:
    """None = all blocks; negative indices count from the end (e.g. [-2, -1] = last two)."""
    if blocks is None:
        return list(range(n_blocks))
    out = []
    for b in blocks:
        i = b + n_blocks if b < 0 else b
        if not 0 <= i < n_blocks:
            raise ValueError(f"block index {b} out of range for a tower of {n_blocks} blocks")
        out.append(i)
    return sorted(set(out))


def ffn_param_names(model: nn.Module, towers: Iterable[str] = TOWERS,
                    blocks: Sequence[int] | None = None) -> list[str]:
    names = []
    for tower in towers:
        prefix = tower_prefix(model, tower)
        for i in select_blocks(len(tower_blocks(model, tower)), blocks):
            for part in FFN_PARTS:
                for kind in ("weight", "bias"):
                    names.append(f"{prefix}.{i}.mlp.{part}.{kind}")
    return names


def ffn_state_dict(model: nn.Module, towers: Iterable[str] = TOWERS,
                   blocks: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """A copy in host memory, fp32-or-as-trained: weight sets are handed between steps (stage -> upcycling ->
    distance reports -> files), so they live where every reader can take them, not on one stage's GPU."""
    state = model.state_dict()
    return {n: state[n].detach().to("cpu", copy=True) for n in ffn_param_names(model, towers, blocks)}


def load_ffn_state_dict(model: nn.Module, ffn: dict[str, torch.Tensor]) -> None:
    """Put an FFN weight set back into a dense model; every key must exist with the same shape."""
    state = model.state_dict()
    for name, value in ffn.items():
        if name not in state:
            raise ValueError(f"FFN weight '{name}' does not exist in this model (another architecture?)")
        if state[name].shape != value.shape:
            raise ValueError(f"FFN weight '{name}': shape {tuple(value.shape)} != model's {tuple(state[name].shape)}")
    with torch.no_grad():
        for name, value in ffn.items():
            model.get_parameter(name).copy_(value)


def ffn_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative L2 distance ||a - b|| / ||b|| over all FFN weights: how far two multiplets are apart."""
    num = sum(float((a[k].float().cpu() - b[k].float().cpu()).pow(2).sum()) for k in b)
    den = sum(float(b[k].float().cpu().pow(2).sum()) for k in b)
    return (num / max(den, 1e-30)) ** 0.5


def ffn_digest(ffn: dict[str, torch.Tensor]) -> str:
    """A content hash, so a resumed run can tell whether its stages came from the same base weights."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(ffn):
        h.update(name.encode())
        h.update(ffn[name].detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
