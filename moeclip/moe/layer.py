"""A sparse MoE FFN that drops into an open_clip block in place of its dense `mlp`.

One layer class: a router that decides, and an experts backend that computes. The backend is
`LocalExperts` (every expert on this device, tokens moved by a dispatcher) or, during a DeepSpeed
launch, the expert-parallel one of `moeclip.distributed` (experts sharded over ranks); both take
`(tokens, routing)`, so routing, losses and analysis never depend on where the experts live.
The layer takes and returns one tensor of the block's shape, so open_clip's blocks need no change;
the routing of the last forward stays on the module (`last_routing`, `last_mask`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .dispatch import DISPATCHERS
from .router import DEFAULT_ROUTER_INIT_STD, Routing, TopKRouter

SHARED_GATES = ("learned", "novelty")  # how a shared expert is mixed in: per-token fusion layer, or per sample


class LocalExperts(nn.ModuleList):
    """Every expert on this device. Experts keep the dense mlp's submodule names (`c_fc`, activation,
    `c_proj`), so an FFN weight set maps onto expert i by name: `...mlp.experts.{i}.c_fc.weight`."""

    def __init__(self, experts: list[nn.Module], dispatch: str = "sorted") -> None:
        super().__init__(experts)
        self.dispatch = dispatch

    @property
    def dispatch(self) -> str:
        return self._dispatch

    @dispatch.setter
    def dispatch(self, name: str) -> None:
        if name not in DISPATCHERS:
            raise ValueError(f"unknown dispatch {name!r}; expected one of {sorted(DISPATCHERS)}")
        self._dispatch = name

    @property
    def first_expert(self) -> nn.Module:
        return self[0]

    def _run_expert(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        return self[index](tokens)

    def forward(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        """tokens [T, d] -> [T, d], every token through its k experts (dropless)."""
        return DISPATCHERS[self._dispatch](tokens, routing, self._run_expert, len(self))

    def extra_repr(self) -> str:
        return f"dispatch={self._dispatch!r}"


class MoEFFN(nn.Module):
    """Router + experts backend, and optionally a shared expert beside them.

    The shared expert (DeepSeekMoE; CLIP-FMoE's fusion gate) is a dense FFN every token goes through; a learned
    per-token gate g = sigmoid(fusion(x)) mixes it in: g * shared(x) + (1 - g) * routed(x). Started from the
    base FFN, it keeps what the base knew while the routed experts specialise. The gate starts at 0.5.
    With `shared_gate="novelty"` the gate is not learned but set per sample, before the tower runs, by a
    `moeclip.moe.novelty.NoveltyGate` (`sample_gate`, 1 = the shared expert alone): no `fusion` layer then.
    """

    def __init__(self, experts: list[nn.Module] | nn.Module, router: TopKRouter, dispatch: str = "sorted",
                 shared: nn.Module | None = None, shared_gate: str = "learned") -> None:
        super().__init__()
        if not isinstance(experts, nn.Module):
            experts = LocalExperts(list(experts), dispatch)
        if isinstance(experts, LocalExperts) and len(experts) != router.num_experts:
            raise ValueError(f"{len(experts)} experts but the router has {router.num_experts} outputs")
        self.router = router
        self.experts = experts
        self.shared = shared
        if shared_gate not in SHARED_GATES:
            raise ValueError(f"unknown shared_gate {shared_gate!r}; expected one of {SHARED_GATES}")
        self.shared_gate = shared_gate if shared is not None else None
        self.fusion: nn.Linear | None = None
        if shared is not None and shared_gate == "learned":
            d_model = router.proj.in_features
            self.fusion = nn.Linear(d_model, 1).to(device=router.proj.weight.device, dtype=router.proj.weight.dtype)
            nn.init.zeros_(self.fusion.weight)
            nn.init.zeros_(self.fusion.bias)
        # Real-token mask [B, L] (False = padding), set per batch by the text tower's embedding hook.
        self.token_mask: torch.Tensor | None = None
        self.last_routing: Routing | None = None
        self.last_mask: torch.Tensor | None = None  # flat [T] bool matching last_routing, or None = all real
        self.sample_gate: torch.Tensor | None = None  # per-sample gate, [B, 1] or [1, B] (shared_gate="novelty")

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, top_k: int, jitter: float = 0.0,
                   router_init_std: float = DEFAULT_ROUTER_INIT_STD, dispatch: str = "sorted",
                   shared_expert: bool = False, shared_gate: str = "learned") -> "MoEFFN":
        """Every expert (and the shared one) starts as an exact copy of `mlp` (activation, weights, dtype, device)."""
        if isinstance(mlp, MoEFFN):
            raise ValueError("this FFN is already an MoE layer")
        c_fc, c_proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
        if not (isinstance(c_fc, nn.Linear) and isinstance(c_proj, nn.Linear)):
            raise ValueError("the dense mlp needs nn.Linear 'c_fc' and 'c_proj' submodules (open_clip layout)")
        router = TopKRouter(c_fc.in_features, num_experts, top_k, jitter=jitter, init_std=router_init_std)
        router.to(device=c_fc.weight.device, dtype=c_fc.weight.dtype)
        experts = [copy.deepcopy(mlp) for _ in range(num_experts)]
        return cls(experts, router, dispatch=dispatch, shared=copy.deepcopy(mlp) if shared_expert else None,
                   shared_gate=shared_gate)

    @property
    def num_experts(self) -> int:
        """Experts the router chooses among (an expert-parallel backend may hold idle padding experts)."""
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def c_fc(self) -> nn.Linear:
        """open_clip reads `blocks[0].mlp.c_fc.weight.dtype` to pick its cast dtype; keep that working."""
        return self.experts.first_expert.c_fc

    @property
    def dispatch(self) -> str:
        return getattr(self.experts, "dispatch", type(self.experts).__name__)

    @dispatch.setter
    def dispatch(self, name: str) -> None:
        if not isinstance(self.experts, LocalExperts):
            raise ValueError("dispatch applies to local experts; an expert-parallel layer moves tokens by all-to-all")
        self.experts.dispatch = name

    def _real_token_mask(self, leading_shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """Flat [T] mask, or None when unset or set for another batch shape (e.g. a CoCa class token)."""
        mask = self.token_mask
        if mask is None or tuple(mask.shape) != tuple(leading_shape):
            return None
        return mask.reshape(-1).to(device=device, dtype=torch.bool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> [..., d]; every token goes through its k experts (dropless)."""
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        self.last_routing = routing
        self.last_mask = self._real_token_mask(x.shape[:-1], x.device)
        out = self.experts(tokens, routing)
        if self.shared is not None:
            gate = self._novelty_gate(x) if self.fusion is None else torch.sigmoid(self.fusion(tokens).float())
            gate = gate.to(out.dtype)
            out = gate * self.shared(tokens) + (1 - gate) * out
        return out.reshape(x.shape)

    def _novelty_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The batch's per-sample gate as a [T, 1] column over the flat tokens of x ([B, L, d] or [L, B, d])."""
        g = self.sample_gate
        try:
            return g.to(device=x.device, dtype=torch.float32).expand(x.shape[:-1]).reshape(-1, 1)
        except (AttributeError, RuntimeError):
            raise RuntimeError("this MoE layer's shared expert is novelty-gated, and no gate was set for this batch "
                               "(run the whole tower, whose input hook sets it: moeclip.moe.novelty)") from None

    def __getstate__(self) -> dict:
        """Per-batch state is transient; a routing still attached to a graph would break `copy.deepcopy`."""
        state = self.__dict__.copy()
        state.update(token_mask=None, last_routing=None, last_mask=None, sample_gate=None)
        return state

    def extra_repr(self) -> str:
        gate = f", shared_gate={self.shared_gate!r}" if self.shared is not None else ""
        return f"num_experts={self.num_experts}, top_k={self.top_k}, shared_expert={self.shared is not None}{gate}"
