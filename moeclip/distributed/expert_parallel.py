"""Expert parallelism: an experts backend for `MoEFFN` on `deepspeed.moe.layer.MoE`, sharded over ranks.

DeepSpeed's layer brings the expert sharding, the all-to-all and the per-expert checkpoint files,
but its gate drops tokens by capacity, samples the second expert and computes its own l_aux. So
our `TopKRouter` routes (fp32 softmax, top-k, renormalised weights, no capacity limit) and a
`ReplayGate` hands that decision to DeepSpeed in the form its `MOELayer` expects. Only the layer's
`experts` change (LocalExperts <-> this backend); the layer, its router, `last_routing`, `token_mask`
and the text padding hook stay, so `aux_losses`, `set_trainable` and the analysis work unchanged.

Sharding and gathering happen in place on a model that all ranks hold whole, so a training loop
can convert before `deepspeed.initialize` and convert back afterwards.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moeclip.moe.layer import LocalExperts, MoEFFN
from moeclip.moe.router import Routing

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
            raise RuntimeError("ReplayGate called without a routing; call the MoE layer, not its experts")
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


_BACKEND: type | None = None


def expert_parallel_experts_class() -> type:
    """`ExpertParallelExperts`, made on first use: it is a DeepSpeed `MoE` (the engine finds expert parameters,
    groups and checkpoint files by that type), and DeepSpeed is imported only by launches that use it."""
    global _BACKEND
    if _BACKEND is None:
        from deepspeed.moe.layer import MoE

        class ExpertParallelExperts(MoE):
            """This rank's experts of one layer, inside DeepSpeed's `MoE`; same call as `LocalExperts`.

            When ep_size does not divide the expert count the layer is padded with idle experts that the
            router never picks (frozen, dropped on gathering).
            """

            def __init__(self, local: LocalExperts, ep_size: int, top_k: int) -> None:
                template = local.first_expert
                padded = -(-len(local) // ep_size) * ep_size
                super().__init__(hidden_size=template.c_fc.in_features, expert=template, num_experts=padded,
                                 ep_size=ep_size, k=top_k, capacity_factor=1.0, eval_capacity_factor=1.0,
                                 min_capacity=0, noisy_gate_policy=None, drop_tokens=False, use_rts=False,
                                 top2_2nd_expert_sampling=False)
                self.deepspeed_moe.gate = ReplayGate(padded)
                self.set_deepspeed_parallelism()  # creates the expert groups now: we need our ep rank
                self.num_real_experts = len(local)
                self.local_dispatch = local.dispatch  # for the way back
                self.ep_rank = dist.get_rank(self.ep_group) if ep_size > 1 else 0
                with torch.no_grad():
                    for i, mine in enumerate(self.local_experts):
                        e = self.global_expert(i)
                        if e < self.num_real_experts:
                            for (_, p), (_, src) in zip(mine.named_parameters(), local[e].named_parameters()):
                                p.copy_(src)
                        else:
                            mine.requires_grad_(False)

            @property
            def local_experts(self) -> nn.ModuleList:
                return self.deepspeed_moe.experts.deepspeed_experts

            @property
            def first_expert(self) -> nn.Module:
                return self.local_experts[0]

            @property
            def ep_group(self) -> Any:
                return self.deepspeed_moe.ep_group

            def global_expert(self, local: int) -> int:
                return self.ep_rank * self.num_local_experts + local

            def forward(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
                self.deepspeed_moe.gate.pending = routing
                out, _, _ = super().forward(tokens)
                return out.to(tokens.dtype)

            def to_local(self) -> LocalExperts:
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
                return LocalExperts(experts, self.local_dispatch)

            def extra_repr(self) -> str:
                return (f"experts={self.num_real_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                        f"local_experts={self.num_local_experts}")

        _BACKEND = ExpertParallelExperts
    return _BACKEND


def is_expert_parallel(layer: MoEFFN) -> bool:
    return not isinstance(layer.experts, LocalExperts)


def make_expert_parallel(layer: MoEFFN, ep_size: int) -> MoEFFN:
    """Swap `layer`'s local experts for this rank's expert-parallel shard, in place; returns the layer.
    Needs DeepSpeed's process groups (`deepspeed.init_distributed`; accelerate does it for a DeepSpeed launch)."""
    if not is_expert_parallel(layer):
        layer.experts = expert_parallel_experts_class()(layer.experts, ep_size, layer.top_k)
    return layer


def make_local(layer: MoEFFN) -> MoEFFN:
    """Inverse of `make_expert_parallel`, in place (a collective: every rank of the group must call it)."""
    if is_expert_parallel(layer):
        layer.experts = layer.experts.to_local()
    return layer


def _layers(model: nn.Module) -> list[tuple[str, MoEFFN]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFFN)]


def shard_moe_layers(model: nn.Module, ep_size: int) -> dict[str, str | None]:
    """Every `MoEFFN` of `model` keeps only this rank's experts, on DeepSpeed's expert-parallel layer.

    Returns {old parameter name: new name, or None when that expert lives on another rank}, so
    lists of parameter names (trainable sets) carry over.
    """
    renames: dict[str, str | None] = {}
    for name, layer in _layers(model):
        if is_expert_parallel(layer):
            continue
        local = layer.experts
        make_expert_parallel(layer, ep_size)
        nl = layer.experts.num_local_experts
        for e in range(len(local)):
            owner, i = divmod(e, nl)
            for pname, _ in local[e].named_parameters():
                renames[f"{name}.experts.{e}.{pname}"] = (f"{name}.{DS_EXPERTS}.{i}.{pname}"
                                                         if owner == layer.experts.ep_rank else None)
    return renames


def gather_moe_layers(model: nn.Module) -> None:
    """Inverse of `shard_moe_layers`, in place, on every rank (a collective: all ranks must call it)."""
    for _, layer in _layers(model):
        make_local(layer)
