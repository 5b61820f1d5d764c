"""analyse_experts on a real MoE model: token accounting, group attribution, report files, CLI."""
import json

import pytest

import moeclip
from moeclip.analysis import analyse_experts, write_expert_report
from moeclip.cli import main
from moeclip.data.dataset import CaptionDataset, DataError


@pytest.fixture(scope="module")
def moe(moe_dir):
    return moeclip.load(moe_dir)


def test_usage_counts_every_real_token_of_its_image_or_caption(moe, corpus):
    model, preprocess, tokenizer = moe
    result = analyse_experts(model, preprocess, tokenizer, corpus["val"], group_by="colour", max_rows=40,
                             batch_size=16, progress=False)
    rows = CaptionDataset(corpus["val"]).rows[:40]
    names = result["groups"]
    assert names == sorted({r["colour"] for r in rows}) and result["top_k"] == 2
    image_tokens = (32 // 8) ** 2 + 1  # moeclip-micro: 32 px, patch 8, plus the class token
    n_img = {g: len({r["_path"] for r in rows if r["colour"] == g}) for g in names}
    real = {g: int((tokenizer([r["_caption"] for r in rows if r["colour"] == g]) != 0).sum()) for g in names}
    for layer in result["layers"]:
        assert sum(layer["load"]) == pytest.approx(1.0, abs=1e-3)
        assert len(layer["coselect"]) == 3 and layer["groups"]["mi_bits"] >= 0
        want = [n_img[g] * image_tokens for g in names] if layer["tower"] == "visual" else [real[g] for g in names]
        assert layer["groups"]["tokens"] == want, layer["tower"]  # tokens go to their own item's group
        assert layer["tokens"] == sum(want)  # text padding never counted
    loads = [layer["load"] for layer in result["layers"]]
    assert any(max(l) - min(l) > 0.05 for l in loads)  # perturbed routers: unequal loads


def test_report_files(moe, corpus, tmp_path):
    model, preprocess, tokenizer = moe
    result = analyse_experts(model, preprocess, tokenizer, corpus["val"], group_by="shape", max_rows=24,
                             progress=False, null_permutations=5)
    written = write_expert_report(result, tmp_path / "r")
    names = {p.name for p in written.values()}
    assert names == {"experts.json", "experts.md", "load_visual.png", "load_text.png", "coselect_visual.png",
                     "coselect_text.png", "groups_visual.png", "groups_text.png"}
    for p in written.values():
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    md = (tmp_path / "r" / "experts.md").read_text()
    assert "![load_visual](load_visual.png)" in md and "MI(`shape`; expert)" in md
    assert json.loads((tmp_path / "r" / "experts.json").read_text())["layers"][0]["tower"] == "visual"


def test_clear_errors(moe, micro_dir, corpus):
    model, preprocess, tokenizer = moe
    with pytest.raises(DataError, match="no column 'nope'"):
        analyse_experts(model, preprocess, tokenizer, corpus["val"], group_by="nope", progress=False)
    dense, pre, tok = moeclip.load(micro_dir)
    with pytest.raises(ValueError, match="no MoE layers"):
        analyse_experts(dense, pre, tok, corpus["val"], progress=False)


def test_cli(moe_dir, corpus, tmp_path, capsys):
    assert main(["experts", "--model", str(moe_dir), "--data", str(corpus["val"]), "--max-rows", "16",
                 "--out", str(tmp_path / "x"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "visual block 0: load" in out and "experts.json" in out
    assert not (tmp_path / "x" / "groups_visual.png").exists()  # no --group-by, no group plots
    assert main(["experts", "--model", str(moe_dir), "--data", str(corpus["val"]), "--group-by", "nope",
                 "--out", str(tmp_path / "y")]) == 2
    assert "moeclip experts: error:" in capsys.readouterr().err


def test_experts_on_shards_equal_the_csv(moe, corpus, tmp_path):
    from moeclip.data.synth import SynthSpec, write_corpus
    wds = write_corpus(tmp_path / "wds", SynthSpec(train=1, val=64, seed=3), format="wds", shard_size=25)
    model, preprocess, tokenizer = moe
    a, b = (analyse_experts(model, preprocess, tokenizer, data, group_by="colour", max_rows=40, batch_size=16,
                            progress=False, null_permutations=3) for data in (corpus["val"], wds["val"]))
    assert a["layers"] == b["layers"] and a["groups"] == b["groups"]
