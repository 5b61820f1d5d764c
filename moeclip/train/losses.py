"""Symmetric multi-positive InfoNCE, gathered across ranks.

Synthetic (and real) corpora repeat captions; two rows with the same caption, or the same
image, are both right answers, so each row's target is spread over all its positives instead of
punishing the model for a "negative" that is really a positive.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order; gradients flow back to each rank's own rows.

    Ranks may hold different row counts (a skipped bad image shrinks a micro-batch), so rows are
    padded to the largest count for the collective and cut back afterwards.
    """
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_gather
    sizes = _gather_sizes(x.shape[0], x.device)
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    parts = all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def gather_ids(x: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return x
    sizes = _gather_sizes(x.shape[0], x.device)
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([p[:n] for p, n in zip(out, sizes)], dim=0)


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    t = torch.tensor([n], device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(o) for o in out]


def positive_mask(caption_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    return (caption_ids[:, None] == caption_ids[None, :]) | (image_ids[:, None] == image_ids[None, :])


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
              positives: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean of image->text and text->image "any positive" cross-entropy: -log(sum of positive probs).

    With unique pairs this is plain InfoNCE; with duplicates, mass on any positive counts (as in the
    retrieval metric), so the model is not pushed to tell identical captions apart. Label smoothing
    mixes in the cross-entropy against the uniform distribution. Features are L2-normalised and
    already gathered; `positives` is the [N, N] bool mask.
    """
    logits = logit_scale * image_features.float() @ text_features.float().t()
    return 0.5 * (_any_positive_ce(logits, positives, label_smoothing)
                  + _any_positive_ce(logits.t(), positives.t(), label_smoothing))


def _any_positive_ce(logits: torch.Tensor, positives: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=1)
    loss = -torch.logsumexp(log_p.masked_fill(~positives, float("-inf")), dim=1)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * log_p.mean(dim=1)
    return loss.mean()
