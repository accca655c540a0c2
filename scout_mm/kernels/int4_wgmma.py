"""EXPERIMENT (session 19): W4A16 for few rows with an asynchronous wgmma, the dequantised weight as its register
operand A and the activations as its shared-memory operand B.

Same swap-AB scheme and register chain as :mod:`scout_mm.kernels.int4_mma` (the weight's N columns are the MMA's
64-row side; the operand K order is the chain's), but the MMA of group ``i`` runs on the tensor cores while the
warps dequantise group ``i + 1``: a warpgroup issues 16 wgmma instructions a group instead of 128 mma.sync.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from scout_mm.kernels.int4_mma import COLS_PERM, _code_pairs, _index4, _split, _to_operand_rows
from scout_mm.kernels.launch import arrival_counters


@gluon.jit
def _operand(
    packed, offset, W: gl.constexpr, KB: gl.constexpr, IS_BF16: gl.constexpr, a_layout: gl.constexpr
):
    """(32 W, 32 KB) ``q - zero`` in operand order, in the wgmma register-A layout."""
    words = _to_operand_rows(packed, W, KB)
    offset = _to_operand_rows(offset, W, KB)
    offset2 = gl.join(offset, offset)
    v0 = _code_pairs(gl.join(words, words), offset2, IS_BF16)
    w1 = words >> 4
    v1 = _code_pairs(gl.join(w1, w1), offset2, IS_BF16)
    w2 = words >> 8
    v2 = _code_pairs(gl.join(w2, w2), offset2, IS_BF16)
    w3 = words >> 12
    v3 = _code_pairs(gl.join(w3, w3), offset2, IS_BF16)
    a = gl.join(gl.join(v0, v1), gl.join(v2, v3))
    a = gl.reshape(gl.permute(a, COLS_PERM.value), (32 * W, 32 * KB))
    return gl.convert_layout(a, a_layout, assert_trivial=True)


@gluon.jit
def _wgmma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    m_rows, size_n, n_groups, groups_per_split, split_k, stride_x, stride_out,
    G: gl.constexpr,
    SYMMETRIC: gl.constexpr,
    BLOCK_M: gl.constexpr,  # 8 or 16: the wgmma's N
    W: gl.constexpr,  # 4 or 8 warps; BLOCK_N = 32 W
    XS_GROUPS: gl.constexpr,  # >= groups_per_split: activation groups held in shared memory
    FUSED_SPLIT: gl.constexpr,
    SPLIT_MAX: gl.constexpr,
    EVICT: gl.constexpr,
    PIPE: gl.constexpr,  # 0: one wgmma group in flight; 1: two
):  # fmt: skip
    BLOCK_N: gl.constexpr = 32 * W
    KB: gl.constexpr = G // 32
    IS_BF16: gl.constexpr = x_ptr.dtype.element_ty == gl.bfloat16
    MAGIC: gl.constexpr = 128.0 if IS_BF16 else 1024.0
    act: gl.constexpr = x_ptr.dtype.element_ty
    q_layout: gl.constexpr = gl.BlockedLayout([1, 4, KB, 1], [8, 1, 1, 4], [W, 1, 1, 1], [1, 2, 3, 0])
    x_layout: gl.constexpr = gl.BlockedLayout([1, KB, 1, 8], [8, 1, 4, 1], [1, 1, W, 1], [3, 1, 2, 0])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, BLOCK_M, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    xs_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, G], act)  # K-major B

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BLOCK_N
    g_begin = pid_k * groups_per_split
    n_steps = gl.minimum(groups_per_split, n_groups - g_begin)

    col = n0 + 4 * _index4(8 * W, 0, q_layout) + _index4(4, 1, q_layout)
    col_ok = col < size_n
    word = 4 * _index4(KB, 2, q_layout) + _index4(4, 3, q_layout)
    qw_ptrs = qw_ptr + (g_begin * (G // 8) + word) * size_n + col
    qw_mask = col_ok & (word >= 0)
    nxt = gl.load(qw_ptrs, mask=qw_mask, other=0, eviction_policy=EVICT)
    if not SYMMETRIC:
        z_col = n0 + 4 * _index4(8 * W, 0, q_layout) + _index4(4, 1, q_layout)
        z_zero = _index4(KB, 2, q_layout) * 0 + _index4(4, 3, q_layout) * 0
        z_ptrs = z_ptr + g_begin * size_n + z_col + z_zero
        z_mask = (z_col < size_n) & (z_zero == 0)
    n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
    n_col = n0 + 32 * ((n // 16) % W) + 4 * (n % 8) + 2 * (n // (16 * W)) + (n // 8) % 2
    s_ptrs = s_ptr + g_begin * size_n + n_col
    s_mask = n_col < size_n

    # the split's activations, in operand K order, into shared memory (one buffer a group); unrolled, so that
    # every group's load is in flight before the first store
    xs = gl.allocate_shared_memory(act, [XS_GROUPS, BLOCK_M, G], xs_layout)
    xm = _index4(BLOCK_M, 0, x_layout)
    xk = 32 * _index4(KB, 1, x_layout) + 8 * _index4(4, 2, x_layout) + _index4(8, 3, x_layout)
    x_ptrs = x_ptr + xm * stride_x + g_begin * G + xk
    xm_ok = (xm < m_rows) & (xk >= 0)
    for g in gl.static_range(XS_GROUPS):
        xt = gl.load(x_ptrs + g * G, mask=xm_ok & (g < n_steps), other=0.0)
        xt = gl.reshape(xt, (BLOCK_M, KB, 4, 2, 2, 2))
        xs.index(g).store(gl.reshape(gl.permute(xt, (0, 1, 4, 5, 2, 3)), (BLOCK_M, G)))  # X_PERM's K order
    fence_async_shared()
    gl.thread_barrier()

    zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=acc_layout)
    acc = zero
    if SYMMETRIC:
        offset = gl.full([8 * W, 4, KB, 4], MAGIC + 8.0, act, layout=q_layout)
    else:
        zero_pt = gl.load(z_ptrs, mask=z_mask, other=0.0)
        offset = (zero_pt.to(gl.float32) + MAGIC).to(act)
    if PIPE == 0:
        # group i's wgmma runs while the warps dequantise group i + 1 (its words were loaded a step earlier)
        a = _operand(nxt, offset, W, KB, IS_BF16, a_layout)
        nxt = gl.load(
            qw_ptrs + (G // 8) * size_n, mask=qw_mask & (n_steps > 1), other=0, eviction_policy=EVICT
        )
        for step in range(n_steps):
            tok = warpgroup_mma(a, xs.index(step).permute((1, 0)), zero, use_acc=False, is_async=True)
            s_cur = gl.load(s_ptrs + step * size_n, mask=s_mask, other=0.0)
            packed = nxt
            nxt = gl.load(qw_ptrs + (step + 2) * (G // 8) * size_n, mask=qw_mask & (step + 2 < n_steps), other=0,
                          eviction_policy=EVICT)  # fmt: skip
            if not SYMMETRIC:
                zero_pt = gl.load(z_ptrs + (step + 1) * size_n, mask=z_mask & (step + 1 < n_steps), other=0.0)
                offset = (zero_pt.to(gl.float32) + MAGIC).to(act)
            a_next = _operand(packed, offset, W, KB, IS_BF16, a_layout)
            done, a = warpgroup_mma_wait(0, deps=[tok, a])
            acc += done * gl.expand_dims(s_cur.to(gl.float32), 1)
            a = a_next
    else:
        # two wgmma groups in flight: A (even groups) and B (odd); a pair step issues B, retires A, issues the
        # next A, retires B. An odd count of groups after the first runs one padding group: zero words, zero
        # activations (the extra shared buffer), zero scale.
        s_a = gl.load(s_ptrs, mask=s_mask, other=0.0)
        a_a = _operand(nxt, offset, W, KB, IS_BF16, a_layout)
        tok_a = warpgroup_mma(a_a, xs.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
        nxt = gl.load(
            qw_ptrs + (G // 8) * size_n, mask=qw_mask & (n_steps > 1), other=0, eviction_policy=EVICT
        )
        for pair in range(n_steps // 2):
            gb = 1 + 2 * pair
            packed = nxt
            nxt = gl.load(qw_ptrs + (gb + 1) * (G // 8) * size_n, mask=qw_mask & (gb + 1 < n_steps), other=0,
                          eviction_policy=EVICT)  # fmt: skip
            s_b = gl.load(s_ptrs + gb * size_n, mask=s_mask, other=0.0)
            if not SYMMETRIC:
                zero_pt = gl.load(z_ptrs + gb * size_n, mask=z_mask, other=0.0)
                offset = (zero_pt.to(gl.float32) + MAGIC).to(act)
            a_b = _operand(packed, offset, W, KB, IS_BF16, a_layout)
            tok_b = warpgroup_mma(a_b, xs.index(gb).permute((1, 0)), zero, use_acc=False, is_async=True)
            done, a_a = warpgroup_mma_wait(1, deps=[tok_a, a_a])
            acc += done * gl.expand_dims(s_a.to(gl.float32), 1)
            packed = nxt
            nxt = gl.load(qw_ptrs + (gb + 2) * (G // 8) * size_n, mask=qw_mask & (gb + 2 < n_steps), other=0,
                          eviction_policy=EVICT)  # fmt: skip
            s_a = gl.load(s_ptrs + (gb + 1) * size_n, mask=s_mask & (gb + 1 < n_steps), other=0.0)
            if not SYMMETRIC:
                zero_pt = gl.load(z_ptrs + (gb + 1) * size_n, mask=z_mask & (gb + 1 < n_steps), other=0.0)
                offset = (zero_pt.to(gl.float32) + MAGIC).to(act)
            a_a = _operand(packed, offset, W, KB, IS_BF16, a_layout)
            tok_a = warpgroup_mma(a_a, xs.index(gb + 1).permute((1, 0)), zero, use_acc=False, is_async=True)
            done, a_b = warpgroup_mma_wait(1, deps=[tok_b, a_b])
            acc += done * gl.expand_dims(s_b.to(gl.float32), 1)
        done, a_a = warpgroup_mma_wait(0, deps=[tok_a, a_a])
        acc += done * gl.expand_dims(s_a.to(gl.float32), 1)

    rows = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout)), 0)
    cols = gl.expand_dims(n_col, 1)
    n_ok = cols < size_n
    last = True
    if FUSED_SPLIT:
        p_ptrs = part_ptr + rows * size_n + cols
        gl.store(p_ptrs + pid_k * BLOCK_M * size_n, acc, mask=n_ok)
        gl.thread_barrier()
        counter = count_ptr + pid_n
        arrived = gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        last = arrived == split_k - 1
        if last:
            acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=acc_layout)
            for split in gl.static_range(SPLIT_MAX):
                acc += gl.load(p_ptrs + split * BLOCK_M * size_n, mask=n_ok & (split < split_k), other=0.0,
                               cache_modifier=".cg")  # fmt: skip
            gl.atomic_xchg(counter, 0)
    if last:
        gl.store(out_ptr + rows * stride_out + cols, acc.to(act), mask=n_ok & (rows < m_rows))


def wgmma_config(warps: int = 4, occupancy: float = 3.0, min_splits: int = 1, evict: str = "evict_first",
                 pipe: int = 1, block_m: int = 0) -> dict:  # fmt: skip
    return {"kind": "wgmma", "num_warps": warps, "occupancy": occupancy, "min_splits": min_splits, "evict": evict,
            "pipe": pipe, "block_m": block_m}  # fmt: skip


def launch(x, qweight, scales, zeros, group_size: int, cfg: dict) -> torch.Tensor:
    warps, m_rows, size_n = cfg["num_warps"], x.shape[0], qweight.shape[-1]
    x = x.contiguous()
    block_m = cfg.get("block_m") or (8 if m_rows <= 8 else 16)
    n_groups = scales.shape[0]
    n_tiles = triton.cdiv(size_n, 32 * warps)
    max_groups = max(1, cfg.get("xs_bytes", 64 * 1024) // (group_size * block_m * x.element_size()))
    least = max(cfg.get("min_splits", 1), triton.cdiv(n_groups, max(1, max_groups - cfg["pipe"])))
    split_k, per_split = _split(n_groups, n_tiles, cfg["occupancy"], 1, x.device, least)
    out = torch.empty(m_rows, size_n, dtype=x.dtype, device=x.device)
    fused = split_k > 1
    if fused:
        part = torch.empty(split_k, block_m, size_n, dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, n_tiles)
    else:
        part, counters = out, out
    _wgmma_kernel[(n_tiles, split_k)](
        x, qweight, scales, zeros if zeros is not None else scales, out, part, counters, m_rows, size_n,
        n_groups, per_split, split_k, x.stride(0), out.stride(0),
        G=group_size, SYMMETRIC=zeros is None, BLOCK_M=block_m, W=warps, XS_GROUPS=triton.next_power_of_2(per_split + cfg["pipe"]), FUSED_SPLIT=fused,
        SPLIT_MAX=triton.next_power_of_2(split_k) if fused else 1, EVICT=cfg["evict"], PIPE=cfg["pipe"], num_warps=warps,
    )  # fmt: skip
    return out
