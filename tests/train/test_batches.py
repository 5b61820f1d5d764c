"""One loader per run: the same micro-batches as epoch-by-epoch sampling, whatever the workers."""
import numpy as np
import torch

from moeclip import load
from moeclip.data.dataset import CaptionDataset
from moeclip.data.sampler import GroupBatchSampler
from moeclip.train.batches import RunBatches
from moeclip.train.dist import make_runtime
from moeclip.train.loop import TrainConfig, train


def _by_epoch(sampler: GroupBatchSampler, steps: int) -> list[list[int]]:
    out, epoch = [], 0
    while len(out) < steps * sampler.grad_accum:
        out += [mb for gb in sampler.global_batches(epoch) for mb in sampler.rank_micro_batches(gb)]
        epoch += 1
    return out[:steps * sampler.grad_accum]


def test_run_batches_cross_epochs_and_resume_mid_epoch():
    labels = np.repeat(np.arange(3), [40, 25, 7])
    sampler = GroupBatchSampler(labels, len(labels), global_batch=16, world_size=2, rank=1, grad_accum=2, seed=4)
    spe = sampler.steps_per_epoch()
    steps = 2 * spe + 3
    full = _by_epoch(sampler, steps)
    assert list(RunBatches(sampler, 0, steps)) == full and len(RunBatches(sampler, 0, steps)) == len(full)
    start = spe + 2  # resume inside the second epoch
    assert list(RunBatches(sampler, start, steps)) == full[start * 2:]
    assert list(RunBatches(sampler, steps, steps)) == []


def _train(micro_dir, corpus, out, workers):
    model, pre, tok = load(micro_dir)
    ds = CaptionDataset(corpus["train"], pre)
    # 256 rows / 64 = 4 steps an epoch: 6 steps cross an epoch boundary
    cfg = TrainConfig(steps=6, global_batch=64, lr=1e-3, warmup_steps=2, ckpt_every=100, num_workers=workers,
                      prefetch_factor=1 if workers else None)
    train(model, ds, tok, cfg, out, make_runtime(), ["visual.proj", "text_projection"])
    return model


def test_workers_train_the_same_weights(micro_dir, corpus, tmp_path):
    a = _train(micro_dir, corpus, tmp_path / "w0", 0)
    b = _train(micro_dir, corpus, tmp_path / "w2", 2)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
