"""PyTorch references of the Int4 (W4A16) ops: they define the semantics the Triton kernels in
:mod:`scout_mm.kernels.int4` must match, and run everywhere (CPU CI, any dtype).

Packed layout (documented in full in ``scout_mm/quant/FORMAT.md``): a logical weight ``W (K, N)`` used as
``x @ W`` is stored as ``qweight`` int32 ``(K // 8, N)``, where bits ``4j .. 4j+3`` of ``qweight[r, n]`` hold the
unsigned code ``q[8r + j, n]`` in ``[0, 15]``; ``scales (K // group_size, N)`` and, for asymmetric weights,
``zeros (K // group_size, N)`` (integer zero points stored in the scale dtype; symmetric weights have the
implicit zero point 8). ``W[k, n] = (q[k, n] - zero[k // G, n]) * scale[k // G, n]``, computed in fp32 and
rounded once to the activation dtype. Expert stacks add a leading expert dim to all three tensors.
"""

from __future__ import annotations

import torch

from scout_mm.kernels import reference

SYMMETRIC_ZERO = 8  # implicit zero point of symmetric weights: codes 0..15 stand for -8..7


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """(..., K // 8, N) int32 -> (..., K, N) int32 codes in [0, 15]."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    codes = (qweight.unsqueeze(-2) >> shifts[:, None]) & 0xF  # (..., K // 8, 8, N)
    return codes.flatten(-3, -2)


def dequantize(
    qweight: torch.Tensor,  # (..., K // 8, N) int32
    scales: torch.Tensor,  # (..., K // G, N)
    zeros: torch.Tensor | None,  # (..., K // G, N) or None (symmetric)
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # (..., K, N)
    """The dense weight ``(q - zero) * scale`` (fp32 math, one rounding to ``dtype``)."""
    codes = unpack_int4(qweight).float()
    scale = scales.float().repeat_interleave(group_size, dim=-2)
    zero = SYMMETRIC_ZERO if zeros is None else zeros.float().repeat_interleave(group_size, dim=-2)
    return ((codes - zero) * scale).to(dtype)


def int4_linear(
    x: torch.Tensor,  # (M, K)
    qweight: torch.Tensor,  # (K // 8, N) int32
    scales: torch.Tensor,  # (K // G, N)
    zeros: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:  # (M, N) in x.dtype
    """``x @ dequantize(...)``: the weight is dequantized to the activation dtype, then one matmul."""
    return x @ dequantize(qweight, scales, zeros, group_size, x.dtype)


def int4_moe_experts(
    hidden: torch.Tensor,  # (tokens, hidden)
    topk_weights: torch.Tensor,  # (tokens, top_k)
    topk_ids: torch.Tensor,  # (tokens, top_k)
    gate_up: tuple,  # (qweight (E, H // 8, 2I), scales (E, H // G, 2I), zeros or None)
    down: tuple,  # (qweight (E, I // 8, H), scales (E, I // G, H), zeros or None)
    group_size: int,
) -> torch.Tensor:  # (tokens, hidden)
    """:func:`scout_mm.kernels.reference.moe_experts` on the dequantized expert stacks (routing weight on the
    expert INPUT, SwiGLU experts, sum over slots)."""
    gate_up_proj = dequantize(*gate_up, group_size, hidden.dtype)
    down_proj = dequantize(*down, group_size, hidden.dtype)
    return reference.moe_experts(hidden, topk_weights, topk_ids, gate_up_proj, down_proj)
