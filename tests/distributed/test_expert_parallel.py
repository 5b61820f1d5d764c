"""Expert parallelism on DeepSpeed agrees with the single-process MoE layer, for real, on 2 CPU processes.

One `accelerate launch` of ep_worker.py with a shipped ep=2 DeepSpeed config (gloo on CPU) checks a
layer (outputs, aux losses, gradients) and trains; this test holds the first step's gradients and
the trained weights against the same training on one process, and checks that the engine's sharded
checkpoint consolidates into a model directory with the same weights.

The one-process reference computes the router losses per half micro-batch, as each of the two ranks
does (load balancing is not additive over ranks, and DDP averages per-rank gradients).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeclip import load
from moeclip.consolidate import consolidate
from moeclip.loader import save_model_dir
from moeclip.model.factory import build_dense, model_config
from moeclip.moe import upcycle

from two_ranks import max_diff, single_process

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
TOL = 2e-5
FULL = {"name": "full", "mode": "full", "lb_coef": 0.01, "z_coef": 0.001,  # everything, a 0-dim logit_scale too
        "train": {"steps": 4, "global_batch": 16, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 1, "grad_clip": 0.05,
                  "weight_decay": 0.1, "ckpt_every": 2, "log_every": 1}}
ROUTER = {"name": "router", "mode": "router", "lb_coef": 0.01, "z_coef": 0.001,  # DMU's router fine-tuning
          "train": {"steps": 3, "global_batch": 16, "lr": 1e-2, "warmup_steps": 1, "ckpt_every": 3, "log_every": 1}}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    """A micro MoE CLIP with distinct experts, a non-zero router and open_clip's 0-dim logit_scale."""
    torch.manual_seed(0)
    cfg = model_config("moeclip-micro")
    cfg.pop("nonscalar_logit_scale")
    model = build_dense("moeclip-micro", cfg)
    assert model.logit_scale.ndim == 0
    upcycle(model, num_experts=4, top_k=2, router_init_std=0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(0.05 * torch.randn_like(p))
    return save_model_dir(model, tmp_path_factory.mktemp("moe") / "model")


def launch(config: str, out: Path, moe_dir: Path, corpus: dict, runs: list[dict], skip_layer: bool = False) -> list:
    """One 2-process launch of ep_worker.py; returns each rank's results."""
    (out / "train_cfg.json").write_text(json.dumps({"runs": runs, "skip_layer": skip_layer}))
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "recipes" / "accelerate" / config),
           "--main_process_port", "0", str(Path(__file__).parent / "ep_worker.py"), str(out), str(moe_dir),
           str(corpus["train"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    run = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    print(f"2-process launch: {time.time() - t0:.1f} s")
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def assert_same_training(run: dict, out: Path, moe_dir: Path, corpus: dict, tmp_path: Path) -> None:
    name = run["name"]
    ref, ref_grads = single_process(moe_dir, corpus, run, tmp_path / f"ref_{name}")
    ep_grads = {}
    for r in range(2):
        ep_grads.update(torch.load(out / f"grads_{name}_rank{r}.pt", weights_only=True))
    ep_grads.pop("moeclip_expert_anchor", None)
    assert sorted(ep_grads) == sorted(ref_grads), f"{name}: other parameters got gradients"
    for key, g in ref_grads.items():  # averaged over ranks by the engine = the one-process gradient
        err = (g - ep_grads[key].reshape(g.shape)).abs().max().item()
        assert err < 1e-6 + 1e-4 * g.abs().max().item(), f"{name}: gradient of {key} differs by {err:.2e}"
    diff, key = max_diff(ref, load(out / f"{name}_model")[0])
    assert diff < TOL, f"{name}: weights differ by {diff:.2e} at {key}"
    moved, _ = max_diff(load(moe_dir)[0], ref)
    assert moved > 100 * TOL, f"{name}: training did not change the weights"


@pytest.mark.parametrize("config", [
    "deepspeed_ep2_zero1.yaml",
    pytest.param("deepspeed_ep2_zero2.yaml", marks=pytest.mark.slow),
])
def test_expert_parallel_agrees_with_single_process(config, moe_dir, corpus, tmp_path):
    out = tmp_path / "ep"
    out.mkdir()
    ranks = launch(config, out, moe_dir, corpus, [{**FULL, "launches": [2, None]}, {**ROUTER, "launches": [None]}])

    for r, res in enumerate(ranks):
        assert res["world"] == 2 and res["distributed_type"].endswith("DEEPSPEED") and res["backend"] == "gloo"
        for experts, layer in res["layer"].items():
            for key in ("out", "input_grad", "router_grad", "lb", "z", "expert_grad", "gathered"):
                assert layer[key] < TOL, f"rank {r}, {experts} experts: {key} differs by {layer[key]:.2e}"
            assert layer["gathered_type"] == "MoEFFN"
        for info in res["training"].values():
            assert info["backend"] == {"backend": "deepspeed", "world_size": 2, "ep_size": 2}, info["backend"]
    assert sorted(e for res in ranks for e in res["layer"]["4"]["experts_checked"]) == [0, 1, 2, 3]

    for run in (FULL, ROUTER):  # FULL was stopped after step 2 and resumed by a new engine
        assert_same_training(run, out, moe_dir, corpus, tmp_path)

    # the engine's sharded checkpoint (one file per expert) consolidates into the same model directory
    ckpt = Path(ranks[0]["training"]["full"]["ckpt"])
    assert len(list((ckpt / "ds" / "state").glob("layer_*_expert_*_model_states.pt"))) == 4 * 4  # 4 layers
    diff, key = max_diff(load(consolidate(ckpt, tmp_path / "consolidated"))[0], load(out / "full_model")[0])
    assert diff == 0.0, f"consolidated checkpoint differs at {key}"


@pytest.mark.slow
def test_relaunched_run_continues(moe_dir, corpus, tmp_path):
    """A run stopped after a checkpoint and launched again (new processes) ends where one run would."""
    out = tmp_path / "ep"
    out.mkdir()
    run = {**FULL, "train": {**FULL["train"], "grad_accum": 1}}
    launch("deepspeed_ep2_zero2.yaml", out, moe_dir, corpus, [{**run, "launches": [2]}], skip_layer=True)
    for r in range(2):  # written at the first step of a run; a resumed run has no first step
        (out / f"grads_full_rank{r}.pt").unlink()
    ranks = launch("deepspeed_ep2_zero2.yaml", out, moe_dir, corpus, [{**run, "launches": [None]}], skip_layer=True)
    assert ranks[0]["training"]["full"]["steps"] == 4
    assert not list(out.glob("grads_full_rank*.pt")), "the second launch started over instead of resuming"
    ref, _ = single_process(moe_dir, corpus, run, tmp_path / "ref")
    diff, key = max_diff(ref, load(out / "full_model")[0])
    assert diff < TOL, f"weights differ by {diff:.2e} at {key}"
