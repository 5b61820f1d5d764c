"""Expert parallelism: an `MoEFFN` whose experts live on `deepspeed.moe.layer.MoE`, sharded over ranks.

DeepSpeed's layer brings the expert sharding, the all-to-all and the per-expert checkpoint files,
but its gate drops tokens by capacity, samples the second expert and computes its own l_aux. So
our `TopKRouter` routes (fp32 softmax, top-k, renormalised weights, no capacity limit) and a
`ReplayGate` hands that decision to DeepSpeed in the form its `MOELayer` expects. The layer stays
an `MoEFFN` (same `router`, `last_routing`, `last_mask`, `token_mask`), so `aux_losses`,
`set_trainable` and the expert-usage analysis work on it unchanged.

Sharding and gathering happen in place on a model that all ranks hold whole, so a training loop
can convert before `deepspeed.initialize` and convert back afterwards.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moeclip.moe.layer import MoEFFN
from moeclip.moe.router import Routing
from moeclip.moe.upcycle import TextPaddingMask

DS_EXPERTS = "experts.deepspeed_moe.experts.deepspeed_experts"  # local experts, relative to the layer


def resolve_ep_size(requested: int | None, world_size: int, num_experts: int) -> int:
    """`requested`, checked; None = the largest divisor of the world size not above the expert count."""
    if requested is None:
        return max(d for d in range(1, world_size + 1) if world_size % d == 0 and d <= max(num_experts, 1))
    if requested < 1 or world_size % requested:
        raise ValueError(f"ep_size {requested} must be >= 1 and divide the number of processes ({world_size})")
    return requested


class ReplayGate(nn.Module):
    """Stands in for DeepSpeed's `TopKGate`: returns the routing our router already made.

    `MOELayer` calls `gate(tokens, used_token, sparse_routes=True, use_tutel)` and wants
    (l_aux, capacity, E, expert ids [k, T], slot locations [k, T], weights [k, T], counts [E]).
    The capacity is the largest per-expert count over the expert-parallel group, so nothing drops.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.ep_group: Any = None
        self.pending: Routing | None = None
        self.wall_clock_breakdown = False

    def _set_ep_group(self, group: Any) -> None:
        self.ep_group = group

    def forward(self, tokens: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = True,
                use_tutel: bool = False) -> tuple:
        routing, self.pending = self.pending, None
        if routing is None:
            raise RuntimeError("ReplayGate called without a routing; call the ExpertParallelMoEFFN, not its experts")
        if not sparse_routes or use_tutel:
            raise RuntimeError("ReplayGate supports DeepSpeed's sparse-route dispatch only (no tutel)")
        flat = routing.experts.reshape(-1)  # (token, slot) pairs, token-major
        counts = torch.bincount(flat, minlength=self.num_experts)
        # slot location = how many earlier pairs went to the same expert (a stable sort, no [T, E] one-hot)
        order = torch.argsort(flat, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        locations = torch.empty_like(flat)
        locations[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        capacity = counts.max() if flat.numel() else counts.new_zeros(())
        capacity = torch.clamp(capacity, min=1)  # an empty batch still joins the all-to-all
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        k = routing.top_k
        l_aux = routing.logits.new_zeros(())  # ours are computed from last_routing by moeclip.moe.aux_losses
        return (l_aux, capacity, self.num_experts, routing.experts.t().to(torch.int32).contiguous(),
                locations.view(-1, k).t().to(torch.int32).contiguous(), routing.weights.t().float(), counts)


class ExpertParallelMoEFFN(MoEFFN):
    """`MoEFFN` with this rank's experts inside a DeepSpeed `MoE` (attribute `experts`).

    Parameter names keep `router.` and `experts.` under the layer, so name-based selection
    (`set_trainable`) is unchanged. When ep_size does not divide the expert count the layer is
    padded with idle experts that the router never picks (frozen, dropped on gathering).
    """

    def __init__(self, layer: MoEFFN, ep_size: int) -> None:
        nn.Module.__init__(self)  # MoEFFN's constructor builds local experts; this layer has remote ones
        from deepspeed.moe.layer import MoE

        self.router = layer.router
        self.num_real_experts = layer.num_experts
        padded = -(-layer.num_experts // ep_size) * ep_size
        template = layer.experts[0]
        self.experts = MoE(hidden_size=layer.router.proj.in_features, expert=template, num_experts=padded,
                           ep_size=ep_size, k=layer.top_k, capacity_factor=1.0, eval_capacity_factor=1.0,
                           min_capacity=0, noisy_gate_policy=None, drop_tokens=False, use_rts=False,
                           top2_2nd_expert_sampling=False)
        self.experts.deepspeed_moe.gate = ReplayGate(padded)
        self.experts.set_deepspeed_parallelism()  # creates the expert groups now: we need our ep rank
        group = self.experts.deepspeed_moe.ep_group
        self.ep_rank = dist.get_rank(group) if ep_size > 1 else 0
        self.token_mask = layer.token_mask
        self.last_routing: Routing | None = None
        self.last_mask: torch.Tensor | None = None
        with torch.no_grad():
            for i, local in enumerate(self.local_experts):
                e = self.global_expert(i)
                if e < self.num_real_experts:
                    for (_, p), (_, src) in zip(local.named_parameters(), layer.experts[e].named_parameters()):
                        p.copy_(src)
                else:
                    local.requires_grad_(False)

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.experts.deepspeed_moe.experts.deepspeed_experts

    @property
    def num_local_experts(self) -> int:
        return self.experts.num_local_experts

    @property
    def ep_size(self) -> int:
        return self.experts.ep_size

    @property
    def ep_group(self) -> Any:
        return self.experts.deepspeed_moe.ep_group

    def global_expert(self, local: int) -> int:
        return self.ep_rank * self.num_local_experts + local

    @property
    def num_experts(self) -> int:
        return self.num_real_experts

    @property
    def c_fc(self) -> nn.Linear:
        return self.local_experts[0].c_fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        self.last_routing = routing
        self.last_mask = self._real_token_mask(x.shape[:-1], x.device)
        self.experts.deepspeed_moe.gate.pending = routing
        out, _, _ = self.experts(tokens)
        return out.reshape(x.shape).to(x.dtype)

    def to_moe_ffn(self) -> MoEFFN:
        """Every rank gets every real expert (broadcast from its owner in the expert-parallel group)."""
        group, nl = self.ep_group, self.num_local_experts
        experts = []
        for e in range(self.num_real_experts):
            owner, local = divmod(e, nl)
            module = copy.deepcopy(self.local_experts[local if owner == self.ep_rank else 0])
            if self.ep_size > 1:
                src = dist.get_global_rank(group, owner)
                with torch.no_grad():
                    for p in module.parameters():
                        buf = p.data.contiguous()
                        dist.broadcast(buf, src=src, group=group)
                        p.data.copy_(buf)
            module.requires_grad_(True)
            experts.append(module)
        layer = MoEFFN(experts, self.router)
        layer.token_mask = self.token_mask
        return layer

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_real_experts}, top_k={self.top_k}, ep_size={self.ep_size}, "
                f"ep_rank={self.ep_rank}, local_experts={self.num_local_experts}")


def _replace_layers(model: nn.Module, convert) -> dict[int, nn.Module]:
    """Apply `convert` to every MoE layer in place; re-point the text padding hook at the new layers."""
    swapped: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, MoEFFN):
            new = convert(name, module)
            if new is not module:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
                swapped[id(module)] = new
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, TextPaddingMask):
                hook.layers = [swapped.get(id(layer), layer) for layer in hook.layers]
    return swapped


def shard_moe_layers(model: nn.Module, ep_size: int) -> dict[str, str | None]:
    """Replace every `MoEFFN` by an `ExpertParallelMoEFFN` holding this rank's experts, in place.

    Returns {old parameter name: new name, or None when that expert lives on another rank}, so
    lists of parameter names (trainable sets) carry over. Needs DeepSpeed's process groups
    (`deepspeed.init_distributed`; accelerate does it for a DeepSpeed launch).
    """
    renames: dict[str, str | None] = {}

    def convert(name: str, layer: MoEFFN) -> nn.Module:
        if isinstance(layer, ExpertParallelMoEFFN):
            return layer
        new = ExpertParallelMoEFFN(layer, ep_size)
        for e in range(layer.num_experts):
            owner, local = divmod(e, new.num_local_experts)
            for pname, _ in layer.experts[e].named_parameters():
                renames[f"{name}.experts.{e}.{pname}"] = (f"{name}.{DS_EXPERTS}.{local}.{pname}"
                                                         if owner == new.ep_rank else None)
        return new

    _replace_layers(model, convert)
    return renames


def gather_moe_layers(model: nn.Module) -> None:
    """Inverse of `shard_moe_layers`, in place, on every rank (a collective: all ranks must call it)."""
    _replace_layers(model, lambda _, layer: layer.to_moe_ffn() if isinstance(layer, ExpertParallelMoEFFN)
                    else layer)
