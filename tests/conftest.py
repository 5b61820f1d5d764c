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


def pytest_collection_modifyitems(config, items):
    """`cuda` tests need a GPU; elsewhere they are skipped (bench/gpu_check.sh runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these where there is one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
