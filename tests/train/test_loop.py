"""A run interrupted after a checkpoint and resumed ends with exactly the weights of an uninterrupted one."""
import shutil

import torch

from moeclip import load
from moeclip.data.dataset import CaptionDataset
from moeclip.train.dist import make_runtime
from moeclip.train.loop import TrainConfig, latest_checkpoint, train
from moeclip.train.losses import clip_loss, positive_mask


def _run(micro_dir, corpus, out, steps, stop_at=None):
    model, pre, tok = load(micro_dir)
    ds = CaptionDataset(corpus["train"], pre)
    cfg = TrainConfig(steps=steps, global_batch=32, lr=1e-3, warmup_steps=2, ckpt_every=2, stop_at=stop_at)
    res = train(model, ds, tok, cfg, out, make_runtime(), [n for n, _ in model.named_parameters()])
    return model, res


def test_resume_equals_uninterrupted(micro_dir, corpus, tmp_path):
    full, _ = _run(micro_dir, corpus, tmp_path / "full", 6)
    # a run that stopped right after its step-3 checkpoint
    part, _ = _run(micro_dir, corpus, tmp_path / "killed", 6, stop_at=3)
    assert latest_checkpoint(tmp_path / "killed").name == "step_0000003"
    # a new process continues the same run to 6 steps
    resumed, res = _run(micro_dir, corpus, tmp_path / "killed", 6)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_any_positive_loss():
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    ids = torch.arange(4)
    # unique pairs: equals plain InfoNCE (cross-entropy against the diagonal)
    logits = 10.0 * f @ f.t()
    plain = 0.5 * (torch.nn.functional.cross_entropy(logits, ids) + torch.nn.functional.cross_entropy(logits.t(), ids))
    assert torch.allclose(clip_loss(f, f, 10.0, positive_mask(ids, ids)), plain, atol=1e-6)
    # rows 0 and 1 share a caption (identical text features): as shared positives the pair is no
    # longer a contradiction, so the loss is lower than when they count as negatives of each other
    t = f.clone()
    t[1] = t[0]
    cap = torch.tensor([0, 0, 2, 3])
    shared = clip_loss(f, t, 10.0, positive_mask(cap, ids))
    separate = clip_loss(f, t, 10.0, positive_mask(ids, ids))
    assert shared < separate - 0.1
