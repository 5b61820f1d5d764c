"""Tiny open_clip models for the MoE tests (milliseconds per forward on CPU)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # open_clip must never wait on the hub in tests

from typing import Callable

import open_clip
import pytest
import torch
from torch import nn

VISION_CFG = {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16}
TEXT_CFG = {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2}


def _tiny_clip(seed: int = 0, quick_gelu: bool = False, custom_text: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    cls = open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP
    return cls(embed_dim=32, vision_cfg=dict(VISION_CFG), text_cfg=dict(TEXT_CFG), quick_gelu=quick_gelu).eval()


@pytest.fixture
def tiny_clip() -> Callable[..., nn.Module]:
    return _tiny_clip


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def texts() -> torch.Tensor:
    """Token ids with open_clip's padding (0) after a varying number of real tokens."""
    ids = torch.randint(1, 100, (4, TEXT_CFG["context_length"]), generator=torch.Generator().manual_seed(2))
    for row, length in enumerate((12, 7, 4, 9)):
        ids[row, length:] = 0
    return ids
