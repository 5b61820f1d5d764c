"""Plain data parallelism (DDP, no DeepSpeed), for real, on 2 CPU processes (gloo) against one process.

One `accelerate launch` with the shipped recipes/accelerate/ddp2.yaml runs ddp_worker.py: sharded evaluation
and embedding pass (with an unreadable image, so the ranks' skip counts must add up), then training in
every regime: the dense FFNs (MCL stages, dense FT), router only, router + experts with a zero-initialised
router (every token picks the same experts: the others get no gradient on any rank) and everything
(stopped after step 2 and resumed). Before the runtime existed this launch trained each rank on its own.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moeclip import load
from moeclip.data.dataset import CaptionDataset
from moeclip.eval.evaluate import evaluate
from moeclip.loader import save_model_dir
from moeclip.mcl.embed import embed_corpus
from moeclip.model.factory import build_dense
from moeclip.moe import upcycle
from moeclip.runtime import Runtime

from two_ranks import max_diff, single_process

REPO = Path(__file__).resolve().parents[2]
TOL = 2e-5
TRAIN = {"steps": 3, "global_batch": 16, "lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.1, "ckpt_every": 2,
         "log_every": 1, "grad_clip": 0.05}


def moe_model(path: Path, router_init_std: float) -> Path:
    torch.manual_seed(0)
    model = build_dense("moeclip-micro")
    upcycle(model, num_experts=4, top_k=2, router_init_std=router_init_std)
    with torch.no_grad():  # distinct experts
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(0.05 * torch.randn_like(p))
    return save_model_dir(model, path)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, micro_dir, corpus) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    val = out / "val.csv"  # the val table, absolute paths, with one unreadable image
    with open(corpus["val"], newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["filepath"] = str(corpus["val"].parent / row["filepath"])
    rows[0]["filepath"] = str(out / "missing.png")
    rows[1]["title"] = ""  # an empty caption: skipped when the table is read, on every rank, counted once
    with open(val, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shutil.copy(corpus["val"].parent / "factors.json", out / "factors.json")  # the per-factor probe
    runs = [
        {"name": "ffn", "mode": "ffn", "model_dir": str(micro_dir), "train": TRAIN},
        {"name": "router", "mode": "router", "lb_coef": 0.01, "z_coef": 0.001,
         "model_dir": str(moe_model(out / "moe_router", 0.3)), "train": {**TRAIN, "lr": 1e-2}},
        {"name": "experts_zero_router", "mode": "router+experts", "lb_coef": 0.01, "z_coef": 0.0,
         "model_dir": str(moe_model(out / "moe_zero", 0.0)), "train": TRAIN},
        {"name": "full", "mode": "full", "lb_coef": 0.01, "z_coef": 0.001, "launches": [2, None],
         "model_dir": str(out / "moe_router"), "train": {**TRAIN, "steps": 4, "grad_accum": 2}},
    ]
    (out / "cfg.json").write_text(json.dumps({"dense_dir": str(micro_dir), "val": str(val),
                                              "train": str(corpus["train"]), "runs": runs}))
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "recipes" / "accelerate" / "ddp2.yaml"),
           "--main_process_port", "0", str(Path(__file__).parent / "ddp_worker.py"), str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests")}
    t0 = time.time()
    run = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    print(f"2-process DDP launch: {time.time() - t0:.1f} s")
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    return {"out": out, "val": val, "runs": runs, "ranks": [json.loads((out / f"rank{r}.json").read_text())
                                                            for r in range(2)]}


def test_launch_is_real_ddp(launched):
    for r, res in enumerate(launched["ranks"]):
        assert (res["world"], res["rank"], res["backend"]) == (2, r, "gloo")
        assert res["distributed_type"].endswith("MULTI_CPU")
        for info in res["train"].values():
            assert info["backend"] == {"backend": "plain", "world_size": 2}


def test_sharded_evaluation_equals_one_process(launched, micro_dir):
    model, pre, tok = load(micro_dir)
    one = evaluate(model, pre, tok, launched["val"], batch_size=8, runtime=Runtime.local("cpu"), progress=False)
    assert one["skipped"] == {"empty caption": 1, "missing file": 1}
    for res in launched["ranks"]:  # every rank returns the whole result
        two = res["eval"]
        assert two["skipped"] == one["skipped"] and two["num_images"] == one["num_images"]
        for key, value in one.items():
            if isinstance(value, float):
                assert abs(two[key] - value) < 1e-9, key
        assert two["factors"] == pytest.approx(one["factors"], abs=1e-9)


def test_sharded_embedding_equals_one_process(launched, micro_dir, tmp_path):
    model, pre, tok = load(micro_dir)
    img, txt, ok = embed_corpus(model, CaptionDataset(launched["val"], pre), tok, tmp_path / "e", Runtime.local("cpu"),
                                batch_size=8, commit_every=1)
    two = np.load(launched["out"] / "features.npz")
    assert np.array_equal(two["ok"], ok) and not ok[0] and ok[1:].all() and len(ok) == 63
    assert np.abs(two["image"] - img).max() < 1e-5 and np.abs(two["text"] - txt).max() < 1e-5
    progress = json.loads((launched["out"] / "embed" / "progress.json").read_text())
    assert progress["skipped"] == {"missing file": 1}  # counted once, by the rank that read it


@pytest.mark.parametrize("name", ["ffn", "router", "experts_zero_router", "full"])
def test_ddp_training_equals_one_process(launched, corpus, tmp_path, name):
    run = next(r for r in launched["runs"] if r["name"] == name)
    if name == "ffn":
        run = {**run, "lb_coef": 0.0, "z_coef": 0.0}
    ref, _ = single_process(Path(run["model_dir"]), corpus, run, tmp_path / "ref")
    trained = load(launched["out"] / f"{name}_model")[0]
    diff, key = max_diff(ref, trained)
    assert diff < TOL, f"{name}: weights differ by {diff:.2e} at {key}"
    moved, _ = max_diff(load(run["model_dir"])[0], ref)
    assert moved > 100 * TOL, f"{name}: training did not change the weights"
    steps = {r["train"][name]["steps"] for r in launched["ranks"]}
    assert steps == {run["train"]["steps"]}
