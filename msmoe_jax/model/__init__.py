from msmoe_jax.model.moe import (
                                 MoE,
                                 RouterStats,
                                 load_balancing_loss,
                                 local_experts,
                                 route_topk,
                                 router_z_loss,
)
from msmoe_jax.model.ops import LayerOps, reference_ops
from msmoe_jax.model.transformer import Transformer

__all__ = ["LayerOps", "MoE", "RouterStats", "Transformer", "load_balancing_loss", "local_experts",
           "reference_ops", "route_topk", "router_z_loss"]
