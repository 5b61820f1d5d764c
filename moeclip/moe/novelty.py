"""A shared expert gated by novelty: a sample unlike the training data goes through the base FFN.

A learned fusion gate sees only the data it is fine-tuned on, so it learns to prefer the routed experts for
every input, and what the base knew of other data is lost (docs/results.md §4b: after adapting to a new
domain, every model keeps ~5 of the old domain's 60 points of R@1). This gate is not learned. It reads the
tokens that enter the tower's first FFN (block 0's attention output, which fine-tuning routers and experts
cannot move), L2-normalised; a token's novelty is its distance to the nearest of K centroids of the training
data's tokens, and a sample's is its most novel token's (PatchCore's image score, Roth et al. 2022). A sample
further out than a high quantile of held-out training samples' scores goes to the frozen base FFN (gate 1)
in every MoE layer of the tower, so the tower computes for it exactly what the base did. The rule is Expert Gate's (Aljundi et al., CVPR 2017: send a test sample to
the expert whose training data it resembles), with the base as the expert for everything else.
Training mode `full` would move block 0's attention and so the gate's input: use `router+experts`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layer import MoEFFN

DEFAULT_CLUSTERS = 1024
DEFAULT_QUANTILE = 0.99
MAX_FIT_TOKENS = 200_000  # k-means sample: enough for 1024 centroids, seconds on a CPU


class NoveltyGate(nn.Module):
    """Per-sample gate g in [0, 1] (1 = base FFN) from a sample's tokens; fitted by `fit`. Unfitted, the
    threshold is +inf: every sample goes to the routed experts."""

    def __init__(self, width: int, clusters: int = DEFAULT_CLUSTERS) -> None:
        super().__init__()
        self.register_buffer("centroids", torch.zeros(clusters, width))
        self.register_buffer("threshold", torch.tensor(float("inf")))
        self.register_buffer("softness", torch.tensor(1.0))
        self.layers: list[MoEFFN] = []  # the tower's MoE layers (not submodules: they live in their blocks)

    def score(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [B]: the largest distance of a token to its nearest centroid."""
        x = F.normalize(tokens.detach().float(), dim=-1).reshape(-1, tokens.shape[-1])
        c = self.centroids.float()
        # |x - c|^2 = 1 + |c|^2 - 2 x.c (|x| = 1), as one matmul: what cdist does, and FLOP counters see it
        squared = (1.0 + c.pow(2).sum(1) - 2.0 * x @ c.T).clamp_min(0.0)
        return squared.min(dim=1).values.sqrt().reshape(tokens.shape[0], -1).max(dim=1).values

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """A ramp over one `softness` centred on the threshold: exactly 0 (routed experts alone) below it,
        exactly 1 (the base FFN alone) above it."""
        return ((self.score(tokens) - self.threshold) / self.softness + 0.5).clamp(0.0, 1.0)

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor, seed: int = 0, quantile: float = DEFAULT_QUANTILE) -> dict[str, float]:
        """Fit on training samples' tokens [N, L, d]: centroids by k-means on 4/5 of the samples, the threshold
        at `quantile` of the other fifth's scores (held out, so not biased low), the softness a quarter of the
        way from their median to it. Returns the fitted values."""
        from sklearn.cluster import MiniBatchKMeans
        if not 0.5 < quantile < 1.0:
            raise ValueError(f"novelty quantile must be in (0.5, 1), got {quantile}")
        n, k = tokens.shape[0], self.centroids.shape[0]
        if n // 5 < 20:
            raise ValueError(f"the novelty gate needs at least 100 training samples to fit, got {n}")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        held, fitted = order[: n // 5], order[n // 5:]
        flat = F.normalize(tokens[fitted].float(), dim=-1).reshape(-1, tokens.shape[-1])
        used = min(k, flat.shape[0] // 4)  # fewer tokens than 4 per centroid: fewer centroids, the rest copies
        rows = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:MAX_FIT_TOKENS]
        km = MiniBatchKMeans(n_clusters=used, init="k-means++", n_init=1, random_state=seed, batch_size=4096)
        km.fit(flat[rows].numpy())
        centres = torch.from_numpy(km.cluster_centers_)
        self.centroids.copy_(centres[torch.arange(k) % used].to(self.centroids))
        scores = self.score(tokens[held].to(self.centroids.device)).cpu().double().numpy()
        threshold = float(np.quantile(scores, quantile))
        softness = max((threshold - float(np.median(scores))) / 4.0, 1e-6)
        self.threshold.fill_(threshold)
        self.softness.fill_(softness)
        return {"threshold": threshold, "softness": softness, "median_score": float(np.median(scores)),
                "samples": n, "held_out": len(held), "clusters": used, "quantile": quantile}

    def extra_repr(self) -> str:
        return f"clusters={self.centroids.shape[0]}, width={self.centroids.shape[1]}"


class NoveltyHook:
    """Forward hook on block 0's `ln_2` (what enters its FFN): sets every MoE layer's per-sample gate, shaped to
    broadcast over the blocks' token layout ([B, 1], or [1, B] where the blocks are sequence-first). A callable
    object, so `copy.deepcopy(model)` re-points it at the copy's gate and layers."""

    def __init__(self, gate: NoveltyGate, batch_first: bool) -> None:
        self.gate = gate
        self.batch_first = batch_first

    def tokens(self, output: torch.Tensor) -> torch.Tensor:
        """The hooked module's output as [B, L, d]."""
        return output if self.batch_first else output.transpose(0, 1)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        value = self.gate(self.tokens(output))
        value = value[:, None] if self.batch_first else value[None, :]
        for layer in self.gate.layers:
            layer.sample_gate = value


def install_novelty_gate(model: nn.Module, prefix: str, layers: list[MoEFFN],
                         clusters: int = DEFAULT_CLUSTERS) -> NoveltyGate:
    """Give the tower whose block list is at `prefix` a gate (`<transformer>.novelty_gate`) over its MoE `layers`."""
    if any(layer.shared is None for layer in layers):
        raise ValueError("a novelty gate needs a shared expert in every MoE layer (shared_expert=True)")
    transformer = model.get_submodule(prefix.rsplit(".", 1)[0])
    first_norm = model.get_submodule(prefix)[0].ln_2
    gate = NoveltyGate(layers[0].router.proj.in_features, clusters).to(layers[0].router.proj.weight.device)
    gate.layers = list(layers)
    for key, hook in list(first_norm._forward_hooks.items()):
        if isinstance(hook, NoveltyHook):
            del first_norm._forward_hooks[key]
    transformer.novelty_gate = gate
    first_norm.register_forward_hook(NoveltyHook(gate, getattr(transformer, "batch_first", True)))
    return gate


def input_hook(model: nn.Module, gate: NoveltyGate) -> tuple[nn.Module, NoveltyHook]:
    """The module whose output feeds `gate` (block 0's ln_2 of its tower), and the hook that reads it."""
    for module in model.modules():
        for hook in module._forward_hooks.values():
            if isinstance(hook, NoveltyHook) and hook.gate is gate:
                return module, hook
    raise ValueError("novelty gate without its input hook; rebuild the model with moeclip.moe.upcycle")


def novelty_gates(model: nn.Module) -> dict[str, NoveltyGate]:
    """{module name: gate} of every tower that has one."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NoveltyGate)}
