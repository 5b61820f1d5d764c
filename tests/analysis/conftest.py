"""An MoE micro CLIP whose experts and routers differ, so expert loads are unequal."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def moe_dir(micro_dir, tmp_path_factory) -> Path:
    import moeclip
    from moeclip.moe import moe_layers
    model, _, _ = moeclip.load(micro_dir)
    moeclip.upcycle(model, None, num_experts=3, top_k=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, layer in moe_layers(model):
            layer.router.proj.weight.copy_(torch.randn(layer.router.proj.weight.shape, generator=g) * 2.0)
            for expert in layer.experts:
                for p in expert.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return moeclip.save_model_dir(model, tmp_path_factory.mktemp("moe") / "model")
