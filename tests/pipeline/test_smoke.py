"""The whole DMU pipeline, launched the way users launch it, on the smoke config (about a minute)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dmu_smoke_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    data = tmp_path / "data"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(REPO / "recipes" / "dmu.py"), "--config",
           str(REPO / "recipes" / "configs" / "smoke.yaml"), f"output_dir={out}", f"data.train={data}/train.csv",
           f"data.val={data}/val.csv", f"data.synth.out={data}", f"base={REPO / 'checkpoints' / 'base-tiny'}",
           "baselines.dense_ft_lr=2e-3"]  # a sweep's value (YAML 1.1 reads it as a string: still a float)
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["construction"] == "dmu"  # the published method unless construction=drop_upcycle
    assert {"base", "mcl_stage_1", "mcl_stage_2", "upcycle", "dense_ft", "dmu", "dmu_router_experts"} \
        == set(report["models"])
    for m in report["models"].values():
        assert {"image_to_text_R@1", "text_to_image_R@10", "factors"} <= set(m)
    lr = {name: json.loads((out / sub / "model" / "config.json").read_text())["finetune"]["lr"]
          for name, sub in (("dense_ft", "baselines/dense_ft"), ("upcycle", "baselines/upcycle"), ("dmu", ""))}
    assert lr == {"dense_ft": 2e-3, "upcycle": 1e-4, "dmu": 1e-3}  # each baseline its own lr (smoke.yaml's)
    b = report["budgets"]
    assert b["upcycle_samples"] == b["dense_ft_samples"] == b["dmu_total_samples"] == 3 * 6 * 32
    costs = report["costs"]  # every model charged; top-2 MoE inference costs more than the dense base
    assert set(costs) == set(report["models"]) and costs["base"]["train_flops"] == 0
    assert costs["dmu"]["image_flops"] > costs["base"]["image_flops"] == costs["dense_ft"]["image_flops"]
    assert costs["dmu"]["train_samples"] == costs["upcycle"]["train_samples"] == b["dmu_total_samples"]
    assert costs["dmu_router_experts"]["train_flops"] > costs["dmu"]["train_flops"] > 0
    md = (out / "report.md").read_text()
    assert md.startswith("# DMU report") and "Protocol `per_caption`" in md
    env_info = report["environment"]  # what a number that does not repeat elsewhere is checked against first
    assert env_info["device"] == "cpu" and env_info["torch"] == torch.__version__ and env_info["world_size"] == 1
    assert env_info["cpu_capability"] and "## Environment" in md and f"torch `{torch.__version__}`" in md
    assert report["protocol"] == "per_caption" and {m["protocol"] for m in report["models"].values()} == {"per_caption"}
    # the plots report.md shows exist (loss curves, stage-by-stage metrics, the expert-load heatmaps)
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert {"plots/losses.png", "plots/stages.png", "experts/load_visual.png"} <= set(pictures)
    assert all((out / p).is_file() for p in pictures)
    if importlib.util.find_spec("tensorboard") is not None:  # one TensorBoard run per pipeline step
        for step in ("eval", "mcl_stage_1", "mcl_stage_2", "dmu_router_ft", "dmu_router_experts",
                     "upcycle_baseline", "dense_ft_baseline"):
            assert list((out / "logs" / step).glob("events.out.tfevents.*")), step
    # the saved model reproduces the report's DMU numbers through the CLI
    ev = subprocess.run([str(Path(sys.executable).parent / "moeclip"), "eval", "--model", str(out / "model"),
                         "--data", f"{data}/val.csv", "--out", str(tmp_path / "m.json")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    for k in ("image_to_text_R@1", "text_to_image_R@1", "mean_R@1"):
        assert abs(m[k] - report["models"]["dmu"][k]) < 1e-6, k
    # re-running the finished pipeline resumes: nothing is retrained, the report is rewritten
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["models"]["dmu"] == report["models"]["dmu"]
    # an ablation reuses the run's stages (fewer experts, top-1) without re-training them
    abl = tmp_path / "abl"
    abl_cmd = [*cmd, f"output_dir={abl}", f"mcl_dir={out / 'mcl'}", "mcl.num_experts=2", "upcycle.top_k=1",
               "baselines.upcycle=false", "baselines.dense_ft=false", "baselines.dmu_router_experts=false",
               "baselines.drop_upcycle=true", "baselines.drop_upcycle_lr=3e-3", f"data.also_val.again={data}/val.csv"]
    # stop_at leaves after a checkpoint without passing the half-trained router off as finished
    stop = subprocess.run([*abl_cmd, "router_ft.train.stop_at=3"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert stop.returncode == 0 and "stopped at step 3 of 6" in stop.stderr, stop.stderr[-2000:]
    assert not (abl / "model" / "config.json").exists() and (abl / "router_ft" / "ckpt" / "step_0000003").exists()
    ab = subprocess.run(abl_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ab.returncode == 0, ab.stderr[-3000:]
    rep = json.loads((abl / "report.json").read_text())
    assert set(rep["models"]) == {"base", "mcl_stage_1", "dmu", "drop_upcycle"} and not (abl / "mcl").exists()
    assert rep["budgets"]["drop_upcycle_samples"] == rep["budgets"]["dmu_total_samples"]
    drop_cfg = json.loads((abl / "baselines" / "drop_upcycle" / "model" / "config.json").read_text())
    assert drop_cfg["finetune"]["lr"] == 3e-3
    assert set(rep["also_val"]["again"]) == set(rep["models"])  # every model also on the second set
    assert rep["also_val"]["again"]["dmu"]["mean_R@1"] == rep["models"]["dmu"]["mean_R@1"]
    assert rep["models"]["mcl_stage_1"] == report["models"]["mcl_stage_1"]
    assert json.loads((abl / "model" / "config.json").read_text())["moe"]["top_k"] == 1
    # stages made with other settings are refused, naming the setting
    bad = subprocess.run([*cmd, f"output_dir={tmp_path / 'bad'}", f"mcl_dir={out / 'mcl'}", "mcl.train.lr=0.5"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "config.train.lr" in bad.stderr, bad.stderr[-2000:]  # accelerate exits 1


@pytest.mark.slow
def test_dmu_smoke_two_processes_plain_ddp(tmp_path):
    """The smoke pipeline on 2 CPU processes with plain DDP (the shipped ddp2.yaml) gives the 1-process report
    within noise: same data, same global batches, features gathered, gradients averaged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    accelerate = Path(sys.executable).parent / "accelerate"
    data = tmp_path / "data"
    common = [str(REPO / "recipes" / "dmu.py"), "--config", str(REPO / "recipes" / "configs" / "smoke.yaml"),
              f"data.train={data}/train.csv", f"data.val={data}/val.csv", f"data.synth.out={data}",
              f"base={REPO / 'checkpoints' / 'base-tiny'}", "baselines.dmu_router_experts=false"]
    reports = {}
    for name, launch in (("one", ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                  "--dynamo_backend", "no"]),
                         ("ddp", ["--config_file", str(REPO / "recipes" / "accelerate" / "ddp2.yaml"),
                                  "--main_process_port", "0"])):
        run = subprocess.run([str(accelerate), "launch", *launch, *common, f"output_dir={tmp_path / name}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    one, ddp = reports["one"]["models"], reports["ddp"]["models"]
    assert set(one) == set(ddp) == {"base", "mcl_stage_1", "mcl_stage_2", "dmu", "upcycle", "dense_ft"}
    for model in one:  # 128 val pairs: one item is 0.0078 of a recall
        for key in ("image_to_text_R@1", "text_to_image_R@1", "mean_R@1"):
            assert abs(one[model][key] - ddp[model][key]) <= 0.016, (model, key, one[model][key], ddp[model][key])
    assert reports["ddp"]["budgets"] == reports["one"]["budgets"]
