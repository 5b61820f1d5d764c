"""Turning a dense open_clip CLIP into an MoE CLIP (DMU step 6), and rebuilding that structure.

Expert i of every chosen block gets FFN weight set i (`moeclip.model.ffn` format, keyed by the dense
model's names); without weight sets every expert is a copy of the dense FFN (the sparse-upcycling
baseline). Everything else in the block stays shared.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..model.ffn import FFN_PARTS, TOWERS, select_blocks, tower_blocks, tower_prefix
from .drop import drop_reinit
from .layer import MoEFFN
from .novelty import DEFAULT_CLUSTERS, install_novelty_gate, novelty_gates
from .router import DEFAULT_ROUTER_INIT_STD

DEFAULT_NUM_EXPERTS = 4


class TextPaddingMask:
    """Forward pre-hook on the text token embedding: tells the text MoE layers which tokens are real.

    A callable object rather than a closure so `copy.deepcopy(model)` re-points it at the copy's layers.
    """

    def __init__(self, layers: list[MoEFFN], pad_id: int) -> None:
        self.layers = layers
        self.pad_id = pad_id

    def __call__(self, module: nn.Module, args: tuple) -> None:
        real = args[0] != self.pad_id  # [B, L]
        for layer in self.layers:
            layer.token_mask = real


def _text_embedding_and_pad_id(model: nn.Module) -> tuple[nn.Module, int]:
    text = getattr(model, "text", None)  # CustomTextCLIP keeps its text tower here
    embedding = getattr(model, "token_embedding", None)
    if embedding is None:
        embedding = getattr(text, "token_embedding", None)
    if embedding is None:
        raise ValueError("cannot find the text token embedding to hook the padding mask on")
    pad_id = getattr(model, "pad_id", None)
    if pad_id is None:
        pad_id = getattr(text, "pad_id", 0)  # open_clip tokenizers pad with 0
    return embedding, int(pad_id)


def _install_text_mask_hook(model: nn.Module) -> None:
    """One hook per model, covering every text MoE layer (re-installed when more layers appear)."""
    embedding, pad_id = _text_embedding_and_pad_id(model)
    for key, hook in list(embedding._forward_pre_hooks.items()):
        if isinstance(hook, TextPaddingMask):
            del embedding._forward_pre_hooks[key]
    layers = [layer for tower, _, layer in moe_layers(model) if tower == "text"]
    if layers:
        embedding.register_forward_pre_hook(TextPaddingMask(layers, pad_id))


def _check_expert_sets(model: nn.Module, experts: list[dict[str, torch.Tensor]],
                       plan: list[tuple[str, int]]) -> None:
    """Fail before touching the model, naming the expert and the key."""
    state = model.state_dict()
    for e, weight_set in enumerate(experts):
        for tower, block in plan:
            for part in FFN_PARTS:
                for kind in ("weight", "bias"):
                    key = f"{tower_prefix(model, tower)}.{block}.mlp.{part}.{kind}"
                    if key not in state:
                        continue  # the dense FFN has no such parameter (e.g. bias-free Linear)
                    if key not in weight_set:
                        raise ValueError(f"expert {e}: FFN weight set has no '{key}'")
                    if tuple(weight_set[key].shape) != tuple(state[key].shape):
                        raise ValueError(f"expert {e}: '{key}' has shape {tuple(weight_set[key].shape)}, "
                                         f"the model's is {tuple(state[key].shape)}")


def upcycle(model: nn.Module, experts: list[dict[str, torch.Tensor]] | None = None,
            num_experts: int | None = None, top_k: int = 2, layers: Sequence[int] | None = None,
            towers: Sequence[str] = TOWERS, jitter: float = 0.0,
            router_init_std: float = DEFAULT_ROUTER_INIT_STD, drop_ratio: float = 0.0,
            shared_expert: bool = False, shared_gate: str = "learned",
            novelty_clusters: int = DEFAULT_CLUSTERS) -> nn.Module:
    """Replace the FFN of the chosen blocks of each tower by an MoEFFN, in place; returns `model`.

    experts: FFN weight sets, expert i <- set i (set 0 is normally the base model's own FFNs);
        None = every expert a copy of the dense FFN.
    num_experts: defaults to len(experts), or 4 without weight sets; must agree with len(experts).
    layers: block indices shared by both towers (None = all, negatives count from the end).
    drop_ratio: Drop-Upcycling (`moeclip.moe.drop`): re-draw this fraction of each expert's hidden units
        after the experts are set (0 = plain copies / the given sets).
    shared_expert: also keep the dense FFN as an always-on shared expert behind a learned per-token gate, or,
        with shared_gate="novelty", behind a per-sample novelty gate per tower (`moeclip.moe.novelty`; fit it
        with `moeclip.train.novelty_fit` before training).
    """
    if shared_gate == "novelty" and not shared_expert:
        raise ValueError("shared_gate='novelty' gates the shared expert: set shared_expert=True as well")
    if experts is not None:
        if not experts:
            raise ValueError("experts is an empty list")
        if num_experts is not None and num_experts != len(experts):
            raise ValueError(f"num_experts={num_experts} but {len(experts)} expert weight sets were given")
        num_experts = len(experts)
    elif num_experts is None:
        num_experts = DEFAULT_NUM_EXPERTS
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")

    plan = [(tower, block) for tower in towers
            for block in select_blocks(len(tower_blocks(model, tower)), layers)]
    for tower, block in plan:
        if isinstance(tower_blocks(model, tower)[block].mlp, MoEFFN):
            raise ValueError(f"{tower} block {block} is already an MoE layer")
    if experts is not None:
        _check_expert_sets(model, experts, plan)

    for tower, block in plan:
        blk = tower_blocks(model, tower)[block]
        layer = MoEFFN.from_dense(blk.mlp, num_experts, top_k, jitter=jitter, router_init_std=router_init_std,
                                  shared_expert=shared_expert, shared_gate=shared_gate)
        if experts is not None:
            prefix = f"{tower_prefix(model, tower)}.{block}.mlp."
            with torch.no_grad():
                for e, weight_set in enumerate(experts):
                    for name, param in layer.experts[e].named_parameters():
                        if prefix + name in weight_set:
                            param.copy_(weight_set[prefix + name])
        if drop_ratio > 0:
            drop_reinit(layer, drop_ratio)
        blk.mlp = layer
    if "text" in towers:
        _install_text_mask_hook(model)
    if shared_gate == "novelty":
        for tower in towers:
            layers = [layer for t, _, layer in moe_layers(model) if t == tower]
            if layers:
                install_novelty_gate(model, tower_prefix(model, tower), layers, novelty_clusters)
    return model


def moe_layers(model: nn.Module) -> list[tuple[str, int, MoEFFN]]:
    """(tower, block index, layer) for every MoE FFN, image tower first."""
    found = []
    for tower in TOWERS:
        try:
            blocks = tower_blocks(model, tower)
        except ValueError:  # tower without transformer blocks: cannot hold MoE layers
            continue
        found += [(tower, i, blk.mlp) for i, blk in enumerate(blocks) if isinstance(blk.mlp, MoEFFN)]
    return found


def moe_config(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable description of the MoE structure, enough for `build_moe` to rebuild it."""
    found = moe_layers(model)
    if not found:
        raise ValueError("the model has no MoE layers")
    shapes = {(layer.num_experts, layer.top_k, layer.router.jitter, layer.shared is not None) for _, _, layer in found}
    if len(shapes) > 1:
        raise ValueError(f"MoE layers differ in (num_experts, top_k, jitter, shared expert): {sorted(shapes)}")
    num_experts, top_k, jitter, shared = shapes.pop()
    gates = novelty_gates(model)
    return {
        "num_experts": num_experts,
        "top_k": top_k,
        "jitter": jitter,
        **({"shared_expert": True} if shared else {}),  # absent = no shared expert (older model dirs too)
        **({"shared_gate": "novelty", "novelty_clusters": next(iter(gates.values())).centroids.shape[0]}
           if gates else {}),  # absent = the learned fusion gate
        "layers": {tower: [i for t, i, _ in found if t == tower] for tower in TOWERS},
    }


def build_moe(model: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    """Rebuild the MoE structure of `cfg` on a fresh dense model, ready for `load_state_dict`."""
    for tower, blocks in cfg["layers"].items():
        if blocks:
            upcycle(model, num_experts=cfg["num_experts"], top_k=cfg["top_k"], layers=blocks,
                    towers=(tower,), jitter=cfg.get("jitter", 0.0), router_init_std=0.0,  # weights are loaded next
                    shared_expert=cfg.get("shared_expert", False), shared_gate=cfg.get("shared_gate", "learned"),
                    novelty_clusters=cfg.get("novelty_clusters", DEFAULT_CLUSTERS))
    return model


def expert_ffn_state_dict(model: nn.Module, expert: int) -> dict[str, torch.Tensor]:
    """Expert `expert` of every MoE layer as an FFN weight set (dense names): the inverse of `upcycle`."""
    out = {}
    for tower, block, layer in moe_layers(model):
        prefix = f"{tower_prefix(model, tower)}.{block}.mlp."
        for name, param in layer.experts[expert].named_parameters():
            if name.split(".")[0] in FFN_PARTS:
                out[prefix + name] = param.detach().clone()
    return out
