"""bench/repeat_check.py answers whether a recipe's model depends on what its process trained before: it must
train through the recipe's own steps and report a real comparison (a changed weight shows up)."""
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def test_repeat_check_compares_weights_bit_for_bit(tmp_path, load_bench):
    out = tmp_path / "repeat.json"
    data = tmp_path / "data"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "repeat_check.py"), "--steps", "2",
                          "--config", str(REPO / "recipes" / "configs" / "smoke.yaml"), "--out", str(out),
                          f"base={REPO / 'checkpoints' / 'base-tiny'}", f"data.train={data}/train.csv",
                          f"data.val={data}/val.csv", f"data.synth.out={data}"],
                         capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["same_as_first"]) == {"again", "after_other_dense_ft", "after_drop_upcycling_ft",
                                            "after_mcl_embedding_and_kmeans", "after_evaluation",
                                            "after_global_rng_draws"}
    assert result["same_as_first"]["again"] == {"tensors_differing": 0, "max_abs_diff": 0.0}  # a run repeats
    assert result["environment"]["device"] == "cpu" and result["steps"] == 2
    assert result["order_matters"] == any(v["tensors_differing"] for v in result["same_as_first"].values())

    rc = load_bench("repeat_check")  # the comparison itself sees a one-ulp change in one tensor
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    b = {"w": a["w"].clone(), "b": a["b"].nextafter(a["b"] + 1)}
    assert rc._compare(a, a) == {"tensors_differing": 0, "max_abs_diff": 0.0}
    diff = rc._compare(a, b)
    assert diff["tensors_differing"] == 1 and 0 < diff["max_abs_diff"] < 1e-6
