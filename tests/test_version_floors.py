"""The version floors the code relies on are declared, and the installed packages meet them.

open_clip before 2.26 ran its transformers sequence-first (the MoE layer's real-token mask would be dropped
or transposed) and before 2.27 had no `load_checkpoint(weights_only=...)`; DeepSpeed before 0.15.4
mis-scaled expert gradients by ep_size under ZeRO-1/2 (deepspeedai/DeepSpeed#6546).
"""
import re
from importlib.metadata import version
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FLOORS = {"open_clip_torch": (2, 27), "deepspeed": (0, 15, 4)}


def _tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_floor_declared_and_met(package):
    declared = re.search(rf'"{package}>=([\d.]+)"', PYPROJECT.read_text())
    assert declared, f"pyproject.toml declares no floor for {package}"
    assert _tuple(declared.group(1)) >= FLOORS[package], f"{package} floor {declared.group(1)} is too low"
    assert _tuple(version(package)) >= _tuple(declared.group(1)), f"installed {package} {version(package)}"
