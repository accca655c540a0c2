"""One dispatch point per operation: model code calls these names only.

``SCOUT_MM_KERNELS=auto|triton|reference`` picks the backend: ``auto`` (default) uses the Triton kernels on
CUDA tensors and the PyTorch references elsewhere; ``reference`` forces the references; ``triton`` forces
the kernels (also on CPU under ``TRITON_INTERPRET=1``, which is how CI tests them).

The inference-only fused kernels (:mod:`scout_mm.kernels.fused`: norms, RoPE, router, KV writes; no backward)
also follow ``SCOUT_MM_FUSED=auto|on|off``: ``auto`` (default) = wherever the backend runs Triton, ``on`` forces
them (CPU interpreter tests), ``off`` keeps the PyTorch path; and never while autograd needs the graph.
"""

from __future__ import annotations

import os

import torch

from scout_mm.kernels import fused_reference, int4_reference, reference

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
        _check_forced_triton("SCOUT_MM_KERNELS=triton", "the Triton kernels", tensors)
        return True
    return all(t.is_cuda for t in tensors)


def _check_forced_triton(setting: str, kernels: str, tensors) -> None:
    """A ValueError naming ``setting`` when it forces Triton kernels onto CPU tensors without the interpreter
    (Triton would fail deep inside the launch with "0 active drivers")."""
    if os.environ.get("TRITON_INTERPRET") != "1" and tensors and not any(t.is_cuda for t in tensors):
        raise ValueError(
            f"{setting} on CPU tensors: {kernels} need CUDA tensors, or TRITON_INTERPRET=1 to interpret them on "
            "the CPU (slow; for tests)"
        )


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


def decode_attention(q, k, v, *, scale, kv_lens=None, block_table=None, kv_start=None, q_scale=None, k_scale=None,
                     v_scale=None):  # fmt: skip
    """Few-token attention over a contiguous or paged KV cache, FP8 with ``k_scale`` / ``v_scale``; returns (out,
    lse). See :func:`scout_mm.kernels.flash_decode.decode_attention` for the layouts."""
    kwargs = dict(scale=scale, kv_lens=kv_lens, block_table=block_table, kv_start=kv_start, q_scale=q_scale,
                  k_scale=k_scale, v_scale=v_scale)  # fmt: skip
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


# ---------------------------------------------------------------------------------------------- fused (inference)
_FUSED_MODES = ("auto", "on", "off")
FUSED_MAX_NORM_DIM = 32768  # the norm kernel holds one row per program
# The router kernel reads the whole router weight per token; more tokens: cuBLAS + top-k.
ROUTER_MAX_TOKENS = 64
ROUTER_MAX_EXPERTS = 128


def use_fused(*tensors: torch.Tensor) -> bool:
    """Whether the inference-only fused kernels should run on these tensors (inputs and weights)."""
    mode = os.environ.get("SCOUT_MM_FUSED", "auto").lower()
    if mode not in _FUSED_MODES:
        raise ValueError(f"SCOUT_MM_FUSED={mode!r}; expected one of {_FUSED_MODES}")
    if mode == "off" or backend() == "reference":
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # no backward: training keeps the PyTorch path
    if mode == "on":
        _check_forced_triton("SCOUT_MM_FUSED=on", "the fused Triton kernels", tensors)
        return True
    return use_triton(*tensors)


def rms_norm(x, weight, eps):
    """``rms_norm(x) * weight`` (weight None: no weight). See :func:`scout_mm.kernels.fused_reference.rms_norm`."""
    ok = (weight is None or weight.dtype == x.dtype) and x.shape[-1] <= FUSED_MAX_NORM_DIM
    if ok and use_fused(x, *([weight] if weight is not None else [])):
        from scout_mm.kernels import fused

        return fused.rms_norm(x, weight, eps)
    return fused_reference.rms_norm(x, weight, eps)


def add_rms_norm(x, delta, weight, eps):
    """``(x + delta, rms_norm(x + delta) * weight)``. See :func:`scout_mm.kernels.fused_reference.add_rms_norm`."""
    if (
        weight.dtype == x.dtype == delta.dtype
        and x.shape[-1] <= FUSED_MAX_NORM_DIM
        and use_fused(x, delta, weight)
    ):
        from scout_mm.kernels import fused

        return fused.add_rms_norm(x, delta, weight, eps)
    return fused_reference.add_rms_norm(x, delta, weight, eps)


def add_residual(x, a, b):
    """``x + (a + b)``. See :func:`scout_mm.kernels.fused_reference.add_residual`."""
    if use_fused(x, a, b):
        from scout_mm.kernels import fused

        return fused.add_residual(x, a, b)
    return fused_reference.add_residual(x, a, b)


def rope_qk_norm(q, k, cos, sin, eps):
    """RoPE on q and k (+ QK-norm when ``eps`` is not None). See :func:`scout_mm.kernels.fused_reference.rope_qk_norm`."""
    if use_fused(q, k):
        from scout_mm.kernels import fused

        return fused.rope_qk_norm(q, k, cos, sin, eps)
    return fused_reference.rope_qk_norm(q, k, cos, sin, eps)


def silu_mul(gate, up):
    """``silu(gate) * up``. See :func:`scout_mm.kernels.fused_reference.silu_mul`."""
    if use_fused(gate, up):
        from scout_mm.kernels import fused

        return fused.silu_mul(gate, up)
    return fused_reference.silu_mul(gate, up)


def router_topk(hidden, weight, top_k, shared_slot=False):
    """Router logits, top-k, sigmoid weights. See :func:`scout_mm.kernels.fused_reference.router_topk`; the
    fused kernel serves few tokens (decode), cuBLAS + top-k the rest. ``shared_slot``: one more column per
    token (expert ``E``, weight 1.0) for a MoE whose shared expert is folded into the routed stacks."""
    few = (
        hidden.shape[0] <= ROUTER_MAX_TOKENS
        and weight.shape[0] <= ROUTER_MAX_EXPERTS
        and weight.dtype == hidden.dtype
    )
    if few and use_fused(hidden, weight):
        from scout_mm.kernels import fused

        return fused.router_topk(hidden, weight, top_k, shared_slot=shared_slot)
    return fused_reference.router_topk(hidden, weight, top_k, shared_slot=shared_slot)


def add_rms_norm_router(x, delta, norm_weight, eps, weight, top_k, shared_slot=False):
    """``add_rms_norm`` then ``router_topk`` on the norm, for (tokens, H) ``x``/``delta``: ``(x + delta, h,
    topk_weights, topk_ids, router_logits)``. See :func:`scout_mm.kernels.fused_reference.add_rms_norm_router`;
    for few tokens one fused kernel, else the two steps (each dispatched as usual)."""
    few = (
        x.dim() == 2
        and x.shape[0] <= ROUTER_MAX_TOKENS
        and weight.shape[0] <= ROUTER_MAX_EXPERTS
        and x.shape[-1] <= FUSED_MAX_NORM_DIM
        and x.dtype == delta.dtype == norm_weight.dtype == weight.dtype
        and delta.shape == x.shape
    )
    if few and use_fused(x, delta, norm_weight, weight):
        from scout_mm.kernels import fused

        return fused.add_rms_norm_router(x, delta, norm_weight, eps, weight, top_k, shared_slot=shared_slot)
    x, h = add_rms_norm(x, delta, norm_weight, eps)
    return (x, h) + router_topk(h, weight, top_k, shared_slot=shared_slot)


def write_kv_decode(k, v, k_store, v_store, positions, ring_size=None, block_table=None, block_size=None,
                    k_scale_store=None, v_scale_store=None):  # fmt: skip
    """One decode token per sequence into a ring or paged KV cache (FP8 with its scale stores); returns
    ``kv_lens``. See :func:`scout_mm.kernels.fused_reference.write_kv_decode`."""
    kwargs = dict(ring_size=ring_size, block_table=block_table, block_size=block_size, k_scale_store=k_scale_store,
                  v_scale_store=v_scale_store)  # fmt: skip
    if use_fused(k, v) and k_store.is_contiguous() and v_store.is_contiguous():
        from scout_mm.kernels import fused

        return fused.write_kv_decode(k, v, k_store, v_store, positions, **kwargs)
    return fused_reference.write_kv_decode(k, v, k_store, v_store, positions, **kwargs)


def rope_write_kv_decode(q, k, v, cos, sin, eps, k_store, v_store, positions, ring_size=None, block_table=None,
                         block_size=None):  # fmt: skip
    """A RoPE layer's decode token: RoPE (+ QK-norm) of q and k, the rotated keys and the values written into a
    ring or paged KV cache; returns (rotated q, kv_lens). One launch where the fused kernels run. See
    :func:`scout_mm.kernels.fused_reference.rope_write_kv_decode`."""
    kwargs = dict(ring_size=ring_size, block_table=block_table, block_size=block_size)
    if use_fused(q, k, v) and k_store.is_contiguous() and v_store.is_contiguous():
        from scout_mm.kernels import fused

        return fused.rope_write_kv_decode(q, k, v, cos, sin, eps, k_store, v_store, positions, **kwargs)
    return fused_reference.rope_write_kv_decode(q, k, v, cos, sin, eps, k_store, v_store, positions, **kwargs)
