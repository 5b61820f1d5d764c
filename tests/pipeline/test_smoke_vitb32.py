"""The whole pipeline at real width (ViT-B/32, QuickGELU, random init) in bf16. It takes well over 20 minutes on
this 2-core CPU (docs/benchmarks.md §7), so it runs where there is a GPU (tests marked `cuda`;
bench/gpu_check.sh runs them)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.cuda
def test_dmu_smoke_vitb32_bf16(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/gpu1_bf16.yaml"),
           str(REPO / "recipes/dmu.py"), "--config", str(REPO / "recipes/configs/smoke_vitb32.yaml"),
           f"output_dir={out}", f"data.train={data}/train.csv", f"data.val={data}/val.csv", f"data.synth.out={data}"]
    run = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert {"base", "mcl_stage_1", "mcl_stage_2", "dmu", "upcycle", "dense_ft"} <= set(report["models"])
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["model_cfg"]["quick_gelu"] and cfg["moe"]["num_experts"] == 3
    assert report["config"]["base"] == "ViT-B-32-quickgelu"
