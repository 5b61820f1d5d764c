"""`construction=drop_upcycle`: the pipeline's main model by Drop-Upcycling, no MCL, on DMU's sample budget."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeclip.config import ConfigError, load_config
from moeclip.pipeline.constructions import check_construction, dmu_budget
from moeclip.pipeline.dmu import DMUConfig
from moeclip.pipeline.report import render_markdown

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"
DMU_SMOKE_BUDGET = 2 * 6 * 32 + 6 * 32  # the DMU smoke run's: 2 MCL stages + router FT, 32-pair batches


def _cmd(out: Path, data: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "recipes" / "dmu.py"), "--config", str(SMOKE), f"output_dir={out}",
            f"data.train={data}/train.csv", f"data.val={data}/val.csv", f"data.synth.out={data}",
            f"base={REPO / 'checkpoints' / 'base-tiny'}", *overrides]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)


def test_budget_is_dmus_from_the_config_alone():
    cfg = load_config(DMUConfig, SMOKE)
    assert dmu_budget(cfg) == DMU_SMOKE_BUDGET
    cfg.baselines.budget = "router_ft"
    assert dmu_budget(cfg) == 6 * 32


def test_shipped_configs_pick_their_construction():
    """default.yaml runs the best construction measured, at the lr the sweep picked for it; published.yaml stays
    the published DMU (issue 16: one switch away)."""
    default = load_config(DMUConfig, REPO / "recipes" / "configs" / "default.yaml")
    assert default.construction == "drop_upcycle" and default.upcycle.drop_ratio == 0.5
    assert default.construction_ft.mode == "router+experts"
    assert default.construction_ft.train.lr == default.baselines.drop_upcycle_lr == 3e-3
    assert load_config(DMUConfig, REPO / "recipes" / "configs" / "published.yaml").construction == "dmu"
    assert DMUConfig().construction == "dmu"  # code without a config file: the published method


def test_refusals(tmp_path):
    cfg = load_config(DMUConfig, SMOKE, ["construction=drop_upcycle", "baselines.drop_upcycle=true"])
    with pytest.raises(ConfigError) as both:
        check_construction(cfg, tmp_path / "model")
    assert "construction=drop_upcycle" in str(both.value) and "baselines.drop_upcycle=true" in str(both.value)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"pipeline": "dmu"}))
    cfg.baselines.drop_upcycle = False
    with pytest.raises(ConfigError, match="made by construction=dmu"):
        check_construction(cfg, tmp_path / "model")
    check_construction(load_config(DMUConfig, SMOKE), tmp_path / "model")  # the same construction resumes
    for mcl_only in ("mcl.start_from=previous", "mcl.construction=specialists", "mcl_dir=runs/x/mcl"):
        cfg = load_config(DMUConfig, SMOKE, ["construction=drop_upcycle", mcl_only])
        with pytest.raises(ConfigError, match="add construction=dmu") as err:
            check_construction(cfg, tmp_path / "fresh")
        assert mcl_only.split("=")[0] in str(err.value)


def test_report_names_the_construction_and_skips_mcl():
    model = {"mean_R@1": 0.5, "num_images": 128}
    md = render_markdown({"construction": "drop_upcycle", "protocol": "per_caption",
                          "models": {"base": {**model, "mean_R@1": 0.4}, "drop_upcycle": {**model, "mean_R@1": 0.6},
                                     "upcycle": model}})
    assert md.startswith("# Drop-Upcycling report\n\nConstruction `drop_upcycle`")
    assert "## Where Drop-Upcycling stands" in md and "Drop-Upcycling mean R@1 is 10.0 points above `upcycle`" in md
    assert "## MCL stages" not in md and "DMU mean R@1" not in md


@pytest.mark.slow
def test_refused_by_the_recipe_naming_both_keys(tmp_path):
    run = _run(_cmd(tmp_path / "out", tmp_path / "data", "construction=drop_upcycle", "baselines.drop_upcycle=true"))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "baselines.drop_upcycle=true" in run.stderr and "construction=drop_upcycle" in run.stderr
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.fixture(scope="module")
def drop_run(tmp_path_factory):
    """The smoke pipeline with construction=drop_upcycle, run once for the tests below."""
    root = tmp_path_factory.mktemp("drop")
    cmd = _cmd(root / "out", root / "data", "construction=drop_upcycle")
    run = _run(cmd)
    assert run.returncode == 0, run.stderr[-3000:]
    return root, cmd, json.loads((root / "out" / "report.json").read_text())


@pytest.mark.slow
def test_drop_upcycle_report(drop_run):
    root, _, report = drop_run
    out = root / "out"
    assert report["construction"] == "drop_upcycle"
    assert list(report["models"]) == ["base", "drop_upcycle", "upcycle", "dense_ft"]
    assert "mcl" not in report and "expert_distance" not in report and not (out / "mcl").exists()
    b = report["budgets"]
    assert b["budget_samples"] == b["drop_upcycle_samples"] == b["upcycle_samples"] == b["dense_ft_samples"] \
        == DMU_SMOKE_BUDGET
    assert not {"router_ft_samples", "mcl_samples_per_stage", "dmu_total_samples"} & set(b)
    costs = report["costs"]
    assert set(costs) == set(report["models"]) and costs["drop_upcycle"]["train_samples"] == DMU_SMOKE_BUDGET
    # the same mode and samples as the upcycle baseline (router+experts): the same FLOPs, no MCL charged
    assert costs["drop_upcycle"]["train_flops"] == costs["upcycle"]["train_flops"] > 0
    assert "drop_upcycle" in report["timings"] and not any(k.startswith("mcl_") for k in report["timings"])
    assert report["expert_usage"]  # the expert analysis ran on OUTPUT_DIR/model
    md = (out / "report.md").read_text()
    assert md.startswith("# Drop-Upcycling report\n\nConstruction `drop_upcycle`")


@pytest.mark.slow
def test_drop_upcycle_model_dir_is_an_moe(drop_run):
    from moeclip.loader import load
    from moeclip.moe import moe_layers
    root, _, _ = drop_run
    model, _, _ = load(root / "out" / "model")
    assert moe_layers(model)
    assert json.loads((root / "out" / "model" / "config.json").read_text())["pipeline"] == "drop_upcycle"


@pytest.mark.slow
def test_drop_upcycle_resumes_and_refuses_the_other_construction(drop_run):
    root, cmd, report = drop_run
    out = root / "out"
    weights = [out / "model", out / "baselines" / "upcycle" / "model", out / "baselines" / "dense_ft" / "model"]
    before = {p: (p / "model.safetensors").stat().st_mtime_ns for p in weights}
    again = _run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: (p / "model.safetensors").stat().st_mtime_ns for p in weights} == before  # nothing retrained
    assert json.loads((out / "report.json").read_text())["models"] == report["models"]
    other = _run([*cmd[:-1], "construction=dmu"])
    assert other.returncode == 2 and "made by construction=drop_upcycle" in other.stderr, other.stderr[-2000:]
    assert not (out / "mcl").exists()


def test_novelty_gate_needs_a_shared_expert(tmp_path):
    cfg = load_config(DMUConfig, SMOKE, ["upcycle.shared_gate=novelty"])
    with pytest.raises(ConfigError, match="upcycle.shared_expert=true"):
        check_construction(cfg, tmp_path / "model")


@pytest.mark.slow
def test_novelty_gated_shared_expert_run(tmp_path):
    """Drop-Upcycling beside a frozen, novelty-gated base FFN: the gates are fitted before training, saved with
    the model, and the shared experts keep the base's weights."""
    import torch
    from moeclip.loader import load
    from moeclip.moe import moe_layers
    from moeclip.moe.novelty import novelty_gates
    out = tmp_path / "out"
    run = _run(_cmd(out, tmp_path / "data", "construction=drop_upcycle", "upcycle.shared_expert=true",
                    "upcycle.shared_gate=novelty", "upcycle.novelty_clusters=64", "construction_ft.freeze_shared=true",
                    "baselines.upcycle=false", "baselines.dense_ft=false"))
    assert run.returncode == 0, run.stderr[-3000:]
    model, _, _ = load(out / "model")
    base, _, _ = load(REPO / "checkpoints" / "base-tiny")
    gates = novelty_gates(model)
    assert len(gates) == 2 and all(torch.isfinite(g.threshold) and g.centroids.abs().sum() > 0 for g in gates.values())
    base_state = base.state_dict()
    for tower, block, layer in moe_layers(model):
        prefix = f"{'visual.transformer' if tower == 'visual' else 'transformer'}.resblocks.{block}.mlp."
        for name, p in layer.shared.named_parameters():
            assert torch.equal(p, base_state[prefix + name])
    assert json.loads((out / "model" / "config.json").read_text())["moe"]["shared_gate"] == "novelty"
    report = json.loads((out / "report.json").read_text())
    assert "drop_upcycle" in report["models"]
    shares = report["novelty_gate"]["main"]  # where the gates send the validation set (like the training data)
    assert set(shares) == set(gates) and all(0 <= s["to_base"] <= 1 and s["samples"] == 128 for s in shares.values())
    assert "## Novelty gate" in (out / "report.md").read_text()
