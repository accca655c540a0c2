"""Flash attention for iRoPE layers in Triton: forward + backward, causal or chunked-local, GQA, NoPE
temperature scale, left padding, log-sum-exp output.

Semantics are exactly those of :func:`scout_mm.kernels.reference.attention` (read its docstring); this file
holds the kernels, their launchers and the ``autograd.Function``.

Layout: q (batch, n_heads, q_len, head_dim), k/v (batch, n_kv_heads, kv_len, head_dim), any strides whose
last dim is contiguous (a (batch, seq, heads, dim) tensor transposed to (batch, heads, seq, dim) needs no
copy). Query row ``i`` sits at key index ``t = q_start + i``; with ``kv0 = kv_start[b]`` it sees the keys
``[chunk_start(t), t]``, where ``chunk_start(t) = kv0 + floor((t - kv0) / chunk_size) * chunk_size`` (or
``kv0`` without chunking). Padding query rows (``t < kv0``) see nothing: their output is 0, their LSE -inf.

Cost: a program walks only the key blocks that intersect its queries' visible range, in three loops: a
masked loop where the range starts (chunk start / padding edge), an unmasked loop over the blocks every
query sees in full, a masked loop on the diagonal (or the last two as one loop that masks only its final
blocks, so that the diagonal's loads are prefetched; descriptor path only). Chunked-local cost therefore
grows with the chunk, not the sequence. GQA: a q head reads the K/V of head ``h // group`` in place, never a repeated copy.

The backward is FlashAttention-2 style: ``delta = rowsum(out * dout)``, then one kernel per key block for
dK/dV (walking every q head of its group, so no atomics and a deterministic sum) and one kernel per query
block for dQ. On sm_90 (where the Gluon forward runs) the dK/dV half runs the Gluon kernel of
:mod:`scout_mm.kernels.flash_attention_gluon_bwd` instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _chunk_start(t, kv0, chunk_size, CHUNKED: tl.constexpr):
    # First key visible from key index t. Positions count from kv0, so do chunk boundaries (as HF does
    # for left-padded batches); a padding query (t < kv0) gets kv0, which is past t: it sees nothing.
    if CHUNKED:
        return kv0 + tl.maximum(t - kv0, 0) // chunk_size * chunk_size
    else:
        return kv0 + t * 0


@triton.jit
def _chunk_end(t, kv0, chunk_size, q_end, CHUNKED: tl.constexpr):
    # One past the last query index that can see key t (capped at q_end, one past the last query).
    if CHUNKED:
        return tl.minimum(kv0 + (tl.maximum(t - kv0, 0) // chunk_size + 1) * chunk_size, q_end)
    else:
        return q_end + t * 0


@triton.jit
def _key_ranges(q_first, q_last, kv0, chunk_size, BLOCK_N: tl.constexpr, CHUNKED: tl.constexpr):
    """Key blocks for queries [q_first, q_last] as three loops on a BLOCK_N grid: [lo, mid_lo) masked,
    [mid_lo, mid_hi) seen in full by every query, [mid_hi, hi) masked (the diagonal)."""
    hi = q_last + 1
    lo = _chunk_start(q_first, kv0, chunk_size, CHUNKED) // BLOCK_N * BLOCK_N
    full_lo = _chunk_start(q_last, kv0, chunk_size, CHUNKED)  # latest chunk start of the block
    mid_lo = tl.minimum(lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N, hi)
    full_hi = lo + tl.maximum(q_first + 1 - lo, 0) // BLOCK_N * BLOCK_N  # earliest diagonal of the block
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _load_q(Q, QScale, rows, row_ok, HAS_Q_SCALE: tl.constexpr):
    # Q points at (batch, head) and is already advanced by rows * stride; QScale at the batch's row.
    q = tl.load(Q, mask=row_ok[:, None], other=0.0)
    if HAS_Q_SCALE:
        # Scale then round to the input dtype, exactly as the reference does before its matmul.
        q_scale = tl.load(QScale + rows, mask=row_ok, other=1.0)
        q = (q.to(tl.float32) * q_scale[:, None]).to(q.dtype)
    return q


# ----------------------------------------------------------------------------------------------- forward


@triton.jit
def _mask_scores(qk, cols, t, t_start):
    visible = (cols[None, :] <= t[:, None]) & (cols[None, :] >= t_start[:, None])
    return tl.where(visible, qk, float("-inf"))


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K, V, stride_kn, stride_vn, t, t_start, start, stop, key_end, mask_from, qk_scale,
    dims, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, USE_DESC: tl.constexpr, DIAG_IN_LOOP: tl.constexpr,
):  # fmt: skip
    # USE_DESC: K and V are tensor descriptors (copy-engine loads; rows past the last query's key read as
    # zeros), else pointers. DIAG_IN_LOOP (descriptors only): blocks from mask_from on are masked inside
    # this loop, so the diagonal's loads are prefetched by the same software pipeline as the bulk.
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if USE_DESC:
            k = K.load([start_n, 0])
        elif MASKED:
            # Keys past the block's last diagonal (key_end <= kv_len) load as zeros.
            in_range = cols < key_end
            k = tl.load(K + cols[:, None] * stride_kn + dims[None, :], mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(K + cols[:, None] * stride_kn + dims[None, :])
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            qk = _mask_scores(qk, cols, t, t_start)
        elif DIAG_IN_LOOP:
            if start_n >= mask_from:
                qk = _mask_scores(qk, cols, t, t_start)
        # m_i starts finite (-1e30), so a row with nothing visible yet keeps p = 0 and alpha = 1, not NaN.
        # The scale folds into one FMA per score: exp2(qk * scale - m).
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_DESC:
            v = V.load([start_n, 0])
        elif MASKED:
            v = tl.load(V + cols[:, None] * stride_vn + dims[None, :], mask=in_range[:, None], other=0.0)
        else:
            v = tl.load(V + cols[:, None] * stride_vn + dims[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, QScale, KVStart,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    n_heads, q_len, q_start, chunk_size, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr, HAS_Q_SCALE: tl.constexpr, HAS_KV_START: tl.constexpr,
    USE_DESC: tl.constexpr, DIAG_IN_LOOP: tl.constexpr,
):  # fmt: skip
    # Latest query blocks (the most keys under a causal mask) start first: a shorter tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < q_len
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :]
    q = _load_q(q_ptrs, QScale + b64 * q_len, rows, row_ok, HAS_Q_SCALE)
    K += b64 * stride_kb + kv_h * stride_kh
    V += b64 * stride_vb + kv_h * stride_vh
    if USE_DESC:
        # No query sees a key past q_start + q_len: the descriptors end there, so the diagonal block's
        # rows beyond it (maybe unwritten cache slots) read as zeros, never as NaN garbage.
        K = tl.make_tensor_descriptor(K, shape=[q_start + q_len, HEAD_DIM], strides=[stride_kn, 1],
                                      block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
        V = tl.make_tensor_descriptor(V, shape=[q_start + q_len, HEAD_DIM], strides=[stride_vn, 1],
                                      block_shape=[BLOCK_N, HEAD_DIM])  # fmt: skip
    kv0 = 0
    if HAS_KV_START:
        kv0 = tl.load(KVStart + b)

    t = q_start + rows  # key index of each query row
    t_start = _chunk_start(t, kv0, chunk_size, CHUNKED)
    q_first = q_start + pid_m * BLOCK_M
    q_last = q_start + tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1
    lo, mid_lo, mid_hi, hi = _key_ranges(q_first, q_last, kv0, chunk_size, BLOCK_N, CHUNKED)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Masked blocks where the range starts (chunk start / padding edge), then the blocks every query sees
    # in full, then the masked diagonal (in the same loop with DIAG_IN_LOOP).
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, t, t_start, lo, mid_lo, hi, hi,
                               qk_scale, dims, BLOCK_N, True, USE_DESC, False)  # fmt: skip
    if DIAG_IN_LOOP:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, t, t_start, mid_lo, hi, hi, mid_hi,
                                   qk_scale, dims, BLOCK_N, False, USE_DESC, True)  # fmt: skip
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, t, t_start, mid_lo, mid_hi, hi, hi,
                                   qk_scale, dims, BLOCK_N, False, USE_DESC, False)  # fmt: skip
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, t, t_start, mid_hi, hi, hi, hi,
                                   qk_scale, dims, BLOCK_N, True, USE_DESC, False)  # fmt: skip
    empty = l_i == 0.0  # padding query rows
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    o_ptrs = Out + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + pid_bh.to(tl.int64) * q_len + rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit
def _bwd_delta_kernel(
    Out, DOut, Delta, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm, n_heads, q_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = pid_bh % n_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < q_len
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    do = tl.load(DOut + b * stride_db + h * stride_dh + rows[:, None] * stride_dm + dims[None, :],
                 mask=row_ok[:, None], other=0.0)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * q_len + rows, delta, mask=row_ok)


@triton.jit
def _load_lse2(Lse, rows, row_ok):
    # LSE in log2 units; an empty (padding) row's -inf becomes +inf so that its p = exp2(s - lse) is 0.
    lse = tl.load(Lse + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return lse * 1.4426950408889634


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, t, t_start, start, stop, key_end, qk_scale,
    dims, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            in_range = cols < key_end
            k = tl.load(K + cols[:, None] * stride_kn + dims[None, :], mask=in_range[:, None], other=0.0)
            v = tl.load(V + cols[:, None] * stride_vn + dims[None, :], mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(K + cols[:, None] * stride_kn + dims[None, :])
            v = tl.load(V + cols[:, None] * stride_vn + dims[None, :])
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        if MASKED:
            visible = (cols[None, :] <= t[:, None]) & (cols[None, :] >= t_start[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, DQ, Lse, Delta, QScale, KVStart,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm, stride_dqb, stride_dqh, stride_dqm,
    n_heads, q_len, q_start, chunk_size, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr, HAS_Q_SCALE: tl.constexpr, HAS_KV_START: tl.constexpr,
):  # fmt: skip
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv_h = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < q_len
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :]
    q = _load_q(q_ptrs, QScale + b64 * q_len, rows, row_ok, HAS_Q_SCALE)
    do_ptrs = DOut + b64 * stride_db + h * stride_dh + rows[:, None] * stride_dm + dims[None, :]
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
    lse2 = _load_lse2(Lse + pid_bh.to(tl.int64) * q_len, rows, row_ok)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * q_len + rows, mask=row_ok, other=0.0)
    K += b64 * stride_kb + kv_h * stride_kh
    V += b64 * stride_vb + kv_h * stride_vh
    kv0 = 0
    if HAS_KV_START:
        kv0 = tl.load(KVStart + b)

    t = q_start + rows
    t_start = _chunk_start(t, kv0, chunk_size, CHUNKED)
    q_first = q_start + pid_m * BLOCK_M
    q_last = q_start + tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1
    lo, mid_lo, mid_hi, hi = _key_ranges(q_first, q_last, kv0, chunk_size, BLOCK_N, CHUNKED)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, t, t_start, lo, mid_lo, hi, qk_scale,
                   dims, BLOCK_N, True)  # fmt: skip
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, t, t_start, mid_lo, mid_hi, hi, qk_scale,
                   dims, BLOCK_N, False)  # fmt: skip
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, t, t_start, mid_hi, hi, hi, qk_scale,
                   dims, BLOCK_N, True)  # fmt: skip
    dq *= sm_scale
    if HAS_Q_SCALE:  # chain rule through q * q_scale
        dq *= tl.load(QScale + b64 * q_len + rows, mask=row_ok, other=1.0)[:, None]
    dq_ptrs = DQ + b64 * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + dims[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, Q, DOut, Lse, Delta, QScale, stride_qm, stride_dm, q_len, q_start, cols, kv0, chunk_size,
    start, stop, qk_scale, dims, BLOCK_M: tl.constexpr, CHUNKED: tl.constexpr, HAS_Q_SCALE: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    # Transposed scores (keys x queries), so that dK/dV accumulate in the program's own rows.
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q = _load_q(Q + rows[:, None] * stride_qm + dims[None, :], QScale, rows, row_ok, HAS_Q_SCALE)
        do = tl.load(DOut + rows[:, None] * stride_dm + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = _load_lse2(Lse, rows, row_ok)
        delta = tl.load(Delta + rows, mask=row_ok, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        if MASKED:
            t = q_start + rows
            t_start = _chunk_start(t, kv0, chunk_size, CHUNKED)
            visible = (cols[:, None] <= t[None, :]) & (cols[:, None] >= t_start[None, :]) & row_ok[None, :]
            p_t = tl.where(visible, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, DK, DV, Lse, Delta, QScale, KVStart,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    n_heads, n_kv_heads, q_len, kv_len, q_start, chunk_size, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr, HAS_Q_SCALE: tl.constexpr, HAS_KV_START: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kv_h = pid_bh % n_kv_heads
    b64 = b.to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < kv_len
    k = tl.load(K + b64 * stride_kb + kv_h * stride_kh + cols[:, None] * stride_kn + dims[None, :],
                mask=col_ok[:, None], other=0.0)  # fmt: skip
    v = tl.load(V + b64 * stride_vb + kv_h * stride_vh + cols[:, None] * stride_vn + dims[None, :],
                mask=col_ok[:, None], other=0.0)  # fmt: skip
    kv0 = 0
    if HAS_KV_START:
        kv0 = tl.load(KVStart + b)

    # Query rows that see some key of this block: from the first key's diagonal to the end of the last
    # key's chunk; rows that see every key: from the last key's diagonal to the end of the first key's
    # chunk, and only if no key is padding.
    n_last = tl.minimum(n0 + BLOCK_N, kv_len) - 1
    q_end = q_start + q_len
    r_lo = tl.maximum(n0 - q_start, 0) // BLOCK_M * BLOCK_M
    r_hi = _chunk_end(n_last, kv0, chunk_size, q_end, CHUNKED) - q_start
    r_hi = tl.where(n_last < kv0, 0, r_hi)  # all keys are padding: no query sees them
    full_lo = r_lo + tl.cdiv(tl.maximum(n_last - q_start - r_lo, 0), BLOCK_M) * BLOCK_M
    mid_lo = tl.minimum(full_lo, r_hi)
    full_hi = _chunk_end(n0, kv0, chunk_size, q_end, CHUNKED) - q_start
    full_hi = tl.where(n0 < kv0, 0, full_hi)
    full_hi = r_lo + tl.maximum(full_hi - r_lo, 0) // BLOCK_M * BLOCK_M
    mid_hi = tl.maximum(tl.minimum(full_hi, r_hi), mid_lo)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(GROUP):
        h = kv_h * GROUP + g
        bh = b64 * n_heads + h
        Qh = Q + b64 * stride_qb + h * stride_qh
        DOh = DOut + b64 * stride_db + h * stride_dh
        QS = QScale + b64 * q_len
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, Lse + bh * q_len, Delta + bh * q_len, QS, stride_qm,
                             stride_dm, q_len, q_start, cols, kv0, chunk_size, r_lo, mid_lo, qk_scale, dims,
                             BLOCK_M, CHUNKED, HAS_Q_SCALE, True)  # fmt: skip
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, Lse + bh * q_len, Delta + bh * q_len, QS, stride_qm,
                             stride_dm, q_len, q_start, cols, kv0, chunk_size, mid_lo, mid_hi, qk_scale, dims,
                             BLOCK_M, CHUNKED, HAS_Q_SCALE, False)  # fmt: skip
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, Lse + bh * q_len, Delta + bh * q_len, QS, stride_qm,
                             stride_dm, q_len, q_start, cols, kv0, chunk_size, mid_hi, r_hi, qk_scale, dims,
                             BLOCK_M, CHUNKED, HAS_Q_SCALE, True)  # fmt: skip
    dk *= sm_scale
    tl.store(DK + b64 * stride_dkb + kv_h * stride_dkh + cols[:, None] * stride_dkn + dims[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])  # fmt: skip
    tl.store(DV + b64 * stride_dvb + kv_h * stride_dvh + cols[:, None] * stride_dvn + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])  # fmt: skip


# ---------------------------------------------------------------------------------------------- launchers

# Launch parameters per head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages[, K/V through tensor descriptors
# [, diagonal in the bulk loop]]); for "dkdv" BLOCK_M queries per step for BLOCK_N keys per program.
# head_dim 128, swept on an H100 2026-11-24 (bench_attention.py --tune / --tune-fwd / --spread; numbers in
# bench/results/attention_h100*.md): the (128, 128) variants (pointer loads, tensor descriptors, diagonal in
# the bulk loop) are within the run-to-run spread of each other on causal 32K (the board sits at its power
# cap); on chunked 8192 the diagonal-in-loop variant had the best median (460 vs 443-455 TFLOPS) and the
# narrowest range, and session 1's (128, 64) the widest. Warp specialisation (tl.range(warp_specialize=True))
# measured no faster and failed to compile for other shapes, so it is not used. Also timed against these
# (2026-11-24, bench_attention.py --variants, interleaved with cuDNN/FA2) and dropped, none faster: lazy
# rescaling of acc, one exp2 in four by a polynomial, (64, 64) tiles at two programs per SM, and dQ summed by
# fp32 atomics inside the dK/dV kernel instead of a dQ kernel.
# head_dim 64: not swept.
_CUDA_CONFIGS = {
    64: {
        "fwd": (128, 64, 4, 3),
        "fwd_chunked": (128, 64, 4, 3),
        "dq": (128, 64, 4, 3),
        "dkdv": (64, 64, 4, 3),
    },
    128: {
        "fwd": (128, 128, 8, 3, True, False),
        "fwd_chunked": (128, 128, 8, 3, True, True),
        "dq": (128, 64, 8, 3),
        "dkdv": (64, 128, 8, 3),
    },
}
# Small blocks under the CPU interpreter: tiny test shapes still span several blocks.
_INTERPRET_CONFIG = {
    "fwd": (16, 16, 4, 1),
    "fwd_chunked": (16, 16, 4, 1),
    "dq": (16, 16, 4, 1),
    "dkdv": (16, 16, 4, 1),
}
_SMALL_HEAD_CONFIG = (64, 64, 4, 2)  # head_dim 16 / 32: the shapes of tests and tiny models
_HEAD_DIMS = (16, 32, 64, 128)


def _config(kind: str, head_dim: int, device: torch.device) -> tuple:
    if device.type != "cuda":
        return _INTERPRET_CONFIG[kind]
    table = _CUDA_CONFIGS.get(head_dim)
    return _SMALL_HEAD_CONFIG if table is None else table[kind]


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernels handle these inputs (else dispatch falls back to the reference)."""
    return (
        q.dim() == 4
        and q.shape[-1] in _HEAD_DIMS
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and k.shape == v.shape
        and q.shape[1] % k.shape[1] == 0
    )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _prepare(q, k, v, chunk_size, q_start, kv_start, q_scale):
    batch, n_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if n_heads % k.shape[1]:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={k.shape[1]}")
    if q_start + q_len > kv_len:
        raise ValueError(f"q_start={q_start} + q_len={q_len} exceeds kv_len={kv_len}")
    if head_dim not in _HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim}; the Triton kernel supports {_HEAD_DIMS}")
    if chunk_size is not None and chunk_size >= kv_len:
        chunk_size = None  # one chunk covers every key: plain causal
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    if q_scale is not None:
        q_scale = q_scale.to(device=q.device, dtype=torch.float32).expand(batch, q_len).contiguous()
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return q, k, v, chunk_size, kv_start, q_scale


def _flags(chunk_size, kv_start, q_scale, dummy):
    flags = dict(
        CHUNKED=chunk_size is not None, HAS_Q_SCALE=q_scale is not None, HAS_KV_START=kv_start is not None
    )
    # Absent optional tensors are never read (their flag is off); any pointer fills the slot.
    return flags, (q_scale if q_scale is not None else dummy), (kv_start if kv_start is not None else dummy)


def _descriptors_fit(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether K/V can be read through tensor descriptors: CUDA (sm90+), 16-byte aligned base and row
    strides (the copy engine's rule); otherwise the pointer loads run."""
    if not (k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9):
        return False
    size = k.element_size()
    return all(x.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in x.stride()[:-1]) for x in (k, v))


def set_descriptor_allocator(device: torch.device) -> None:
    """Descriptors built inside a kernel need a little global scratch per program; Triton asks for it through
    this hook (set per call, on the launch's device: it is context-local, and cheap)."""
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def _forward(q, k, v, scale, chunk_size, q_start, kv_start, q_scale, config=None):
    batch, n_heads, q_len, head_dim = q.shape
    out = torch.empty(batch, n_heads, q_len, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, n_heads, q_len, device=q.device, dtype=torch.float32)
    kind = "fwd_chunked" if chunk_size is not None else "fwd"
    block_m, block_n, num_warps, num_stages, use_desc, diag_in_loop = (
        tuple(config or _config(kind, head_dim, q.device)) + (False, False)
    )[:6]
    use_desc = use_desc and _descriptors_fit(k, v)
    # unmasked loads in the diagonal are safe only through descriptors
    diag_in_loop = diag_in_loop and use_desc
    if use_desc:
        set_descriptor_allocator(q.device)
    flags, q_scale_arg, kv_start_arg = _flags(chunk_size, kv_start, q_scale, lse)
    grid = (triton.cdiv(q_len, block_m), batch * n_heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, q_scale_arg, kv_start_arg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n_heads, q_len, q_start, chunk_size or 1, scale * _LOG2E,
        GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        USE_DESC=use_desc, DIAG_IN_LOOP=diag_in_loop,
        num_warps=num_warps, num_stages=num_stages, **flags,
    )  # fmt: skip
    return out, lse


def _bwd_delta(dout, out, delta):
    """delta = rowsum(dout * out) in fp32, (batch, n_heads, q_len)."""
    batch, n_heads, q_len, head_dim = out.shape
    block_m = 64 if out.is_cuda else 16
    _bwd_delta_kernel[(triton.cdiv(q_len, block_m), batch * n_heads)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), n_heads, q_len, HEAD_DIM=head_dim, BLOCK_M=block_m,
    )  # fmt: skip


def _bwd_dkdv(dout, q, k, v, dk, dv, lse, delta, scale, chunk_size, kv_start, q_scale, q_start, config=None):
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    flags, q_scale_arg, kv_start_arg = _flags(chunk_size, kv_start, q_scale, lse)
    block_m, block_n, num_warps, num_stages = config or _config("dkdv", head_dim, q.device)
    _bwd_dkdv_kernel[(triton.cdiv(kv_len, block_n), batch * n_kv_heads)](
        q, k, v, dout, dk, dv, lse, delta, q_scale_arg, kv_start_arg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        n_heads, n_kv_heads, q_len, kv_len, q_start, chunk_size or 1, scale * _LOG2E, scale,
        GROUP=n_heads // n_kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **flags,
    )  # fmt: skip


def _bwd_dq(dout, q, k, v, dq, lse, delta, scale, chunk_size, kv_start, q_scale, q_start, config=None):
    batch, n_heads, q_len, head_dim = q.shape
    flags, q_scale_arg, kv_start_arg = _flags(chunk_size, kv_start, q_scale, lse)
    block_m, block_n, num_warps, num_stages = config or _config("dq", head_dim, q.device)
    _bwd_dq_kernel[(triton.cdiv(q_len, block_m), batch * n_heads)](
        q, k, v, dout, dq, lse, delta, q_scale_arg, kv_start_arg,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        n_heads, q_len, q_start, chunk_size or 1, scale * _LOG2E, scale,
        GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **flags,
    )  # fmt: skip


def _backward(dout, q, k, v, out, lse, scale, chunk_size, q_start, kv_start, q_scale, configs=None):
    configs = configs or {}
    dout = _last_dim_contiguous(dout)
    delta = torch.empty_like(lse)
    _bwd_delta(dout, out, delta)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    args = (scale, chunk_size, kv_start, q_scale, q_start)
    _bwd_dkdv(dout, q, k, v, dk, dv, lse, delta, *args, config=configs.get("dkdv"))
    _bwd_dq(dout, q, k, v, dq, lse, delta, *args, config=configs.get("dq"))
    return dq, dk, dv


def use_gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the forward runs the Gluon Hopper kernel (:mod:`scout_mm.kernels.flash_attention_gluon`, same
    outputs and LSE) instead of this file's: an sm_90 GPU, Triton with Gluon, inputs that kernel supports,
    and ``SCOUT_MM_GLUON`` not ``off`` (``auto`` default). Measured 1.2x faster than the Triton forward on H100
    (bench/results/attention_h100.md). The same condition routes the backward to
    :func:`flash_attention_gluon_bwd.backward` (Gluon dK/dV kernel + this file's dQ kernel; fwd+bwd 1.10x
    this file's backward's on H100, 2026-11-24)."""
    mode = os.environ.get("SCOUT_MM_GLUON", "auto").lower()
    if mode not in ("auto", "off"):
        raise ValueError(f"SCOUT_MM_GLUON={mode!r}; expected 'auto' or 'off'")
    if mode == "off" or not q.is_cuda:
        return False
    try:
        from scout_mm.kernels import flash_attention_gluon
    except ImportError:  # a Triton without Gluon
        return False
    return flash_attention_gluon.supports(q, k, v)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, chunk_size, q_start, kv_start, q_scale):
        if use_gluon_forward(q, k, v):
            from scout_mm.kernels import flash_attention_gluon

            out, lse = flash_attention_gluon.forward(
                q,
                k,
                v,
                scale=scale,
                chunk_size=chunk_size,
                q_start=q_start,
                kv_start=kv_start,
                q_scale=q_scale,
            )
        else:
            out, lse = _forward(q, k, v, scale, chunk_size, q_start, kv_start, q_scale)
        ctx.save_for_backward(q, k, v, out, lse, kv_start, q_scale)
        ctx.args = (scale, chunk_size, q_start)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, kv_start, q_scale = ctx.saved_tensors
        scale, chunk_size, q_start = ctx.args
        if use_gluon_forward(q, k, v):  # sm_90: the Gluon dK/dV kernel (flash_attention_gluon_bwd)
            from scout_mm.kernels import flash_attention_gluon_bwd

            dq, dk, dv = flash_attention_gluon_bwd.backward(
                dout, q, k, v, out, lse, scale=scale, chunk_size=chunk_size, q_start=q_start,
                kv_start=kv_start, q_scale=q_scale,
            )  # fmt: skip
        else:
            dq, dk, dv = _backward(dout, q, k, v, out, lse, scale, chunk_size, q_start, kv_start, q_scale)
        return dq, dk, dv, None, None, None, None, None


def attention_with_lse(
    q: torch.Tensor,  # (batch, n_heads, q_len, head_dim)
    k: torch.Tensor,  # (batch, n_kv_heads, kv_len, head_dim)
    v: torch.Tensor,  # (batch, n_kv_heads, kv_len, head_dim)
    *,
    scale: float,
    chunk_size: int | None = None,
    q_start: int = 0,
    kv_start: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, n_heads, q_len, head_dim), (batch, n_heads, q_len) fp32
    """:func:`attention` plus the natural-log log-sum-exp of each row's scaled scores (-inf for padding
    rows), for merging with attention over other keys (:func:`scout_mm.kernels.flash_decode.merge_states`).
    Differentiable in q, k, v through the output; the LSE carries no gradient."""
    q, k, v, chunk_size, kv_start, q_scale = _prepare(q, k, v, chunk_size, q_start, kv_start, q_scale)
    return _FlashAttention.apply(q, k, v, float(scale), chunk_size, int(q_start), kv_start, q_scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    chunk_size: int | None = None,
    q_start: int = 0,
    kv_start: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton flash attention with the semantics of :func:`scout_mm.kernels.reference.attention`."""
    out, _ = attention_with_lse(
        q, k, v, scale=scale, chunk_size=chunk_size, q_start=q_start, kv_start=kv_start, q_scale=q_scale
    )
    return out


# --------------------------------------------------------------------------------------- SDPA dispatch

# Where PyTorch SDPA fits the semantics (no left padding, no cache offset: q_len == kv_len; GQA taken
# natively) it may be faster. This table records, per (mask, forward only / with backward), the SDPA backend
# that beat the Triton kernel on an H100, or None where the kernel won: bench/bench_attention.py measures
# both and bench/results/attention_h100.md holds the numbers.
# Measured 2026-11-23 (causal 32K, chunked 8192 at 128K fwd / 32K fwd+bwd): cuDNN ahead in all four, by
# 1.19x to 1.33x (dispatch pays ~10% on the chunked fwd for the fold/unfold copies and still wins).
_SDPA_BACKEND: dict[tuple[str, str], str | None] = {
    ("causal", "fwd"): "cudnn",
    ("causal", "fwd+bwd"): "cudnn",
    ("chunked", "fwd"): "cudnn",
    ("chunked", "fwd+bwd"): "cudnn",
}
# The same where the forward runs the Gluon Hopper kernel (use_gluon_forward). Measured 2026-11-24 on H100
# (`bench_attention.py --dispatch-paths`, interleaved): causal 32K dispatch -> Gluon 620 vs -> cuDNN 604
# TFLOPS; chunked 8192 at 128K 550 vs 538 (cuDNN's bare kernel is ~3% faster there, its chunk fold/unfold
# copies cost more). fwd+bwd stays on cuDNN: with the Gluon dK/dV backward (2026-11-24, bench_attention.py
# --gluon-bwd) ours reaches 0.86x cuDNN (causal 32K 471.5 vs 546.7 TFLOPS, chunked 8192 425.4 vs 496.1).
_SDPA_BACKEND_GLUON: dict[tuple[str, str], str | None] = {
    ("causal", "fwd"): None,
    ("causal", "fwd+bwd"): "cudnn",
    ("chunked", "fwd"): None,
    ("chunked", "fwd+bwd"): "cudnn",
}


def prefer_sdpa(q: torch.Tensor, k: torch.Tensor, chunk_size, q_start, kv_start, v=None) -> str | None:
    """The SDPA backend ("cudnn" / "flash") dispatch should run instead of the Triton kernel, or None."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if kv_start is not None or q_start != 0 or q_len != kv_len:
        return None
    chunked = chunk_size is not None and chunk_size < q_len
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    table = _SDPA_BACKEND_GLUON if use_gluon_forward(q, k, k if v is None else v) else _SDPA_BACKEND
    return table[("chunked" if chunked else "causal", "fwd+bwd" if training else "fwd")]


def sdpa_attention(q, k, v, *, sdpa_backend: str, **kwargs) -> torch.Tensor:
    """The reference's SDPA path (chunks folded into the batch) with ``sdpa_backend`` first in SDPA's order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scout_mm.kernels import reference

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[sdpa_backend]
    order = [first, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(list(dict.fromkeys(order)), set_priority=True):
        return reference.attention(q, k, v, **kwargs)


__all__ = [
    "attention",
    "attention_with_lse",
    "supports",
    "prefer_sdpa",
    "sdpa_attention",
    "use_gluon_forward",
]
