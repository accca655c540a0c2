"""Feed-forward blocks: the SwiGLU MLP (dense layers and the shared expert) and the MoE block."""

from __future__ import annotations

import torch
from torch import nn

from scout_mm import kernels
from scout_mm.kernels import fused_reference
from scout_mm.moe.router import Router

# MoE.add_norm_forward on a folded layer: the residual add + post-attention norm inside the router kernel (one
# launch at decode). False: the norm kernel, then the router (benchmark A/B).
FUSED_NORM_ROUTER = True


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; parameter names follow HF ``Llama4TextMLP``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj = None  # gate|up as one matmul, set by scout_mm.fusion.fuse_projections (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(kernels.silu_mul(gate, up))


class Experts(nn.Module):
    """Stacked routed-expert weights in the HF Llama 4 layout."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, hidden_size, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, intermediate_size, hidden_size))

    def forward(self, hidden, topk_weights, topk_ids):
        return kernels.moe_experts(hidden, topk_weights, topk_ids, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    """Routed experts (top-k, sigmoid weights on the expert input) plus an optional shared expert.

    forward returns ``(out, topk_ids, router_logits)`` so the caller can compute the aux loss without this
    module keeping state between calls.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        n_experts: int,
        top_k: int,
        shared_expert: bool = True,
    ):
        super().__init__()
        self.router = Router(hidden_size, n_experts, top_k)
        self.experts = Experts(n_experts, hidden_size, intermediate_size)
        self.shared_expert = SwiGLU(hidden_size, intermediate_size) if shared_expert else None
        # True once scout_mm.fusion.fuse_shared_expert made the shared expert the last expert of self.experts
        # (inference): every token gets one more slot, that expert with routing weight 1.0.
        self.shared_slot = False

    def _route_with_shared_slot(self, hidden: torch.Tensor):
        """(weights, ids) of the k routed slots + the shared slot (expert E, weight 1.0: the weight scales the
        expert input, so 1.0 is exact), and the routed (ids, logits) of the E real experts for the aux loss. At
        decode the fused router kernel writes the extra slot (no launch of its own)."""
        router = self.router
        if router.choose_experts is None:
            weights, ids, logits = kernels.router_topk(hidden, router.weight, router.top_k, shared_slot=True)
            return weights, ids, ids[:, :-1], logits
        topk_weights, topk_ids, logits = router(hidden)  # replayed routing (training): the slot appended here
        weights, ids = fused_reference.append_shared_slot(topk_weights, topk_ids, router.weight.shape[0])
        return weights, ids, topk_ids, logits

    def add_norm_forward(
        self, x: torch.Tensor, delta: torch.Tensor, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x + delta`` and this block's output on ``norm(x + delta)`` (the decoder layer's residual add and
        post-attention RMSNorm ``norm``): ``(x + delta, out, topk_ids, router_logits)``. With the shared expert
        folded into the routed stacks (inference), the add, the norm and the router are one kernel at decode
        (:func:`scout_mm.kernels.add_rms_norm_router`); otherwise ``norm`` then :meth:`forward`."""
        if not (FUSED_NORM_ROUTER and self.shared_slot and self.router.choose_experts is None):
            x, h = norm(x, delta)
            out, topk_ids, router_logits = self(h)
            return x, out, topk_ids, router_logits
        shape = x.shape
        x, h, weights, ids, router_logits = kernels.add_rms_norm_router(
            x.reshape(-1, shape[-1]), delta.reshape(-1, shape[-1]), norm.weight, norm.eps, self.router.weight,
            self.router.top_k, shared_slot=True,
        )  # fmt: skip
        out = self.experts(h, weights, ids)
        return x.view(shape), out.view(shape), ids[:, :-1], router_logits

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``residual``: return ``residual + out`` instead of ``out`` (one kernel with the shared-expert sum at
        inference)."""
        shape = x.shape
        hidden = x.reshape(-1, shape[-1])  # (tokens, hidden)
        if (
            self.shared_slot
        ):  # shared + routed in one expert call: all k + 1 slots summed in fp32, one rounding
            weights, ids, topk_ids, router_logits = self._route_with_shared_slot(hidden)
            out = self.experts(hidden, weights, ids)
            if residual is not None:
                out = residual.reshape(hidden.shape) + out
            return out.view(shape), topk_ids, router_logits
        topk_weights, topk_ids, router_logits = self.router(hidden)
        out = self.experts(hidden, topk_weights, topk_ids)
        if self.shared_expert is not None and residual is not None:
            out = kernels.add_residual(residual.reshape(hidden.shape), self.shared_expert(hidden), out)
            return out.view(shape), topk_ids, router_logits
        if self.shared_expert is not None:
            out = self.shared_expert(hidden) + out
        if residual is not None:
            out = residual.reshape(hidden.shape) + out
        return out.view(shape), topk_ids, router_logits
