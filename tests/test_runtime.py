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


def test_describe_names_the_machine_the_numbers_came_from():
    info = Runtime.local("cpu").describe()
    assert info["device"] == "cpu" and info["precision"] == "no" and info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads() >= 1
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(info["cpu"], str) and "gpu" not in info


def test_environment_adds_the_code_revision(tmp_path, monkeypatch):
    from moeclip.pipeline.common import environment
    info = environment(Runtime.local("cpu"))
    assert info["moeclip"] and info["device"] == "cpu"
    if "commit" in info:  # a git checkout (CI's clean clone is one)
        assert len(info["commit"]) == 40 and isinstance(info["uncommitted_changes"], bool)
    monkeypatch.setattr("subprocess.run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    assert "commit" not in environment(Runtime.local("cpu"))  # no git: still a report, without the revision
