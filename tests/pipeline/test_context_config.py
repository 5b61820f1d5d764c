"""`model.context_length` in a recipe config reaches the model, the tokenizer and MCL's resume check
(unit level: the pipeline's own loading step, not the pipeline)."""
from pathlib import Path

import pytest

from moeclip.config import ConfigError, load_config
from moeclip.pipeline.common import load_base
from moeclip.pipeline.dmu import DMUConfig
from moeclip.pipeline.finetune import FinetuneConfig
from moeclip.train.mcl_stages import _stretch_setting

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "recipes" / "configs"


def test_context_length_key_reaches_the_tokenizer():
    cfg = load_config(DMUConfig, CONFIGS / "smoke.yaml", [f"base={REPO / 'checkpoints' / 'base-tiny'}",
                                                           "model.context_length=40"])
    assert cfg.model.context_length == 40
    model, _, tokenizer = load_base(cfg.base, cfg.model)
    assert tokenizer(["a caption"]).shape == (1, 40)
    assert model.positional_embedding.shape[0] == 40 and model.context_length == 40
    assert _stretch_setting(model) == {"text_context_length": 40}  # MCL stages made unstretched are refused


def test_without_the_key_nothing_changes():
    for name in ("default.yaml", "smoke.yaml", "published.yaml", "smoke_vitb32.yaml"):
        assert load_config(DMUConfig, CONFIGS / name).model.context_length is None, name
    cfg = load_config(DMUConfig, CONFIGS / "smoke.yaml", [f"base={REPO / 'checkpoints' / 'base-tiny'}"])
    model, _, tokenizer = load_base(cfg.base, cfg.model)
    assert tokenizer(["a caption"]).shape == (1, 20) and _stretch_setting(model) == {}
    assert load_config(FinetuneConfig, CONFIGS / "finetune.yaml").model.context_length is None


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="'model.context_length' must be int"):
        load_config(DMUConfig, None, ["model.context_length=long"])
    cfg = load_config(DMUConfig, None, [f"base={REPO / 'checkpoints' / 'base-tiny'}", "model.context_length=10"])
    with pytest.raises(ValueError, match="model.context_length=10"):
        load_base(cfg.base, cfg.model)
