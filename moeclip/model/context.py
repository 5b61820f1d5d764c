"""Longer text context for any open_clip text tower, the Long-CLIP way (keep the first positions, stretch the rest).

A CLIP trained on 77 tokens never sees the rest of a long caption (ShareGPT4V's average ~170 tokens). Long-CLIP
keeps the first 20 position embeddings as they are (short captions still look the way they were trained) and
linearly interpolates the remaining 57 four-fold to reach 248 = 20 + 4 x 57 (the last few positions are
extrapolated from the last step, as Long-CLIP does). Here the stretch is general: new position `keep + j` sits at
`keep + j * (L - keep) / (T - keep)` of the old table, so L=77 -> T=248 is exactly Long-CLIP's table and T=L is
the identity. The causal mask is rebuilt for the new length, and the model's config remembers the new
`text_cfg.context_length`, so a saved model directory rebuilds the stretched shape and a tokenizer of that length.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

KEEP_POSITIONS = 20  # Long-CLIP: positions 0-19 are kept as trained

log = logging.getLogger(__name__)


def kept_positions(current: int) -> int:
    """Positions kept as they are: 20, or all but the last two when the context is shorter than 22
    (interpolation needs at least two positions to draw from)."""
    return max(0, min(KEEP_POSITIONS, current - 2))


def stretched_positions(table: torch.Tensor, length: int, keep: int | None = None) -> torch.Tensor:
    """A [length, d] position table from a [L, d] one: rows 0..keep-1 copied, the rest linearly interpolated
    (and past the last row, linearly extrapolated from the last two rows, as Long-CLIP does)."""
    current = table.shape[0]
    keep = kept_positions(current) if keep is None else keep
    if length < current:
        raise ValueError(f"context length {length} is shorter than the model's {current}; only stretching is "
                         "supported")
    if current - keep < 2:
        raise ValueError(f"a {current}-position table keeping {keep} has fewer than two positions to interpolate")
    src = table.detach().float()
    j = torch.arange(length - keep, dtype=torch.float64)
    coord = keep + j * (current - keep) / (length - keep)
    low = coord.floor().long().clamp(max=current - 2)
    frac = (coord - low).to(torch.float32)[:, None]
    rest = src[low] * (1 - frac) + src[low + 1] * frac
    return torch.cat([src[:keep], rest]).to(table.dtype)


def causal_mask(length: int) -> torch.Tensor:
    """open_clip's additive causal mask (-inf above the diagonal)."""
    return torch.full((length, length), float("-inf")).triu_(1)


def _text_owner(model: nn.Module) -> nn.Module:
    """The module holding the text tower's position table: the CLIP itself, or `model.text` (CustomTextCLIP)."""
    for owner in (model, getattr(model, "text", None)):
        if isinstance(getattr(owner, "positional_embedding", None), nn.Parameter) and hasattr(owner, "token_embedding"):
            return owner
    raise ValueError(f"{type(model).__name__}: no open_clip text transformer with a 'positional_embedding' "
                     "(Hugging Face text towers keep their own positions); cannot change its context length")


@torch.no_grad()
def stretch_context(model: nn.Module, length: int) -> nn.Module:
    """Stretch the text tower of `model` (in place) to `length` positions; returns the model.

    Afterwards `model.context_length == length`, the causal mask has that size, and `model.moeclip_arch`
    (when present) says `text_cfg.context_length = length`, so `tokenizer_for` and `save_model_dir` follow.
    """
    owner = _text_owner(model)
    old = owner.positional_embedding
    current = old.shape[0]
    if getattr(owner, "cls_emb", None) is not None:
        raise ValueError("the text tower has a class token (CoCa style); stretching its context is not supported")
    if not isinstance(length, int) or isinstance(length, bool) or length < current:
        raise ValueError(f"model.context_length={length!r}: must be a whole number >= the model's current context "
                         f"length {current}")
    if length > current:
        keep = kept_positions(current)
        new = nn.Parameter(stretched_positions(old.data, length, keep), requires_grad=old.requires_grad)
        owner.positional_embedding = new
        if owner is not model and getattr(model, "positional_embedding", None) is old:
            model.positional_embedding = new
        for holder in {id(m): m for m in (model, owner)}.values():
            if getattr(holder, "attn_mask", None) is not None:
                holder.attn_mask = causal_mask(length).to(holder.attn_mask.device)
        if hasattr(owner, "num_pos"):
            owner.num_pos = length
        log.info("text context stretched from %d to %d positions (first %d kept, the rest interpolated)",
                 current, length, keep)
    for holder in (model, owner):
        if hasattr(holder, "context_length"):
            holder.context_length = length
    arch = getattr(model, "moeclip_arch", None)
    if arch is not None:
        arch = copy.deepcopy(arch)
        arch["model_cfg"].setdefault("text_cfg", {})["context_length"] = length
        if length > current:
            arch.setdefault("stretched_from", current)  # in memory only: MCL's resume check reads it
        model.moeclip_arch = arch
    return model
