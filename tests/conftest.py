"""Shared fixtures: a small synthetic corpus and a micro CLIP saved as a moeclip model directory."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the model hub in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from moeclip.data.synth import SynthSpec, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def load_bench(monkeypatch):
    """Imports a bench/ script as a module (bench/ is not a package): load_bench("study_tables"). bench/ goes on
    sys.path, as when the script runs, so its `from common import ...` resolves."""
    import importlib.util
    monkeypatch.syspath_prepend(str(REPO / "bench"))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("corpus")
    return write_corpus(out, SynthSpec(train=256, val=64, seed=3))


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory) -> Path:
    from moeclip.loader import save_model_dir
    from moeclip.model.factory import build_dense
    torch.manual_seed(0)
    model = build_dense("moeclip-micro")
    return save_model_dir(model, tmp_path_factory.mktemp("micro") / "model")


@pytest.fixture(scope="session")
def moe_dir(micro_dir, tmp_path_factory) -> Path:
    """An MoE micro CLIP whose experts and routers differ, so expert loads are unequal."""
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

def pytest_collection_modifyitems(config, items):
    """`cuda` tests need a GPU; elsewhere they are skipped (bench/gpu_check.sh runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these where there is one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
