"""Sparse Mixture-of-Experts FFNs for open_clip CLIP models (CLIP-MoE upcycling)."""
from .dispatch import DISPATCHERS, loop_dispatch, sorted_dispatch
from .layer import MoEFFN
from .losses import aux_losses, load_balancing_loss, router_z_loss
from .router import Routing, TopKRouter
from .trainable import TRAINABLE_MODES, set_trainable
from .upcycle import build_moe, expert_ffn_state_dict, moe_config, moe_layers, upcycle

__all__ = [
    "DISPATCHERS", "MoEFFN", "Routing", "TRAINABLE_MODES", "TopKRouter", "aux_losses", "build_moe",
    "expert_ffn_state_dict", "load_balancing_loss", "loop_dispatch", "moe_config", "moe_layers",
    "router_z_loss", "set_trainable", "sorted_dispatch", "upcycle",
]
