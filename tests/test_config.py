from dataclasses import dataclass, field

import pytest

from moeclip.config import ConfigError, load_config


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    name: str | None = None


@dataclass
class Outer:
    output_dir: str = "runs/x"
    blocks: list[int] | None = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: a\ninner: {lr: 0.5}\n")
    cfg = load_config(Outer, p, ["inner.steps=7", "blocks=[-1, -2]", "inner.lr=2"])
    assert cfg.output_dir == "a" and cfg.inner.steps == 7 and cfg.inner.lr == 2.0 and cfg.blocks == [-1, -2]


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner: {lrr: 0.5}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'inner.lrr'"):
        load_config(Outer, p)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'inner.steps' must be int"):
        load_config(Outer, None, ["inner.steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Outer, None, ["inner.steps"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, "/nonexistent.yaml")
