"""One dispatch point per operation: model code calls these names only.

``SCOUT_MM_KERNELS=auto|triton|reference`` picks the backend: ``auto`` (default) uses the Triton kernels on
CUDA tensors and the PyTorch references elsewhere; ``reference`` forces the references; ``triton`` forces
the kernels (also on CPU under ``TRITON_INTERPRET=1``, which is how CI tests them).
"""

from __future__ import annotations

import os

import torch

from scout_mm.kernels import reference

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
    """Causal / chunked-local attention with GQA. See :func:`scout_mm.kernels.reference.attention`."""
    return reference.attention(
        q, k, v, scale=scale, chunk_size=chunk_size, q_start=q_start, kv_start=kv_start, q_scale=q_scale
    )


def moe_experts(hidden, topk_weights, topk_ids, gate_up_proj, down_proj):
    """Routed SwiGLU experts. See :func:`scout_mm.kernels.reference.moe_experts`."""
    if use_triton(hidden):
        from scout_mm.kernels import moe  # imported on first use: CPU-only installs never load Triton

        return moe.moe_experts(hidden, topk_weights, topk_ids, gate_up_proj, down_proj)
    return reference.moe_experts(hidden, topk_weights, topk_ids, gate_up_proj, down_proj)
