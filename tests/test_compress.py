"""`moeclip export --dense` and `moeclip prune` on a tiny MoE with perturbed experts (moeclip.compress)."""
import json

import pytest
import torch

import moeclip
from moeclip.cli import main
from moeclip.moe import moe_layers


def test_export_dense_cli(moe_dir, micro_dir, corpus, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(["export", "--dense", str(moe_dir), str(out), "--data", str(corpus["val"]), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "MoE " in printed and "load-weighted" in printed and "plain average" in printed and "mean R@1" in printed
    model, _, _ = moeclip.load(out)
    assert not moe_layers(model)
    dense, _, _ = moeclip.load(micro_dir)
    assert model.state_dict().keys() == dense.state_dict().keys()  # the base's size and names
    cfg = json.loads((out / "config.json").read_text())
    r = cfg["retrieval"]
    assert cfg["moe"] is None and cfg["merge"] == r["kept"] in ("load", "mean")
    assert r["candidates"][r["kept"]]["mean_R@1"] == max(c["mean_R@1"] for c in r["candidates"].values())
    assert main(["export", "--dense", str(moe_dir), str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["export", "--dense", str(micro_dir), str(tmp_path / "x"), "--data", str(corpus["val"]),
                 "--device", "cpu"]) == 2
    assert "a dense model" in capsys.readouterr().err


def test_prune_cli(moe_dir, corpus, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--keep", "2", str(moe_dir), str(out), "--data", str(corpus["val"]), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "pruned to 2" in printed and "mean R@1" in printed
    model, _, tokenizer = moeclip.load(out)
    # micro: 2 blocks per tower
    assert [(layer.num_experts, layer.top_k) for _, _, layer in moe_layers(model)] == [(2, 2)] * 4
    model.encode_text(tokenizer(["a red circle"]))  # the loaded model runs
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moe"]["num_experts"] == 2 and len(cfg["retrieval"]["kept_experts"]) == 4
    # K = E keeps every weight
    same = tmp_path / "same"
    assert main(["prune", "--keep", "3", str(moe_dir), str(same), "--data", str(corpus["val"]),
                 "--device", "cpu"]) == 0
    a, _, _ = moeclip.load(same)
    b, _, _ = moeclip.load(moe_dir)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    capsys.readouterr()
    assert main(["prune", "--keep", "4", str(moe_dir), str(tmp_path / "x"), "--data", str(corpus["val"])]) == 2
    assert "keep 1..3" in capsys.readouterr().err
