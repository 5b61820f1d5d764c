import json

import pytest
import torch

from moeclip import load, save_model_dir
from moeclip.model.ffn import ffn_distance, ffn_param_names, ffn_state_dict, load_ffn_state_dict


def test_round_trip_is_exact(micro_dir, tmp_path):
    model, preprocess, tok = load(micro_dir)
    img = torch.randn(2, 3, 32, 32)
    txt = tok(["a red circle", "a blue square"])
    a = model.encode_image(img), model.encode_text(txt)
    save_model_dir(model, tmp_path / "copy")
    m2, _, _ = load(tmp_path / "copy")
    assert torch.equal(a[0], m2.encode_image(img)) and torch.equal(a[1], m2.encode_text(txt))
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert cfg["arch"] == "moeclip-micro" and cfg["model_cfg"]["embed_dim"] == 32 and cfg["moe"] is None


def test_errors_name_the_file(micro_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((micro_dir / "config.json").read_text().replace('"width": 32', '"width": 48', 1))
    (bad / "model.safetensors").write_bytes((micro_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="model.safetensors"):
        load(bad)
    with pytest.raises(ValueError, match="unknown architecture"):
        load("no-such-arch", pretrained=str(micro_dir / "model.safetensors"))


def test_ffn_sets(micro_dir):
    model, _, _ = load(micro_dir)
    names = ffn_param_names(model)
    assert len(names) == 2 * 2 * 2 * 2  # towers x blocks x (c_fc, c_proj) x (weight, bias)
    assert "visual.transformer.resblocks.1.mlp.c_proj.bias" in names
    assert "transformer.resblocks.0.mlp.c_fc.weight" in names
    assert ffn_param_names(model, ["text"], [-1]) == [n for n in names if n.startswith("transformer.resblocks.1.")]
    ffn = ffn_state_dict(model)
    changed = {k: v + 1 for k, v in ffn.items()}
    load_ffn_state_dict(model, changed)
    assert ffn_distance(ffn_state_dict(model), changed) == 0 and ffn_distance(ffn, changed) > 0
    with pytest.raises(ValueError, match="shape"):
        load_ffn_state_dict(model, {names[0]: torch.zeros(3)})


def test_local_weights_file(micro_dir):
    model, _, _ = load("moeclip-micro", pretrained=str(micro_dir / "model.safetensors"))
    ref, _, _ = load(micro_dir)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
