"""Cluster-specialist experts: one partition each, trained on it alone; routers seeded from the partitions."""
import numpy as np
import pytest
import torch

from moeclip import load
from moeclip.config import ConfigError
from moeclip.data.dataset import CaptionDataset, Collate
from moeclip.io import load_npy, read_json
from moeclip.model.ffn import ffn_distance
from moeclip.moe import moe_layers, upcycle
from moeclip.runtime import Runtime
from moeclip.train.dist import make_runtime
from moeclip.train.loop import TrainConfig
from moeclip.train.mcl_stages import MCLConfig, run_mcl
from moeclip.train.specialists import init_routers_from_partitions


def _cfg(**kw) -> MCLConfig:
    return MCLConfig(num_experts=3, embed_batch=128, construction="specialists",
                     train=TrainConfig(steps=2, global_batch=32, lr=1e-2, warmup_steps=1, ckpt_every=5), **kw)


def test_specialists_train_on_their_partition(micro_dir, corpus, tmp_path):
    base, pre, tok = load(micro_dir)
    ds = CaptionDataset(corpus["train"], pre)
    experts = run_mcl(base, ds, tok, _cfg(), tmp_path / "mcl", make_runtime(), seed=0)
    assert len(experts) == 3
    partition = load_npy(tmp_path / "mcl" / "stage_0" / "groups.npy")
    assert sorted(np.unique(partition)) == [0, 1] and len(partition) == len(ds)
    rows = [read_json(tmp_path / "mcl" / f"stage_{p}" / "stage.json")["clusters"]["partition_rows"] for p in (1, 2)]
    assert rows == [int((partition == 0).sum()), int((partition == 1).sum())]
    assert ffn_distance(experts[1], experts[0]) > 0 and ffn_distance(experts[1], experts[2]) > 0
    again = run_mcl(base, ds, tok, _cfg(), tmp_path / "mcl", make_runtime(), seed=0)
    assert all(ffn_distance(a, b) == 0 for a, b in zip(again, experts))
    with pytest.raises(ConfigError, match="construction"):  # stages made one way are not reused the other
        run_mcl(base, ds, tok, MCLConfig(num_experts=3, embed_batch=128, train=_cfg().train), tmp_path / "mcl",
                make_runtime(), seed=0)


def test_subset_renumbers_ids(corpus):
    ds = CaptionDataset(corpus["train"])
    sub = ds.subset([5, 3, 5])
    assert len(sub) == 3 and sub.captions == [ds.captions[5], ds.captions[3], ds.captions[5]]
    assert sub.caption_ids.tolist()[0] == sub.caption_ids.tolist()[2] == 0 and sub.skips is ds.skips


def test_routers_point_at_partition_means(micro_dir, corpus):
    base, pre, tok = load(micro_dir)
    ds = CaptionDataset(corpus["val"], pre)
    moe = upcycle(base, num_experts=3, top_k=1)
    before = [layer.router.proj.weight.clone() for _, _, layer in moe_layers(moe)]
    partition = np.arange(len(ds)) % 2
    init_routers_from_partitions(moe, ds, partition, Collate(tok), Runtime.local("cpu"), rows_per_part=16)
    for (_, _, layer), old in zip(moe_layers(moe), before):
        w = layer.router.proj.weight
        assert torch.equal(w[0], old[0]) and not torch.equal(w[1:], old[1:])
        assert torch.allclose(w[1], -w[2] * (w[1].norm() / w[2].norm()), atol=1e-5)  # two parts: opposite
