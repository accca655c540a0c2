"""One dispatch point per operation: model code calls these names only.

``SCOUT_MM_KERNELS=auto|triton|reference`` picks the backend: ``auto`` (default) uses the Triton kernels on
CUDA tensors and the PyTorch references elsewhere; ``reference`` forces the references; ``triton`` forces
the kernels (also on CPU under ``TRITON_INTERPRET=1``, which is how CI tests them).
"""

from __future__ import annotations

import os

import torch

from scout_mm.kernels import int4_reference, reference

# Triton modules (flash_attention, flash_decode, moe) are imported on first use, so that CPU-only installs
# without Triton still import the package and run the references.
_HALF = (torch.float16, torch.bfloat16)

_BACKENDS = ("auto", "triton", "reference")


def backend() -> str:
    name = os.environ.get("SCOUT_MM_KERNELS", "auto").lower()
    if name not in _BACKENDS:
        raise ValueError(f"SCOUT_MM_KERNELS={name!r}; expected one of {_BACKENDS}")
    return name


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on these tensors should run its Triton kernel."""
    name = backend()
    if name == "reference":
        return False
    if name == "triton":
        return True
    return all(t.is_cuda for t in tensors)


def attention(q, k, v, *, scale, chunk_size=None, q_start=0, kv_start=None, q_scale=None):
    """Causal / chunked-local attention with GQA. See :func:`scout_mm.kernels.reference.attention`.

    On CUDA: the Triton kernel, or PyTorch SDPA for the cases where its semantics fit and it measured faster
    (:func:`scout_mm.kernels.flash_attention.prefer_sdpa`)."""
    kwargs = dict(scale=scale, chunk_size=chunk_size, q_start=q_start, kv_start=kv_start, q_scale=q_scale)
    if use_triton(q):
        from scout_mm.kernels import flash_attention as flash

        if flash.supports(q, k, v):
            sdpa_backend = (
                flash.prefer_sdpa(q, k, chunk_size, q_start, kv_start) if backend() == "auto" else None
            )
            if sdpa_backend is not None:
                return flash.sdpa_attention(q, k, v, sdpa_backend=sdpa_backend, **kwargs)
            return flash.attention(q, k, v, **kwargs)
    return reference.attention(q, k, v, **kwargs)


def decode_attention(q, k, v, *, scale, kv_lens=None, block_table=None, kv_start=None, q_scale=None):
    """Few-token attention over a contiguous or paged KV cache; returns (out, lse). See
    :func:`scout_mm.kernels.flash_decode.decode_attention` for the layouts."""
    kwargs = dict(scale=scale, kv_lens=kv_lens, block_table=block_table, kv_start=kv_start, q_scale=q_scale)
    if use_triton(q):
        from scout_mm.kernels import flash_decode

        return flash_decode.decode_attention(q, k, v, **kwargs)
    return reference.decode_attention(q, k, v, **kwargs)


def moe_experts(hidden, topk_weights, topk_ids, gate_up_proj, down_proj):
    """Routed SwiGLU experts. See :func:`scout_mm.kernels.reference.moe_experts`.

    ``auto`` runs the Triton kernels for bf16/fp16 on CUDA (their tuned tiles assume 2-byte elements)."""
    if use_triton(hidden) and (backend() == "triton" or hidden.dtype in _HALF):
        from scout_mm.kernels import moe

        return moe.moe_experts(hidden, topk_weights, topk_ids, gate_up_proj, down_proj)
    return reference.moe_experts(hidden, topk_weights, topk_ids, gate_up_proj, down_proj)


def int4_linear(x, qweight, scales, zeros, group_size):
    """``x (M, K) @ W (K, N)`` with W stored as packed Int4 (``scout_mm/quant/FORMAT.md``). See
    :func:`scout_mm.kernels.int4_reference.int4_linear`; on CUDA the W4A16 Triton kernels (GEMV / GEMM)."""
    if use_triton(x):
        from scout_mm.kernels import int4

        return int4.int4_linear(x, qweight, scales, zeros, group_size)
    return int4_reference.int4_linear(x, qweight, scales, zeros, group_size)


def int4_moe_experts(hidden, topk_weights, topk_ids, gate_up, down, group_size):
    """Routed SwiGLU experts with Int4 expert stacks ``gate_up``/``down`` = (qweight, scales, zeros or None).
    See :func:`scout_mm.kernels.int4_reference.int4_moe_experts`."""
    if use_triton(hidden):
        from scout_mm.kernels import int4

        return int4.int4_moe_experts(hidden, topk_weights, topk_ids, gate_up, down, group_size)
    return int4_reference.int4_moe_experts(hidden, topk_weights, topk_ids, gate_up, down, group_size)
