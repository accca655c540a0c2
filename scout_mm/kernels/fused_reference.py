"""PyTorch references of the inference-only fused kernels (:mod:`scout_mm.kernels.fused`), same signatures.

These are the model's own math (HF Llama 4 rounding): the model runs them for training, on CPU, and whenever
autograd needs the graph; the fused kernels replace several of these small ops by one launch at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scout_mm.kernels import reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``rms_norm(x) * weight`` over the last dim: normalised in fp32 and cast back BEFORE the weight multiply,
    as HF does. (``F.rms_norm`` is one fused kernel on CUDA; the spelled-out form was 5.)"""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)
    return normed if weight is None else normed * weight


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: ``(x + delta, rms_norm(x + delta) * weight)``."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def add_residual(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x + (a + b)`` with the inner sum rounded first: the MoE block's residual (HF adds the routed output to
    the shared expert's, then the block output to the residual stream)."""
    return x + (a + b)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) — the complex form Llama 4 uses, not the half-split form.

    x (batch, seq, heads, head_dim); cos/sin (batch or 1, seq, head_dim // 2) in fp32 (the vision tower
    passes one table for all its tiles). Computed in fp32, cast back to x's dtype.
    """
    # One complex multiply (real * cos - imag * sin, real * sin + imag * cos): 2 kernels instead of 7.
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.complex(cos, sin)[:, :, None]).flatten(-2).type_as(x)


def rope_qk_norm(
    q: torch.Tensor,  # (batch, seq, n_heads, head_dim)
    k: torch.Tensor,  # (batch, seq, n_kv_heads, head_dim)
    cos: torch.Tensor,  # (batch or 1, seq, head_dim // 2) fp32
    sin: torch.Tensor,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k, then (``eps`` not None) the weightless L2 QK-norm of Llama 4's RoPE layers."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if eps is not None:
        q, k = rms_norm(q, None, eps), rms_norm(k, None, eps)
    return q, k


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(gate) * up`` (two roundings in half precision: after the silu and after the product)."""
    return F.silu(gate) * up


def router_topk(
    hidden: torch.Tensor, weight: torch.Tensor, top_k: int, shared_slot: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Llama 4 router: logits ``hidden (tokens, H) @ weight (E, H).T``, top-k over them, then the sigmoid of
    the chosen logits (in fp32, cast back, as HF). Returns (topk_weights, topk_ids, router_logits).
    ``shared_slot``: weights and ids get one more column, expert ``E`` with weight 1.0 (a folded shared expert)."""
    router_logits = F.linear(hidden, weight)
    top_logits, topk_ids = torch.topk(router_logits, top_k, dim=-1)
    topk_weights = torch.sigmoid(top_logits.float()).to(router_logits.dtype)
    if shared_slot:
        return append_shared_slot(topk_weights, topk_ids, weight.shape[0]) + (router_logits,)
    return topk_weights, topk_ids, router_logits


def add_rms_norm_router(
    x: torch.Tensor,
    delta: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    top_k: int,
    shared_slot: bool = False,
) -> tuple[torch.Tensor, ...]:
    """:func:`add_rms_norm` then :func:`router_topk` on the norm: ``(x + delta, h, topk_weights, topk_ids,
    router_logits)`` — a MoE decoder layer's post-attention residual add, norm and router."""
    x, h = add_rms_norm(x, delta, norm_weight, eps)
    return (x, h) + router_topk(h, weight, top_k, shared_slot=shared_slot)


def append_shared_slot(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One more routing slot per token: expert ``n_experts`` (the folded shared expert), weight exactly 1.0."""
    tokens = topk_ids.shape[0]
    weights = torch.cat([topk_weights, topk_weights.new_ones(tokens, 1)], dim=1)
    ids = torch.cat([topk_ids, topk_ids.new_full((tokens, 1), n_experts)], dim=1)
    return weights, ids


def write_kv_decode(
    k: torch.Tensor,  # (batch, 1, n_kv_heads, head_dim) new keys
    v: torch.Tensor,
    k_store: torch.Tensor,  # ring (batch, ring_size, n_kv_heads, head_dim) | pool (n_blocks, block_size, ...)
    v_store: torch.Tensor,
    positions: torch.Tensor,  # (batch,) position of each sequence's new token
    ring_size: int | None = None,
    block_table: torch.Tensor | None = None,  # (batch, max_blocks) int32, paged pool only
    block_size: int | None = None,
    k_scale_store: torch.Tensor | None = None,  # FP8 store: (.., .., n_kv_heads) fp32 scales of its rows
    v_scale_store: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write one decode token per sequence into a KV cache; returns the keys each sequence now sees
    ``kv_lens (batch,) int32``. Ring: slot ``p % ring_size`` of the sequence's ring (kv_lens = slot + 1).
    Paged pool: slot ``p % block_size`` of block ``block_table[b, p // block_size]`` (kv_lens = p + 1); a
    position past the table's width takes the row's last entry (never another sequence's blocks).
    An FP8 store (``k_scale_store`` / ``v_scale_store`` given) gets :func:`reference.quantize_kv_fp8` rows."""
    rows = torch.arange(k.shape[0], device=k.device)
    if ring_size is not None:
        where, lens = (rows, positions % ring_size), positions % ring_size + 1
    else:
        entries = (positions // block_size).clamp(max=block_table.shape[-1] - 1)
        blocks = block_table[rows, entries].long()
        where, lens = (blocks, positions % block_size), positions + 1
    for new, store, scales in ((k, k_store, k_scale_store), (v, v_store, v_scale_store)):
        if scales is None:
            store[where] = new[:, 0]
        else:
            store[where], scales[where] = reference.quantize_kv_fp8(new[:, 0])
    return lens.to(torch.int32)


def rope_write_kv_decode(
    q: torch.Tensor,  # (batch, 1, n_heads, head_dim)
    k: torch.Tensor,  # (batch, 1, n_kv_heads, head_dim)
    v: torch.Tensor,
    cos: torch.Tensor,  # (batch or 1, 1, head_dim // 2) fp32
    sin: torch.Tensor,
    eps: float | None,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    positions: torch.Tensor,  # (batch,)
    ring_size: int | None = None,
    block_table: torch.Tensor | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A RoPE layer's decode token: :func:`rope_qk_norm` on q and k, then :func:`write_kv_decode` of the rotated
    keys and the values. Returns (rotated q, kv_lens)."""
    q, k = rope_qk_norm(q, k, cos, sin, eps)
    kv_lens = write_kv_decode(k, v, k_store, v_store, positions, ring_size, block_table, block_size)
    return q, kv_lens
