"""The runtime is the one place that picks a device: no library function defaults to the CPU, and the
library (model, MoE, MCL clustering, sampler, losses, metrics) works without the trainer (accelerate)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from moeclip.runtime import Runtime

PACKAGE = Path(__file__).resolve().parents[1] / "moeclip"
# the training application: it owns the runtime and may use accelerate
TRAINER = ("train", "pipeline", "distributed")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _cpu_defaults(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                + node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if isinstance(default, ast.Constant) and default.value == "cpu":
                    found.append(f"{node.name}({arg.arg}='cpu')")
        if isinstance(node, ast.Call):  # argparse: add_argument("--device", default="cpu")
            for kw in node.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Constant) and kw.value.value == "cpu":
                    found.append(f"line {node.lineno}: default='cpu'")
    return found


def test_no_function_defaults_to_the_cpu():
    offenders = {str(p.relative_to(PACKAGE)): f for p in _modules() if (f := _cpu_defaults(ast.parse(p.read_text())))}
    assert not offenders, f"device defaults to 'cpu' (take a Runtime, or None = the first accelerator): {offenders}"


def test_library_does_not_import_the_trainer():
    offenders = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in TRAINER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name.split(".")[0] == "accelerate" or name.startswith(("moeclip.train", "moeclip.pipeline")):
                    offenders.append(f"{rel}: imports {name}")
    assert not offenders, offenders


def test_shard_covers_every_item_once_in_order():
    for n in (0, 1, 5, 64, 65):
        for world in (1, 2, 3, 8):
            parts = [list(Runtime(device=torch.device("cpu"), rank=r, world_size=world).shard(n)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_local_runtime_and_autocast():
    rt = Runtime.local("cpu", "bf16")
    assert rt.is_main and not rt.distributed and rt.precision == "bf16"
    with rt.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with Runtime.local("cpu").autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        Runtime.local("cpu", "fp8")
    assert Runtime.local().device.type == ("cuda" if torch.cuda.is_available() else "cpu")
