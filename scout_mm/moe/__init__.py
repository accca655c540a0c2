"""Mixture-of-Experts components: router, routed + shared experts, load-balancing loss."""

from scout_mm.moe.layer import Experts, MoE, SwiGLU
from scout_mm.moe.router import Router, load_balancing_loss

__all__ = ["MoE", "Experts", "SwiGLU", "Router", "load_balancing_loss"]
