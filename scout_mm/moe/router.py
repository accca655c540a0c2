"""Top-k sigmoid router and the load-balancing auxiliary loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scout_mm import kernels


class Router(nn.Module):
    """Linear router: top-k over the logits, then a sigmoid of the chosen logits (Llama 4).

    Unlike softmax routers, the weights of the chosen experts are independent sigmoids and do not sum to 1.
    """

    def __init__(self, hidden_size: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(n_experts, hidden_size))
        # Optional ``(router, router_logits) -> topk_ids`` that replaces the top-k choice. Training code sets it
        # from outside to record routing decisions and replay them when activation checkpointing recomputes
        # a layer (scout_mm.train.routing); None = plain top-k.
        self.choose_experts = None

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (tokens, hidden) -> topk_weights (tokens, k), topk_ids (tokens, k), logits (tokens, E)."""
        if self.choose_experts is None:  # plain top-k: one kernel for few tokens at inference
            return kernels.router_topk(hidden, self.weight, self.top_k)
        router_logits = F.linear(hidden, self.weight)
        topk_ids = self.choose_experts(self, router_logits)
        top_logits = router_logits.gather(-1, topk_ids)
        # HF takes the sigmoid in fp32 and casts back to the activation dtype.
        topk_weights = torch.sigmoid(top_logits.float()).to(router_logits.dtype)
        return topk_weights, topk_ids, router_logits


def load_balancing_loss(
    router_logits: torch.Tensor,  # (tokens, n_experts)
    topk_ids: torch.Tensor,  # (tokens, top_k)
    token_mask: torch.Tensor | None = None,  # (tokens,) bool, False = padding
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * p_e``.

    ``f_e`` is the fraction of routed (token, slot) pairs sent to expert ``e`` and ``p_e`` the mean softmax
    router probability of ``e``, both over non-padding tokens. It equals 1.0 for perfectly uniform routing
    whatever top_k is, and grows as routing collapses onto few experts.
    """
    n_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    assigned = F.one_hot(topk_ids, n_experts).sum(dim=1).float()  # (tokens, E)
    if token_mask is not None:
        keep = token_mask.to(probs.dtype)[:, None]
        n_tokens = keep.sum().clamp(min=1)
        probs, assigned = probs * keep, assigned * keep
    else:
        n_tokens = torch.tensor(float(max(router_logits.shape[0], 1)), device=probs.device)
    fraction = assigned.sum(0) / (n_tokens * topk_ids.shape[-1])
    mean_prob = probs.sum(0) / n_tokens
    return n_experts * torch.sum(fraction * mean_prob)
