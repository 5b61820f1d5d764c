"""`moeclip wise-ft` (moeclip.wise_ft): writes the interpolated model, scores base, model and result, and refuses a
base the model did not come from."""
import json

import torch

import moeclip
from moeclip.cli import main


def test_wise_ft_cli_writes_the_midpoint_and_scores_it(moe_dir, micro_dir, corpus, tmp_path, capsys):
    out = tmp_path / "wise"
    assert main(["wise-ft", str(moe_dir), str(out), "--base", str(micro_dir), "--alpha", "0.5",
                 "--data", f"val={corpus['val']}", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "val: mean R@1 base" in printed and "alpha 0.5" in printed
    mixed, tuned, base = (moeclip.load(p)[0].state_dict() for p in (out, moe_dir, micro_dir))
    key = next(k for k in mixed if ".mlp.experts.1.c_fc.weight" in k)
    torch.testing.assert_close(mixed[key], 0.5 * tuned[key] + 0.5 * base[key.replace(".experts.1", "")])
    router = next(k for k in mixed if ".mlp.router." in k)
    assert torch.equal(mixed[router], tuned[router])  # no base value: kept as trained
    report = json.loads((out / "config.json").read_text())["wise_ft"]
    assert report["alpha"] == 0.5 and set(report["mean_R@1"]["val"]) == {"base", "model", "wise_ft"}


def test_wise_ft_cli_errors(moe_dir, micro_dir, corpus, tmp_path, capsys):
    assert main(["wise-ft", str(moe_dir), str(tmp_path / "x"), "--base", str(micro_dir), "--alpha", "2"]) == 2
    assert "alpha=2" in capsys.readouterr().err
    assert main(["wise-ft", str(moe_dir), str(tmp_path / "x"), "--base", str(micro_dir),
                 "--data", "val=nowhere.csv"]) == 2
    assert "no file nowhere.csv" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
