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


def test_exponent_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads 3e-4 as the string "3e-4"; a learning-rate sweep types exactly that
    p = tmp_path / "c.yaml"
    p.write_text("inner: {lr: 1e-3}\n")
    cfg = load_config(Outer, p, ["blocks=null"])
    assert cfg.inner.lr == pytest.approx(1e-3)
    assert load_config(Outer, None, ["inner.lr=3e-4"]).inner.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match=r"'inner.lr' must be float"):
        load_config(Outer, None, ["inner.lr=fast"])
