"""Recorded Triton configs of the fused MoE (``scout_mm.kernels.moe``), picked by rows per expert.

Tuned on an H100 (bf16, Scout shapes H=5120, I=8192, E=16) by ``python bench/bench_moe.py --tune``, which
prints a replacement for ``TUNED``; nothing is tuned at import. Every row-tiled kernel of one call shares
``route_block``: each kernel's ``BLOCK_M`` (and the weight-grad ``BLOCK_R``) must divide it.
"""

from __future__ import annotations


def _cfg(block_m, block_n, block_k, warps, stages, group_m=8):
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "GROUP_M": group_m,
        "num_warps": warps,
        "num_stages": stages,
    }


def _wgrad(block_p, block_q, block_r, warps, stages, group_m=8):
    return {
        "BLOCK_P": block_p,
        "BLOCK_Q": block_q,
        "BLOCK_R": block_r,
        "GROUP_M": group_m,
        "num_warps": warps,
        "num_stages": stages,
    }


# (upper bound on rows per expert, configs); the last bucket has no bound. Swept on an H100 80GB HBM3 on
# 2026-11-23, in the run that produced bench/results/moe_h100.md, at 1, 512, 4096 and 16384 tokens (top-2,
# 16 experts). The first bucket is decode: memory bound, each touched expert weight read once by a few deeply
# pipelined programs per expert.
TUNED = [
    (
        8,
        {
            "route_block": 16,
            "gate_up": _cfg(16, 128, 64, 4, 6, 1),
            "down": _cfg(16, 128, 128, 4, 4, 1),
            "down_bwd": _cfg(16, 64, 128, 4, 4, 1),
            "dx": _cfg(16, 64, 128, 4, 4, 1),
            "wgrad": _wgrad(64, 128, 16, 4, 3, 8),
        },
    ),
    (
        96,
        {
            "route_block": 64,
            "gate_up": _cfg(64, 128, 64, 4, 4, 8),
            "down": _cfg(64, 256, 64, 8, 4, 8),
            "down_bwd": _cfg(64, 64, 64, 4, 4, 8),
            "dx": _cfg(64, 256, 64, 8, 3, 8),
            "wgrad": _wgrad(128, 128, 64, 4, 4, 8),
        },
    ),
    (
        768,
        {
            "route_block": 128,
            "gate_up": _cfg(128, 128, 64, 8, 4, 8),
            "down": _cfg(128, 256, 64, 8, 4, 8),
            "down_bwd": _cfg(128, 128, 64, 8, 5, 8),
            "dx": _cfg(128, 256, 64, 8, 3, 8),
            "wgrad": _wgrad(128, 128, 64, 4, 4, 8),
        },
    ),
    (
        None,
        {
            "route_block": 128,
            "gate_up": _cfg(128, 128, 64, 8, 4, 16),
            "down": _cfg(128, 256, 64, 8, 4, 8),
            "down_bwd": _cfg(128, 128, 64, 8, 5, 8),
            "dx": _cfg(128, 256, 64, 8, 3, 8),
            "wgrad": _wgrad(128, 128, 64, 4, 4, 8),
        },
    ),
]

# Small tiles for the CPU interpreter (TRITON_INTERPRET=1), where block size only costs time.
INTERPRET = {
    "route_block": 16,
    "gate_up": _cfg(16, 16, 16, 4, 1, 2),
    "down": _cfg(16, 16, 16, 4, 1, 2),
    "down_bwd": _cfg(16, 16, 16, 4, 1, 2),
    "dx": _cfg(16, 16, 16, 4, 1, 2),
    "wgrad": _wgrad(16, 16, 16, 4, 1, 2),
}


def pick(rows_per_expert: float) -> dict:
    """The recorded configs for this many (token, slot) rows per expert."""
    for bound, configs in TUNED:
        if bound is None or rows_per_expert <= bound:
            return configs
    raise AssertionError("the last TUNED bucket must have no bound")
