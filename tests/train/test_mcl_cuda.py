"""One MCL stage end to end on a GPU in bf16: embedding, clustering, FFN training, and the weight sets the
stage hands on (which must live in host memory: a GPU copy once crashed the distance report)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moeclip import load
from moeclip.data.dataset import CaptionDataset
from moeclip.model.ffn import ffn_distance
from moeclip.train.dist import make_runtime
from moeclip.train.loop import TrainConfig
from moeclip.train.mcl_stages import MCLConfig, run_mcl

pytestmark = pytest.mark.cuda


@pytest.fixture
def bf16_runtime():
    """accelerate keeps one state per process: start a bf16 one, and leave none behind."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield make_runtime(mixed_precision="bf16")
    AcceleratorState._reset_state(True)


def test_one_mcl_stage_on_the_gpu_and_resume(micro_dir, corpus, tmp_path, bf16_runtime):
    runtime = bf16_runtime
    assert runtime.device.type == "cuda" and runtime.autocast_dtype == torch.bfloat16
    base, pre, tok = load(micro_dir)
    ds = CaptionDataset(corpus["train"], pre)
    cfg = MCLConfig(num_experts=2, k_img=2, k_txt=2, embed_batch=64,
                    train=TrainConfig(steps=4, global_batch=32, lr=1e-3, warmup_steps=1, ckpt_every=2))
    experts = run_mcl(base, ds, tok, cfg, tmp_path / "mcl", runtime)
    assert len(experts) == 2
    assert all(t.device.type == "cpu" for e in experts for t in e.values())
    assert ffn_distance(experts[1], experts[0]) > 0
    # a re-run (a resumed job) reads the stage back and hands the same weights on
    again = run_mcl(base.cuda(), ds, tok, dataclasses.replace(cfg), tmp_path / "mcl", runtime)
    for k, v in experts[1].items():
        assert again[1][k].device.type == "cpu" and torch.equal(again[1][k], v)
