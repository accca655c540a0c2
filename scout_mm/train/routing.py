"""MoE training hooks applied from outside the model: routing capture for the load-balancing loss and expert
load statistics, and per-layer activation checkpointing that replays the router's decisions.

Recomputing a checkpointed MoE layer in the backward pass would recompute the router's top-k; bf16 noise
(or any non-deterministic kernel) can flip a choice, which changes how many tokens each expert gets, so the
recomputed activations no longer match the forward pass. Instead the forward pass records each router's
``topk_ids`` and the recomputation replays them; only the (differentiable) router logits are recomputed.
"""

from __future__ import annotations

import contextlib
import types
from collections import deque

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scout_mm.moe import MoE, Router, load_balancing_loss


class RoutingTap:
    """Installed as every router's ``choose_experts``: plain top-k, plus

    - ``captured``: ``(router_logits, topk_ids)`` of each MoE layer in the current forward pass (not the
      recomputation), for the aux loss and the expert load histogram;
    - under :meth:`recording` the chosen ids are kept per router, under :meth:`replaying` they are handed
      back instead of a new top-k (used by :func:`enable_activation_checkpointing`).
    """

    def __init__(self, model: nn.Module):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.n_experts = self.routers[0].weight.shape[0] if self.routers else 0
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._saved: dict[int, deque] = {id(r): deque() for r in self.routers}
        self._mode: str | None = None
        for router in self.routers:
            router.choose_experts = self

    def __call__(self, router: Router, router_logits: torch.Tensor) -> torch.Tensor:
        if self._mode == "replay":
            saved = self._saved[id(router)]
            if not saved:
                raise RuntimeError("activation checkpointing recomputed a router with no recorded decision")
            return saved.popleft()
        # Ids carry no gradient; detaching also keeps forward and recomputation saving the same tensors.
        topk_ids = torch.topk(router_logits.detach(), router.top_k, dim=-1).indices
        if self._mode == "record":
            self._saved[id(router)].append(topk_ids)
        self.captured.append((router_logits, topk_ids))
        return topk_ids

    def start_forward(self) -> None:
        """Forget the previous forward pass (its backward, if any, has run)."""
        self.captured = []
        for saved in self._saved.values():
            saved.clear()

    @contextlib.contextmanager
    def _as(self, mode: str):
        previous, self._mode = self._mode, mode
        try:
            yield
        finally:
            self._mode = previous

    def recording(self):
        return self._as("record")

    def replaying(self):
        return self._as("replay")

    def aux_loss(self, token_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Mean load-balancing loss over the MoE layers of the last forward (1.0 = uniform routing)."""
        if not self.captured:
            return None
        mask = token_mask.reshape(-1) if token_mask is not None else None
        losses = [load_balancing_loss(logits, ids, mask) for logits, ids in self.captured]
        return torch.stack(losses).mean()

    @torch.no_grad()
    def expert_load(self, token_mask: torch.Tensor | None) -> torch.Tensor:
        """(n_moe_layers, n_experts) count of routed (token, slot) pairs in the last forward, padding left out.

        Uses scatter_add rather than masking + bincount, which would wait for the GPU every step."""
        counts = []
        for _, ids in self.captured:
            weight = torch.ones(ids.shape, device=ids.device)
            if token_mask is not None:
                weight = weight * token_mask.reshape(-1, 1).to(weight.dtype)
            counts.append(
                torch.zeros(self.n_experts, device=ids.device).scatter_add_(
                    0, ids.flatten(), weight.flatten()
                )
            )
        return torch.stack(counts) if counts else torch.zeros(0, self.n_experts)


def enable_activation_checkpointing(model: nn.Module, tap: RoutingTap) -> int:
    """Checkpoint every text decoder layer (non-reentrant), replaying router decisions on recomputation.

    The layers' ``forward`` is wrapped in place, so parameter names (and checkpoints) do not change.
    Returns the number of wrapped layers.
    """
    layers = model.language_model.model.layers
    for layer in layers:
        inner = layer.forward

        def forward(self, *args, _inner=inner, **kwargs):
            if not (torch.is_grad_enabled() and self.training):
                return _inner(*args, **kwargs)
            return checkpoint(
                _inner,
                *args,
                use_reentrant=False,
                context_fn=lambda: (tap.recording(), tap.replaying()),
                **kwargs,
            )

        layer.forward = types.MethodType(forward, layer)
    return len(layers)


def moe_modules(model: nn.Module) -> list[type]:
    """Module classes that ZeRO-3 should treat as leaves (gather all their parameters at once): the MoE
    block, whose experts are used data-dependently."""
    return [MoE] if any(isinstance(m, MoE) for m in model.modules()) else []
