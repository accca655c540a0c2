"""Hopper (sm_90) flash attention backward in Gluon: warp-specialised TMA loader, two consumer warpgroups,
asynchronous wgmma.

Semantics and inputs are those of :func:`scout_mm.kernels.flash_attention._backward` (causal or chunked-local,
GQA, per-row query scale, left padding, cache offset; natural-log LSE with -inf for padding rows as the
forwards write it). Two kernels, as the Triton backward:

- dQ (runs first): one program per (batch, q head, 128 queries), K/V tiles streamed by the forward's TMA
  loader partition (:func:`flash_attention_gluon._loader`), two 4-warp consumer warpgroups of 64 query rows.
  Each computes its rows' ``delta = rowsum(dO * O)`` (written out for the dK/dV kernel: no separate pass),
  then per key block S = Q K^T and dP = dO V^T as async wgmma, P = exp2(S * scale - lse), dS = P (dP - delta),
  dQ += dS K; the dQ wgmma of block j runs under the S / dP GEMMs of block j + 1.
- dK/dV: one program per (batch, kv head, 128 keys); each consumer warpgroup holds 64 keys' K and V in shared
  memory, a 1-warp loader streams (Q, dO) tiles of 64 rows for every q head of the GQA group by TMA, so dK/dV
  of the group are summed in registers (no atomics, deterministic). Per tile: S^T = K Q^T, dP^T = V dO^T,
  P^T, dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q; dK of tile j runs under tile j + 1's GEMMs.

Default (measured on H100 2026-11-24, bench/results/attention_h100.md): the Gluon dK/dV kernel without the
cross-tile dK overlap (that variant spills registers and is 1.3x slower) and the *Triton* dQ kernel of
flash_attention.py, which beat this file's dQ kernel (bwd-only causal 32K 429 vs 391 TFLOPS). The Gluon dQ
kernel stays as an option (``config=dict(dq="gluon")``), tested.

The query/key ranges walked and the masked blocks are those of the Triton backward (only blocks where a
range starts and diagonal blocks are masked; chunked cost grows with the chunk). With ``q_scale`` the
launcher materialises the scaled, dtype-rounded query once (the reference's rounding), and dQ gets the chain
rule factor.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from scout_mm.kernels import flash_attention_gluon as _fwd
from scout_mm.kernels.flash_attention import set_descriptor_allocator
from scout_mm.kernels.flash_attention_gluon import (
    _LOG2E,
    BLOCK_M,
    WG_M,
    _chunk_start,
    _loader,
    _program_coords,
    _ring_barriers,
    _tile_ranges,
    _tma_rows_fit,
)

# BLOCK_M (128): dQ's query rows per program, dK/dV's keys per program; WG_M (64) per warpgroup


@gluon.jit
def _load_lse2(Lse, rows, ok):
    # LSE in log2 units; a padding row's -inf (and rows past q_len) become +inf: their p = exp2(s - lse) is 0.
    lse = gl.load(Lse + rows, mask=ok, other=float("-inf"))
    lse = gl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


# ------------------------------------------------------------------------------------------------------ dQ


@gluon.jit
def _dq_probs(s, lse2, t, t_start, start_n, masked, qk_scale, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    p = gl.exp2(s * qk_scale - lse2[:, None])
    if masked:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        visible = (cols[None, :] <= t[:, None]) & (cols[None, :] >= t_start[:, None])
        p = gl.where(visible, p, 0.0)
    return p


@gluon.jit
def _dq_consumer(
    Q, DOut, Out, DQ, Lse, Delta, QScale, KVStart, q_bufs, do_bufs, k_bufs, v_bufs,
    k_ready, v_ready, k_empty, v_empty,
    stride_qb, stride_qh, stride_qm, stride_db, stride_dh, stride_dm, stride_ob, stride_oh, stride_om,
    stride_dqb, stride_dqh, stride_dqm,
    n_heads, q_len, q_start, chunk_size, qk_scale, sm_scale,
    WG: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CHUNKED: gl.constexpr, HAS_Q_SCALE: gl.constexpr, HAS_KV_START: gl.constexpr,
):  # fmt: skip
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_layout: gl.constexpr = gl.SliceLayout(0, o_layout)
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    lrow_layout: gl.constexpr = gl.SliceLayout(1, load_layout)
    lcol_layout: gl.constexpr = gl.SliceLayout(0, load_layout)
    dtype: gl.constexpr = k_bufs.type.element_ty

    pid_m, pid_bh, b, h, kv_h, kv0 = _program_coords(KVStart, n_heads, GROUP, HAS_KV_START)
    lo, mid_lo, mid_hi, n_blocks = _tile_ranges(pid_m, q_len, q_start, kv0, chunk_size, BLOCK_N, CHUNKED)
    b64 = b.to(gl.int64)
    bh64 = pid_bh.to(gl.int64)
    row0 = pid_m * BLOCK_M + WG * WG_M

    # Q (already scaled by the launcher when HAS_Q_SCALE) and dO of this warpgroup's rows -> shared memory;
    # delta = rowsum(dO * O) in fp32, written for the dK/dV kernel.
    q_smem = q_bufs.index(WG)
    do_smem = do_bufs.index(WG)
    rows_ld = row0 + gl.arange(0, WG_M, layout=lrow_layout)
    dims_ld = gl.arange(0, HEAD_DIM, layout=lcol_layout)
    ok_ld = (rows_ld < q_len)[:, None]
    q = gl.load(Q + b64 * stride_qb + h * stride_qh + rows_ld[:, None] * stride_qm + dims_ld[None, :],
                mask=ok_ld, other=0.0)  # fmt: skip
    q_smem.store(q)
    do = gl.load(DOut + b64 * stride_db + h * stride_dh + rows_ld[:, None] * stride_dm + dims_ld[None, :],
                 mask=ok_ld, other=0.0)  # fmt: skip
    do_smem.store(do)
    o = gl.load(Out + b64 * stride_ob + h * stride_oh + rows_ld[:, None] * stride_om + dims_ld[None, :],
                mask=ok_ld, other=0.0)  # fmt: skip
    delta_ld = gl.sum(o.to(gl.float32) * do.to(gl.float32), 1)
    gl.store(Delta + bh64 * q_len + rows_ld, delta_ld, mask=rows_ld < q_len)
    fence_async_shared()
    gl.thread_barrier()

    rows = row0 + gl.arange(0, WG_M, layout=row_layout)
    delta = gl.convert_layout(delta_ld, row_layout)
    lse2 = _load_lse2(Lse + bh64 * q_len, rows, rows < q_len)
    t = q_start + rows
    t_start = _chunk_start(t, kv0, chunk_size, CHUNKED)
    s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, layout=s_layout)
    dq = gl.zeros([WG_M, HEAD_DIM], gl.float32, layout=o_layout)

    if n_blocks > 0:
        # Block 0: S, dP, dS; nothing to overlap yet. Then per block i: S_i, dP_i, dQ += dS_{i-1} K_{i-1}
        # issued back to back; dS_i is computed while dP_i and the dQ GEMM are still on the tensor cores.
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(0), 0)
        dp = warpgroup_mma(do_smem, v_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s, _, _ = warpgroup_mma_wait(1, deps=(s, q_smem, k_bufs.index(0)))
        p = _dq_probs(s, lse2, t, t_start, lo, (lo < mid_lo) | (lo >= mid_hi), qk_scale, BLOCK_N, s_layout)
        dp, _, _ = warpgroup_mma_wait(0, deps=(dp, do_smem, v_bufs.index(0)))
        mbarrier.arrive(v_empty.index(0))
        ds_op = gl.convert_layout((p * (dp - delta[:, None])).to(dtype), ds_layout)
        for i in range(1, n_blocks):
            slot = i % STAGES
            prev = (i - 1) % STAGES
            phase = i // STAGES & 1
            mbarrier.wait(k_ready.index(slot), phase)
            s = warpgroup_mma(
                q_smem, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            mbarrier.wait(v_ready.index(slot), phase)
            dp = warpgroup_mma(do_smem, v_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False,
                               is_async=True)  # fmt: skip
            dq = warpgroup_mma(ds_op, k_bufs.index(prev), dq, is_async=True)
            s, _, _ = warpgroup_mma_wait(2, deps=(s, q_smem, k_bufs.index(slot)))
            start_n = lo + i * BLOCK_N
            masked = (start_n < mid_lo) | (start_n >= mid_hi)
            p = _dq_probs(s, lse2, t, t_start, start_n, masked, qk_scale, BLOCK_N, s_layout)
            dp, _, _ = warpgroup_mma_wait(1, deps=(dp, do_smem, v_bufs.index(slot)))
            mbarrier.arrive(v_empty.index(slot))
            ds = (p * (dp - delta[:, None])).to(dtype)
            dq, _, _ = warpgroup_mma_wait(0, deps=(dq, ds_op, k_bufs.index(prev)))
            mbarrier.arrive(k_empty.index(prev))
            ds_op = gl.convert_layout(ds, ds_layout)
        last = (n_blocks - 1) % STAGES
        dq = warpgroup_mma(ds_op, k_bufs.index(last), dq, is_async=True)
        dq, _, _ = warpgroup_mma_wait(0, deps=(dq, ds_op, k_bufs.index(last)))
        mbarrier.arrive(k_empty.index(last))

    rows_o = row0 + gl.arange(0, WG_M, layout=orow_layout)
    dims_o = gl.arange(0, HEAD_DIM, layout=ocol_layout)
    ok_o = rows_o < q_len
    dq = dq * sm_scale
    if HAS_Q_SCALE:  # chain rule through q * q_scale
        dq = dq * gl.load(QScale + b64 * q_len + rows_o, mask=ok_o, other=1.0)[:, None]
    dq_ptrs = DQ + b64 * stride_dqb + h * stride_dqh + rows_o[:, None] * stride_dqm + dims_o[None, :]
    gl.store(dq_ptrs, dq.to(dtype), mask=ok_o[:, None])


@gluon.jit
def _dq_kernel(
    Q, K, V, DOut, Out, DQ, Lse, Delta, QScale, KVStart,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm, stride_ob, stride_oh, stride_om, stride_dqb, stride_dqh, stride_dqm,
    n_heads, q_len, q_start, chunk_size, qk_scale, sm_scale,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CHUNKED: gl.constexpr, HAS_Q_SCALE: gl.constexpr, HAS_KV_START: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WG_M, HEAD_DIM], dtype)
    q_bufs = gl.allocate_shared_memory(dtype, [2, WG_M, HEAD_DIM], q_layout)
    do_bufs = gl.allocate_shared_memory(dtype, [2, WG_M, HEAD_DIM], q_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    k_ready, v_ready, k_empty, v_empty = _ring_barriers(STAGES)

    # Argument tuples written out in the call (a tuple bound to a name loses its constexprs in Gluon 3.6).
    # fmt: off
    gl.warp_specialize(
        [
            (_dq_consumer, (Q, DOut, Out, DQ, Lse, Delta, QScale, KVStart, q_bufs, do_bufs, k_bufs, v_bufs,
                            k_ready, v_ready, k_empty, v_empty, stride_qb, stride_qh, stride_qm, stride_db,
                            stride_dh, stride_dm, stride_ob, stride_oh, stride_om, stride_dqb, stride_dqh,
                            stride_dqm, n_heads, q_len, q_start, chunk_size, qk_scale, sm_scale, 0, GROUP,
                            HEAD_DIM, BLOCK_N, STAGES, CHUNKED, HAS_Q_SCALE, HAS_KV_START)),
            (_dq_consumer, (Q, DOut, Out, DQ, Lse, Delta, QScale, KVStart, q_bufs, do_bufs, k_bufs, v_bufs,
                            k_ready, v_ready, k_empty, v_empty, stride_qb, stride_qh, stride_qm, stride_db,
                            stride_dh, stride_dm, stride_ob, stride_oh, stride_om, stride_dqb, stride_dqh,
                            stride_dqm, n_heads, q_len, q_start, chunk_size, qk_scale, sm_scale, 1, GROUP,
                            HEAD_DIM, BLOCK_N, STAGES, CHUNKED, HAS_Q_SCALE, HAS_KV_START)),
            (_loader, (K, V, KVStart, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, stride_kb, stride_kh,
                       stride_kn, stride_vb, stride_vh, stride_vn, n_heads, q_len, q_start, chunk_size, GROUP,
                       HEAD_DIM, BLOCK_N, STAGES, CHUNKED, HAS_KV_START)),
        ],
        [4, 1],
        [CONSUMER_REGS, 24],
    )
    # fmt: on


# --------------------------------------------------------------------------------------------------- dK/dV


@gluon.jit
def _chunk_end(t, kv0, chunk_size, q_end, CHUNKED: gl.constexpr):
    # One past the last query index that can see key t (capped at q_end).
    if CHUNKED:
        return gl.minimum(kv0 + (gl.maximum(t - kv0, 0) // chunk_size + 1) * chunk_size, q_end)
    else:
        return q_end + t * 0


@gluon.jit
def _dkdv_coords(KVStart, n_kv_heads, kv_len, q_len, q_start, chunk_size, BLOCK_Q: gl.constexpr,
                 CHUNKED: gl.constexpr, HAS_KV_START: gl.constexpr):  # fmt: skip
    """Query-row ranges of the program's 128 keys on a BLOCK_Q grid from r_lo (as the Triton dK/dV kernel):
    rows that see some key end at r_hi; blocks before mid_lo and from mid_hi on need masks."""
    pid_n = gl.program_id(0)  # earliest keys (most queries under a causal mask) first
    pid_bh = gl.program_id(1)
    b = pid_bh // n_kv_heads
    kv_h = pid_bh % n_kv_heads
    kv0 = 0
    if HAS_KV_START:
        kv0 = gl.load(KVStart + b)
    n0 = pid_n * BLOCK_M
    n_last = gl.minimum(n0 + BLOCK_M, kv_len) - 1
    q_end = q_start + q_len
    r_lo = gl.maximum(n0 - q_start, 0) // BLOCK_Q * BLOCK_Q
    r_hi = _chunk_end(n_last, kv0, chunk_size, q_end, CHUNKED) - q_start
    r_hi = gl.where(n_last < kv0, 0, r_hi)  # all keys are padding: no query sees them
    full_lo = r_lo + gl.cdiv(gl.maximum(n_last - q_start - r_lo, 0), BLOCK_Q) * BLOCK_Q
    mid_lo = gl.minimum(full_lo, r_hi)
    full_hi = _chunk_end(n0, kv0, chunk_size, q_end, CHUNKED) - q_start
    full_hi = gl.where(n0 < kv0, 0, full_hi)
    full_hi = r_lo + gl.maximum(full_hi - r_lo, 0) // BLOCK_Q * BLOCK_Q
    mid_hi = gl.maximum(gl.minimum(full_hi, r_hi), mid_lo)
    n_blocks = gl.cdiv(gl.maximum(r_hi - r_lo, 0), BLOCK_Q)
    return b, kv_h, kv0, n0, r_lo, mid_lo, mid_hi, n_blocks


@gluon.jit
def _dkdv_loader(
    Q, DOut, KVStart, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty,
    stride_qb, stride_qh, stride_qm, stride_db, stride_dh, stride_dm,
    n_kv_heads, q_len, kv_len, q_start, chunk_size,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr,
    CHUNKED: gl.constexpr, HAS_KV_START: gl.constexpr,
):  # fmt: skip
    b, kv_h, kv0, n0, r_lo, mid_lo, mid_hi, n_blocks = _dkdv_coords(
        KVStart, n_kv_heads, kv_len, q_len, q_start, chunk_size, BLOCK_Q, CHUNKED, HAS_KV_START
    )
    b64 = b.to(gl.int64)
    layout: gl.constexpr = q_bufs.type.layout
    nbytes: gl.constexpr = BLOCK_Q * HEAD_DIM * q_bufs.type.element_ty.primitive_bitwidth // 8
    i = 0
    for g in range(GROUP):
        h = kv_h * GROUP + g
        # Rows past q_len read as zeros.
        q_desc = tma.make_tensor_descriptor(
            Q + b64 * stride_qb + h * stride_qh, shape=[q_len, HEAD_DIM], strides=[stride_qm, 1],
            block_shape=[BLOCK_Q, HEAD_DIM], layout=layout,
        )  # fmt: skip
        do_desc = tma.make_tensor_descriptor(
            DOut + b64 * stride_db + h * stride_dh, shape=[q_len, HEAD_DIM], strides=[stride_dm, 1],
            block_shape=[BLOCK_Q, HEAD_DIM], layout=layout,
        )  # fmt: skip
        for j in range(n_blocks):
            slot = i % STAGES
            phase = (i // STAGES & 1) ^ 1  # a fresh mbarrier's "previous phase" counts as done
            start_m = r_lo + j * BLOCK_Q
            mbarrier.wait(q_empty.index(slot), phase)
            mbarrier.expect(q_ready.index(slot), nbytes)
            tma.async_copy_global_to_shared(q_desc, [start_m, 0], q_ready.index(slot), q_bufs.index(slot))
            mbarrier.wait(do_empty.index(slot), phase)
            mbarrier.expect(do_ready.index(slot), nbytes)
            tma.async_copy_global_to_shared(do_desc, [start_m, 0], do_ready.index(slot), do_bufs.index(slot))
            i += 1


@gluon.jit
def _dkdv_row_stats(Lse, Delta, bh, q_len, start_m, BLOCK_Q: gl.constexpr, layout: gl.constexpr):
    # LSE (log2 units, +inf for padding rows and rows past q_len) and delta of one query tile, as columns.
    bh64 = bh.to(gl.int64)
    rows = start_m + gl.arange(0, BLOCK_Q, layout=layout)
    ok = rows < q_len
    return _load_lse2(Lse + bh64 * q_len, rows, ok), gl.load(Delta + bh64 * q_len + rows, mask=ok, other=0.0)


@gluon.jit
def _dkdv_probs(s, lse2, keys, q_len, q_start, start_m, kv0, chunk_size, masked, qk_scale, BLOCK_Q: gl.constexpr,
                CHUNKED: gl.constexpr, s_layout: gl.constexpr):  # fmt: skip
    p = gl.exp2(s * qk_scale - lse2[None, :])
    if masked:
        rows = start_m + gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(0, s_layout))
        t = q_start + rows
        t_start = _chunk_start(t, kv0, chunk_size, CHUNKED)
        visible = (
            (keys[:, None] <= t[None, :]) & (keys[:, None] >= t_start[None, :]) & (rows < q_len)[None, :]
        )
        p = gl.where(visible, p, 0.0)
    return p


@gluon.jit
def _dkdv_consumer(
    K, V, DK, DV, Lse, Delta, KVStart, k_bufs, v_bufs, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    n_heads, n_kv_heads, q_len, kv_len, q_start, chunk_size, qk_scale, sm_scale,
    WG: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr,
    STAGES: gl.constexpr, CHUNKED: gl.constexpr, HAS_KV_START: gl.constexpr, OVERLAP: gl.constexpr,
):  # fmt: skip
    # Transposed scores (keys x queries), so that dK/dV accumulate in the warpgroup's own rows.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_Q, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    qcol_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_layout: gl.constexpr = gl.SliceLayout(0, o_layout)
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    lrow_layout: gl.constexpr = gl.SliceLayout(1, load_layout)
    lcol_layout: gl.constexpr = gl.SliceLayout(0, load_layout)
    dtype: gl.constexpr = k_bufs.type.element_ty

    b, kv_h, kv0, n0, r_lo, mid_lo, mid_hi, n_blocks = _dkdv_coords(
        KVStart, n_kv_heads, kv_len, q_len, q_start, chunk_size, BLOCK_Q, CHUNKED, HAS_KV_START
    )
    b64 = b.to(gl.int64)
    key0 = n0 + WG * WG_M

    # This warpgroup's 64 keys of K and V -> shared memory (keys past kv_len as zeros).
    k_smem = k_bufs.index(WG)
    v_smem = v_bufs.index(WG)
    keys_ld = key0 + gl.arange(0, WG_M, layout=lrow_layout)
    dims_ld = gl.arange(0, HEAD_DIM, layout=lcol_layout)
    ok_ld = (keys_ld < kv_len)[:, None]
    k = gl.load(K + b64 * stride_kb + kv_h * stride_kh + keys_ld[:, None] * stride_kn + dims_ld[None, :],
                mask=ok_ld, other=0.0)  # fmt: skip
    k_smem.store(k)
    v = gl.load(V + b64 * stride_vb + kv_h * stride_vh + keys_ld[:, None] * stride_vn + dims_ld[None, :],
                mask=ok_ld, other=0.0)  # fmt: skip
    v_smem.store(v)
    fence_async_shared()
    gl.thread_barrier()

    keys = key0 + gl.arange(0, WG_M, layout=key_layout)
    s_zero = gl.zeros([WG_M, BLOCK_Q], gl.float32, layout=s_layout)
    dk = gl.zeros([WG_M, HEAD_DIM], gl.float32, layout=o_layout)
    dv = gl.zeros([WG_M, HEAD_DIM], gl.float32, layout=o_layout)
    # Tiles (q head g, query block j) in one flat sequence i = g * n_blocks + j, as the loader streams them.
    # Tile 0 alone; then per tile i: S^T_i, dP^T_i, dK += dS^T_{i-1} Q_{i-1} issued back to back, P^T_i
    # computed under dP^T_i and the dK GEMM, dV += P^T_i dO_i issued, dS^T_i computed under it.
    n_tiles = GROUP * n_blocks
    if not OVERLAP:
        # Fewer live registers: each tile's dK GEMM is waited for in its own iteration.
        for i in range(n_tiles):
            slot = i % STAGES
            phase = i // STAGES & 1
            g = i // n_blocks
            start_m = r_lo + (i - g * n_blocks) * BLOCK_Q
            lse2, delta = _dkdv_row_stats(Lse, Delta, b64 * n_heads + kv_h * GROUP + g, q_len, start_m, BLOCK_Q,
                                          qcol_layout)  # fmt: skip
            mbarrier.wait(q_ready.index(slot), phase)
            s = warpgroup_mma(
                k_smem, q_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            mbarrier.wait(do_ready.index(slot), phase)
            dp = warpgroup_mma(v_smem, do_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False,
                               is_async=True)  # fmt: skip
            s, _, _ = warpgroup_mma_wait(1, deps=(s, k_smem, q_bufs.index(slot)))
            masked = (start_m < mid_lo) | (start_m >= mid_hi)
            p = _dkdv_probs(s, lse2, keys, q_len, q_start, start_m, kv0, chunk_size, masked, qk_scale, BLOCK_Q,
                            CHUNKED, s_layout)  # fmt: skip
            p_op = gl.convert_layout(p.to(dtype), op_layout)
            dv = warpgroup_mma(p_op, do_bufs.index(slot), dv, is_async=True)
            dp, _, _ = warpgroup_mma_wait(1, deps=(dp, v_smem, do_bufs.index(slot)))
            ds_op = gl.convert_layout((p * (dp - delta[None, :])).to(dtype), op_layout)
            dk = warpgroup_mma(ds_op, q_bufs.index(slot), dk, is_async=True)
            dk, dv, _, _, _ = warpgroup_mma_wait(0, deps=(dk, dv, ds_op, p_op, q_bufs.index(slot)))
            mbarrier.arrive(q_empty.index(slot))
            mbarrier.arrive(do_empty.index(slot))
    elif n_tiles > 0:
        lse2, delta = _dkdv_row_stats(
            Lse, Delta, b64 * n_heads + kv_h * GROUP, q_len, r_lo, BLOCK_Q, qcol_layout
        )
        mbarrier.wait(q_ready.index(0), 0)
        s = warpgroup_mma(k_smem, q_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(do_ready.index(0), 0)
        dp = warpgroup_mma(v_smem, do_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s, _, _ = warpgroup_mma_wait(1, deps=(s, k_smem, q_bufs.index(0)))
        p = _dkdv_probs(s, lse2, keys, q_len, q_start, r_lo, kv0, chunk_size, (r_lo < mid_lo) | (r_lo >= mid_hi),
                        qk_scale, BLOCK_Q, CHUNKED, s_layout)  # fmt: skip
        p_op = gl.convert_layout(p.to(dtype), op_layout)
        dv = warpgroup_mma(p_op, do_bufs.index(0), dv, is_async=True)
        dp, _, _ = warpgroup_mma_wait(1, deps=(dp, v_smem, do_bufs.index(0)))
        ds = (p * (dp - delta[None, :])).to(dtype)
        dv, _, _ = warpgroup_mma_wait(0, deps=(dv, p_op, do_bufs.index(0)))
        mbarrier.arrive(do_empty.index(0))
        ds_op = gl.convert_layout(ds, op_layout)
        for i in range(1, n_tiles):
            slot = i % STAGES
            prev = (i - 1) % STAGES
            phase = i // STAGES & 1
            g = i // n_blocks
            start_m = r_lo + (i - g * n_blocks) * BLOCK_Q
            lse2, delta = _dkdv_row_stats(Lse, Delta, b64 * n_heads + kv_h * GROUP + g, q_len, start_m, BLOCK_Q,
                                          qcol_layout)  # fmt: skip
            mbarrier.wait(q_ready.index(slot), phase)
            s = warpgroup_mma(
                k_smem, q_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            mbarrier.wait(do_ready.index(slot), phase)
            dp = warpgroup_mma(v_smem, do_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False,
                               is_async=True)  # fmt: skip
            dk = warpgroup_mma(ds_op, q_bufs.index(prev), dk, is_async=True)
            s, _, _ = warpgroup_mma_wait(2, deps=(s, k_smem, q_bufs.index(slot)))
            masked = (start_m < mid_lo) | (start_m >= mid_hi)
            p = _dkdv_probs(s, lse2, keys, q_len, q_start, start_m, kv0, chunk_size, masked, qk_scale, BLOCK_Q,
                            CHUNKED, s_layout)  # fmt: skip
            p_op = gl.convert_layout(p.to(dtype), op_layout)
            dv = warpgroup_mma(p_op, do_bufs.index(slot), dv, is_async=True)
            dp, _, _ = warpgroup_mma_wait(2, deps=(dp, v_smem, do_bufs.index(slot)))
            ds = (p * (dp - delta[None, :])).to(dtype)
            dk, dv, _, _, _ = warpgroup_mma_wait(0, deps=(dk, dv, ds_op, p_op, q_bufs.index(prev)))
            mbarrier.arrive(q_empty.index(prev))
            mbarrier.arrive(do_empty.index(slot))
            ds_op = gl.convert_layout(ds, op_layout)
        last = (n_tiles - 1) % STAGES
        dk = warpgroup_mma(ds_op, q_bufs.index(last), dk, is_async=True)
        dk, _, _ = warpgroup_mma_wait(0, deps=(dk, ds_op, q_bufs.index(last)))
        mbarrier.arrive(q_empty.index(last))

    keys_o = key0 + gl.arange(0, WG_M, layout=orow_layout)
    dims_o = gl.arange(0, HEAD_DIM, layout=ocol_layout)
    ok_o = (keys_o < kv_len)[:, None]
    dk = dk * sm_scale
    gl.store(DK + b64 * stride_dkb + kv_h * stride_dkh + keys_o[:, None] * stride_dkn + dims_o[None, :],
             dk.to(dtype), mask=ok_o)  # fmt: skip
    gl.store(DV + b64 * stride_dvb + kv_h * stride_dvh + keys_o[:, None] * stride_dvn + dims_o[None, :],
             dv.to(dtype), mask=ok_o)  # fmt: skip


@gluon.jit
def _dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta, KVStart,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    n_heads, n_kv_heads, q_len, kv_len, q_start, chunk_size, qk_scale, sm_scale,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_Q: gl.constexpr, STAGES: gl.constexpr,
    CHUNKED: gl.constexpr, HAS_KV_START: gl.constexpr, CONSUMER_REGS: gl.constexpr, OVERLAP: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WG_M, HEAD_DIM], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_Q, HEAD_DIM], dtype)
    k_bufs = gl.allocate_shared_memory(dtype, [2, WG_M, HEAD_DIM], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [2, WG_M, HEAD_DIM], kv_layout)
    q_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_Q, HEAD_DIM], q_layout)
    do_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_Q, HEAD_DIM], q_layout)
    q_ready, do_ready, q_empty, do_empty = _ring_barriers(STAGES)

    # fmt: off
    gl.warp_specialize(
        [
            (_dkdv_consumer, (K, V, DK, DV, Lse, Delta, KVStart, k_bufs, v_bufs, q_bufs, do_bufs, q_ready,
                              do_ready, q_empty, do_empty, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                              stride_vn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                              n_heads, n_kv_heads, q_len, kv_len, q_start, chunk_size, qk_scale, sm_scale, 0,
                              GROUP, HEAD_DIM, BLOCK_Q, STAGES, CHUNKED, HAS_KV_START, OVERLAP)),
            (_dkdv_consumer, (K, V, DK, DV, Lse, Delta, KVStart, k_bufs, v_bufs, q_bufs, do_bufs, q_ready,
                              do_ready, q_empty, do_empty, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                              stride_vn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                              n_heads, n_kv_heads, q_len, kv_len, q_start, chunk_size, qk_scale, sm_scale, 1,
                              GROUP, HEAD_DIM, BLOCK_Q, STAGES, CHUNKED, HAS_KV_START, OVERLAP)),
            (_dkdv_loader, (Q, DOut, KVStart, q_bufs, do_bufs, q_ready, do_ready, q_empty, do_empty, stride_qb,
                            stride_qh, stride_qm, stride_db, stride_dh, stride_dm, n_kv_heads, q_len, kv_len,
                            q_start, chunk_size, GROUP, HEAD_DIM, BLOCK_Q, STAGES, CHUNKED, HAS_KV_START)),
        ],
        [4, 1],
        [CONSUMER_REGS, 24],
    )
    # fmt: on


# ---------------------------------------------------------------------------------------------- launcher

# dq / dkdv: "gluon" (this file's kernels) or "triton" (flash_attention.py's kernel for that half, on the same
# delta: when dq is Triton, the Triton delta pass runs first); dkdv_overlap: dK GEMM of tile i under tile i + 1.
DEFAULT_CONFIG = dict(
    dq="triton",
    dkdv="gluon",
    dq_block_n=128,
    dq_stages=2,
    dq_regs=240,
    dkdv_block_q=64,
    dkdv_stages=2,
    dkdv_regs=240,
    dkdv_overlap=False,
    maxnreg=168,
)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The forward's conditions (Hopper, bf16/fp16, head_dim 64/128, TMA-readable K/V)."""
    return _fwd.supports(q, k, v)


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    chunk_size: int | None = None,
    q_start: int = 0,
    kv_start: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`flash_attention.attention_with_lse`'s output for the upstream gradient ``dout``,
    given that call's ``out`` and ``lse``."""
    if not supports(q, k, v):
        raise ValueError(
            "flash_attention_gluon_bwd needs Hopper, bf16/fp16, head_dim in (64, 128), 4-D q/k/v with matching "
            f"K/V shapes, 16-byte aligned K/V rows; got q {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)}"
        )
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(f"dout {tuple(dout.shape)} / out {tuple(out.shape)} / lse {tuple(lse.shape)} "
                         f"do not match q {tuple(q.shape)}")  # fmt: skip
    if q_start + q_len > kv_len:
        raise ValueError(f"q_start={q_start} + q_len={q_len} exceeds kv_len={kv_len}")
    if chunk_size is not None and chunk_size >= kv_len:
        chunk_size = None
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if q_len == 0:
        return dq, dk.zero_(), dv.zero_()
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    q_in = q
    if q_scale is not None:
        # The reference's operand: q * q_scale rounded to the input dtype, materialised once for both kernels.
        q_scale = q_scale.to(device=q.device, dtype=torch.float32).expand(batch, q_len).contiguous()
        q_in = (q.float() * q_scale[:, None, :, None]).to(q.dtype)
    if not _tma_rows_fit(q_in):
        q_in = q_in.contiguous()
    if not _tma_rows_fit(dout):
        dout = dout.contiguous()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    set_descriptor_allocator(q.device)
    dummy = lse
    group = n_heads // n_kv_heads
    common = dict(GROUP=group, HEAD_DIM=head_dim, CHUNKED=chunk_size is not None,
                  HAS_KV_START=kv_start is not None, num_warps=4, maxnreg=cfg["maxnreg"])  # fmt: skip
    from scout_mm.kernels import flash_attention as _tri

    tri_args = (chunk_size, kv_start, q_scale, q_start)
    if cfg["dq"] == "gluon":
        _dq_kernel[(triton.cdiv(q_len, BLOCK_M.value), batch * n_heads)](
            q_in, k, v, dout, out, dq, lse, delta, q_scale if q_scale is not None else dummy,
            kv_start if kv_start is not None else dummy,
            q_in.stride(0), q_in.stride(1), q_in.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            out.stride(0), out.stride(1), out.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
            n_heads, q_len, q_start, chunk_size or 1, scale * _LOG2E, scale,
            BLOCK_N=cfg["dq_block_n"], STAGES=cfg["dq_stages"], HAS_Q_SCALE=q_scale is not None,
            CONSUMER_REGS=cfg["dq_regs"], **common,
        )  # fmt: skip
    else:
        _tri._bwd_delta(dout, out, delta)
    if cfg["dkdv"] == "gluon":
        _dkdv_kernel[(triton.cdiv(kv_len, BLOCK_M.value), batch * n_kv_heads)](
            q_in, k, v, dout, dk, dv, lse, delta, kv_start if kv_start is not None else dummy,
            q_in.stride(0), q_in.stride(1), q_in.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            n_heads, n_kv_heads, q_len, kv_len, q_start, chunk_size or 1, scale * _LOG2E, scale,
            BLOCK_Q=cfg["dkdv_block_q"], STAGES=cfg["dkdv_stages"], CONSUMER_REGS=cfg["dkdv_regs"],
            OVERLAP=cfg["dkdv_overlap"], **common,
        )  # fmt: skip
    else:
        # The Triton kernel scales q itself: give it the raw q and q_scale.
        _tri._bwd_dkdv(dout, q, k, v, dk, dv, lse, delta, scale, *tri_args)
    if cfg["dq"] != "gluon":
        _tri._bwd_dq(dout, q, k, v, dq, lse, delta, scale, *tri_args)
    return dq, dk, dv
