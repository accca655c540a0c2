"""Inference-only fused kernels for the small ops between the matmuls of a decode step.

A batch-1 Scout decode step spent ~3 ms in ~1,800 tiny PyTorch kernels (casts, norms, RoPE, cache index
writes, router top-k; ``bench/results/int4_h100.md``): each is ~1.5 us of launch-bound work. Each kernel here
replaces a chain of them by one launch and keeps HF's rounding points (a cast back to the activation dtype
wherever the PyTorch path rounds), so results equal :mod:`scout_mm.kernels.fused_reference` up to the fp32
summation order and the fp32 ``rsqrt``/``exp`` approximations (a few bf16 ulps at most, usually none).

- :func:`add_rms_norm` / :func:`rms_norm`: residual add (rounded) + RMSNorm in fp32, cast, times the weight.
- :func:`add_residual`: the MoE block's ``x + (shared + routed)``.
- :func:`rope_qk_norm`: interleaved-pair RoPE of q and k (+ the weightless QK-norm) in one launch.
- :func:`silu_mul`: SwiGLU's ``silu(gate) * up``.
- :func:`router_topk`: few-token router: one program per (token, expert) logit, the last to arrive runs the
  top-k (lowest index first among equal logits) and the sigmoid of the chosen logits in fp32.
- :func:`add_rms_norm_router`: the post-attention residual add + RMSNorm and the router in one launch (the
  router programs each normalise the row; the expert-0 program stores the sum and the norm).
- :func:`write_kv_decode`: one decode token per sequence into a ring or paged KV cache, plus ``kv_lens``.

No backward: the dispatch (:func:`scout_mm.kernels.use_fused`) runs these only when autograd does not need
the graph. Every function takes the reference's arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scout_mm.kernels import FUSED_MAX_NORM_DIM, ROUTER_MAX_EXPERTS
from scout_mm.kernels.launch import arrival_counters, pdl_args, pdl_wait_and_trigger
from scout_mm.kernels.reference import check_kv_scales

# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # (rows, H)
    delta_ptr,  # (rows, H) or unused (not HAS_DELTA)
    w_ptr,  # (H,) or unused (not HAS_WEIGHT)
    sum_ptr,  # (rows, H) x + delta, or unused
    out_ptr,  # (rows, H)
    size_h,
    stride_x,
    stride_delta,
    eps,
    HAS_DELTA: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < size_h
    dtype = out_ptr.dtype.element_ty
    if HAS_WEIGHT:  # a parameter, written by no kernel of the step: loaded while the previous kernel runs
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl_wait_and_trigger(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32)
        residual = (x + delta).to(dtype)  # the residual stream is rounded to the activation dtype (HF)
        tl.store(sum_ptr + row * size_h + cols, residual, mask=mask)
        x = residual.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / size_h + eps)
    y = (x * rstd).to(dtype)  # cast back before the weight multiply, as HF
    if HAS_WEIGHT:
        y = (y.to(tl.float32) * w).to(dtype)
    tl.store(out_ptr + row * size_h + cols, y, mask=mask)


@triton.jit
def _add_residual_kernel(x_ptr, a_ptr, b_ptr, out_ptr, numel, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_wait_and_trigger(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dtype = out_ptr.dtype.element_ty
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inner = (a + b).to(dtype).to(tl.float32)  # rounded, as the separate add would
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x + inner).to(dtype), mask=mask)


@triton.jit
def _rope_head(src, dst, cos_row, sin_row, half, eps, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """One head vector: rotate pairs (src[2i], src[2i+1]) by (cos_i, sin_i) in fp32, round, then optionally
    normalise the rounded vector (fp32, round again): the PyTorch path's two roundings."""
    i = tl.arange(0, BLOCK)
    mask = i < half
    dtype = dst.dtype.element_ty
    even = tl.load(src + 2 * i, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(src + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_row + i, mask=mask, other=0.0)
    sin = tl.load(sin_row + i, mask=mask, other=0.0)
    real = (even * cos - odd * sin).to(dtype)
    imag = (even * sin + odd * cos).to(dtype)
    if NORM:
        real32, imag32 = real.to(tl.float32), imag.to(tl.float32)
        square_sum = tl.sum(real32 * real32, axis=0) + tl.sum(imag32 * imag32, axis=0)
        rstd = tl.math.rsqrt(square_sum / (2 * half) + eps)
        real, imag = (real32 * rstd).to(dtype), (imag32 * rstd).to(dtype)
    tl.store(dst + 2 * i, real, mask=mask)
    tl.store(dst + 2 * i + 1, imag, mask=mask)


@triton.jit
def _kv_row(pos_ptr, table_ptr, b, stride_pos, stride_table, table_width, slots, PAGED: tl.constexpr):
    """(storage row, keys visible after the write) of sequence ``b``'s decode token: ring slot ``pos % slots`` of
    row ``b`` (the visible keys: the chunk's prefix up to the slot), or the block table's block (all ``pos + 1``).
    A position past the table's width uses the row's last entry (its own block or the pool's scratch block), so
    an unchecked write past every reservation never lands in another sequence's blocks."""
    pos = tl.load(pos_ptr + b * stride_pos).to(tl.int64)
    slot = pos % slots
    if PAGED:
        entry = tl.minimum(pos // slots, table_width - 1)
        block = tl.load(table_ptr + b * stride_table + entry).to(tl.int64)
        return block * slots + slot, pos + 1
    return b * slots + slot, slot + 1


@triton.jit
def _rope_qk_norm_kernel(
    q_ptr,  # (batch, seq, n_heads, D), last dim contiguous
    k_ptr,  # (batch, seq, n_kv_heads, D)
    q_out_ptr,  # contiguous (batch, seq, n_heads, D)
    k_out_ptr,  # contiguous (batch, seq, n_kv_heads, D)
    cos_ptr,  # (batch or 1, seq, D // 2) fp32
    sin_ptr,
    seq,
    n_heads,
    n_kv_heads,
    half,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_cb,
    stride_cs,
    eps,
    v_ptr,  # WRITE_KV: (batch, 1, n_kv_heads, D) new values, last dim contiguous
    v_store_ptr,  # WRITE_KV: the cache storage (as _write_kv_kernel's); k_out_ptr is the key storage
    pos_ptr,
    table_ptr,
    lens_ptr,
    slots,
    stride_vb,
    stride_vh,
    stride_pos,
    stride_table,
    table_width,
    NORM: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
    WRITE_KV: tl.constexpr = False,  # decode (seq 1): rotated keys and the values go straight into the cache
    PAGED: tl.constexpr = False,
):
    pdl_wait_and_trigger(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    b = token // seq
    s = token % seq
    cos_row = cos_ptr + b * stride_cb + s * stride_cs
    sin_row = sin_ptr + b * stride_cb + s * stride_cs
    if head < n_heads:
        src = q_ptr + b * stride_qb + s * stride_qs + head * stride_qh
        dst = q_out_ptr + (token * n_heads + head) * (2 * half)
    else:
        kv_head = head - n_heads
        src = k_ptr + b * stride_kb + s * stride_ks + kv_head * stride_kh
        if WRITE_KV:
            row, kv_len = _kv_row(pos_ptr, table_ptr, b, stride_pos, stride_table, table_width, slots, PAGED)
            dst = k_out_ptr + (row * n_kv_heads + kv_head) * (2 * half)
            dims = tl.arange(0, 2 * BLOCK)
            mask = dims < 2 * half
            value = tl.load(v_ptr + b * stride_vb + kv_head * stride_vh + dims, mask=mask)
            tl.store(v_store_ptr + (row * n_kv_heads + kv_head) * (2 * half) + dims, value, mask=mask)
            if kv_head == 0:
                tl.store(lens_ptr + b, kv_len.to(tl.int32))
        else:
            dst = k_out_ptr + (token * n_kv_heads + kv_head) * (2 * half)
    _rope_head(src, dst, cos_row, sin_row, half, eps, NORM, BLOCK)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, size_n, stride_gate, stride_up, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):  # fmt: skip
    pdl_wait_and_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size_n
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # F.silu rounds its output, then the product rounds
    tl.store(out_ptr + row * size_n + cols, (act.to(tl.float32) * up).to(dtype), mask=mask)


@triton.jit
def _router_kernel(
    x_ptr,  # (tokens, H)
    w_ptr,  # (E, H) contiguous
    logits_ptr,  # (tokens, E)
    topk_w_ptr,  # (tokens, TOP_K)
    topk_id_ptr,  # (tokens, TOP_K) int64
    count_ptr,  # (tokens,) int32 arrival counters, zero between calls
    delta_ptr,  # NORM: (tokens, H) added to x
    norm_w_ptr,  # NORM: (H,) RMSNorm weight
    sum_ptr,  # NORM: (tokens, H) out: x + delta
    h_ptr,  # NORM: (tokens, H) out: rms_norm(x + delta) * norm weight, the experts' input
    size_h,
    n_experts,
    stride_x,
    stride_delta,
    eps,
    TOP_K: tl.constexpr,
    EXTRA: tl.constexpr,  # 1: one more slot per token, expert n_experts with weight 1.0 (the folded shared expert)
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (token, expert) computes one logit (all E programs of a token read the router weight in
    parallel); the last of a token's programs to arrive — counted with an atomic — runs the top-k and sigmoid.
    The top-k outputs have ``TOP_K + EXTRA`` slots per token.

    ``NORM``: the router's input is ``h = rms_norm(x + delta) * norm weight``, made here (the residual add and
    the post-attention norm of the decoder layer, as :func:`_rms_norm_kernel` computes them: same roundings, same
    one-row sum): every program computes the row's rstd, the expert-0 program also stores ``x + delta`` and
    ``h``, and the whole row's logit is one pass over registers: the router and norm weights (parameters, written
    by no kernel of the step) are loaded before the PDL wait, while the previous kernel runs."""
    token = tl.program_id(0).to(tl.int64)
    expert = tl.program_id(1)
    dtype = logits_ptr.dtype.element_ty
    if NORM:
        cols_h = tl.arange(0, BLOCK_H)
        ok_h = cols_h < size_h
        w_row = tl.load(w_ptr + expert * size_h + cols_h, mask=ok_h, other=0.0).to(tl.float32)
        norm_w = tl.load(norm_w_ptr + cols_h, mask=ok_h, other=0.0).to(tl.float32)
    pdl_wait_and_trigger(PDL)
    if NORM:
        row = tl.load(x_ptr + token * stride_x + cols_h, mask=ok_h, other=0.0).to(tl.float32)
        row += tl.load(delta_ptr + token * stride_delta + cols_h, mask=ok_h, other=0.0).to(tl.float32)
        summed = row.to(dtype)  # the residual stream is rounded to the activation dtype (HF)
        summed32 = summed.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(summed32 * summed32, axis=0) / size_h + eps)
        h = ((summed32 * rstd).to(dtype).to(tl.float32) * norm_w).to(dtype)
        if expert == 0:
            tl.store(sum_ptr + token * size_h + cols_h, summed, mask=ok_h)
            tl.store(h_ptr + token * size_h + cols_h, h, mask=ok_h)
        logit = tl.sum(w_row * h.to(tl.float32), axis=0)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, size_h, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            k_ok = cols < size_h
            x = tl.load(x_ptr + token * stride_x + cols, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + expert * size_h + cols, mask=k_ok, other=0.0).to(tl.float32)
            acc += w * x
        logit = tl.sum(acc, axis=0)
    # rounded like F.linear's output; the top-k runs on the rounded values
    tl.store(logits_ptr + token * n_experts + expert, logit.to(dtype))
    tl.debug_barrier()  # the logit is written before the (release) arrival below
    arrived = tl.atomic_add(count_ptr + token, 1, sem="acq_rel", scope="gpu")
    if arrived == n_experts - 1:
        experts = tl.arange(0, BLOCK_E)
        e_ok = experts < n_experts
        # .cg: read the other programs' logits from L2 (never a stale L1 line)
        logits = tl.load(logits_ptr + token * n_experts + experts, mask=e_ok, other=0.0, cache_modifier=".cg")
        remaining = tl.where(e_ok, logits.to(tl.float32), float("-inf"))
        for slot in tl.static_range(TOP_K):
            best = tl.max(remaining, axis=0)
            # lowest expert index among equal logits (a NaN logit never matches: clamp keeps the id in range)
            chosen = tl.minimum(tl.min(tl.where(remaining == best, experts, BLOCK_E), axis=0), n_experts - 1)
            tl.store(topk_id_ptr + token * (TOP_K + EXTRA) + slot, chosen.to(tl.int64))
            tl.store(
                topk_w_ptr + token * (TOP_K + EXTRA) + slot, tl.sigmoid(best).to(topk_w_ptr.dtype.element_ty)
            )
            remaining = tl.where(experts == chosen, float("-inf"), remaining)
        if EXTRA:
            tl.store(topk_id_ptr + token * (TOP_K + 1) + TOP_K, token * 0 + n_experts)  # int64
            tl.store(topk_w_ptr + token * (TOP_K + 1) + TOP_K, tl.full([], 1.0, topk_w_ptr.dtype.element_ty))
        tl.atomic_xchg(count_ptr + token, 0)  # ready for the next call (and the next replay of a CUDA graph)


@triton.jit
def _fp8_kv_scale_bits(amax):
    """:func:`scout_mm.kernels.reference.fp8_kv_scale` of a row's ``max|x|`` (fp32): the power of two ``s``, as
    (s, 1 / s), from the bits of ``amax`` (exact; no division)."""
    bits = amax.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    exp = tl.minimum(tl.maximum(exp, -110), 120)
    return ((exp + 127) << 23).to(tl.float32, bitcast=True), ((127 - exp) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_e4m3(y):
    """``y`` (fp32, ``|y| <= 448``) rounded to the nearest e4m3 value (ties to even), still fp32: normal values
    keep 3 mantissa bits, subnormal ones (below 2^-6) are multiples of 2^-9. The conversion to fp8 after it is
    then exact, whichever instruction does it (Triton's CPU interpreter mis-rounds values that carry into the
    next binade, e.g. 127.4 -> 64)."""
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    magnitude = (tl.abs(y) + 24576.0) - 24576.0  # 24576 = 1.5 * 2^14: its ulp is 2^-9
    sign = bits & -0x80000000  # y's sign bit (a negative y that rounds to zero gives -0, as the reference)
    subnormal = (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(y) >= 0.015625, normal, subnormal)


@triton.jit
def _store_kv_row(store_ptr, scale_ptr, dst, value, mask, FP8: tl.constexpr):
    """One cached row (a token's key or value of one kv head): as given, or (``FP8``) as e4m3 values and their
    power-of-two scale (:func:`scout_mm.kernels.reference.quantize_kv_fp8`, bit for bit)."""
    if FP8:
        x = value.to(tl.float32)
        scale, inverse = _fp8_kv_scale_bits(tl.max(tl.where(mask, tl.abs(x), 0.0), 0))
        tl.store(store_ptr + dst, _round_e4m3(x * inverse).to(store_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr, scale)
    else:
        tl.store(store_ptr + dst, value, mask=mask)


@triton.jit
def _write_kv_kernel(
    k_ptr,  # (batch, 1, n_kv_heads, D) new keys, last dim contiguous
    v_ptr,
    k_store_ptr,  # contiguous ring (batch, ring, n_kv_heads, D) or pool (n_blocks, block_size, n_kv_heads, D)
    v_store_ptr,
    k_scale_ptr,  # FP8: contiguous (.., .., n_kv_heads) fp32 scales of the stored rows, else unused
    v_scale_ptr,
    pos_ptr,  # (batch,) positions
    table_ptr,  # (batch, max_blocks) int32 block table, or unused (ring)
    lens_ptr,  # (batch,) int32 out
    n_kv_heads,
    head_dim,
    slots,  # ring size or block size
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_pos,
    stride_table,
    table_width,
    PAGED: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait_and_trigger(PDL)
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row, kv_len = _kv_row(pos_ptr, table_ptr, b, stride_pos, stride_table, table_width, slots, PAGED)
    dims = tl.arange(0, BLOCK_D)
    mask = dims < head_dim
    dst = (row * n_kv_heads + head) * head_dim + dims
    scale_at = row * n_kv_heads + head
    key = tl.load(k_ptr + b * stride_kb + head * stride_kh + dims, mask=mask)
    _store_kv_row(k_store_ptr, k_scale_ptr + scale_at, dst, key, mask, FP8)
    value = tl.load(v_ptr + b * stride_vb + head * stride_vh + dims, mask=mask)
    _store_kv_row(v_store_ptr, v_scale_ptr + scale_at, dst, value, mask, FP8)
    if head == 0:
        tl.store(lens_ptr + b, kv_len.to(tl.int32))


# ----------------------------------------------------------------------------------------------------------
# Launchers (same signatures as scout_mm.kernels.fused_reference)
# ----------------------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, last dim) with a unit last stride; a view whenever the leading dims allow it."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _norm_warps(block: int) -> int:
    return 8 if block >= 4096 else 4 if block >= 1024 else 1


def _norm(x, delta, weight, eps):
    size_h = x.shape[-1]
    rows = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(size_h)
    delta_rows = _rows(delta) if delta is not None else rows
    summed = torch.empty_like(out) if delta is not None else out
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, delta_rows, weight if weight is not None else rows, summed, out, size_h, rows.stride(0),
            delta_rows.stride(0), eps, HAS_DELTA=delta is not None, HAS_WEIGHT=weight is not None,
            BLOCK_H=block, num_warps=_norm_warps(block), **pdl_args(x.device),
        )  # fmt: skip
    return summed, out


def _check_norm(x, weight, delta=None):
    if weight is not None and (weight.shape != (x.shape[-1],) or weight.dtype != x.dtype):
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype}; expected ({x.shape[-1]},) {x.dtype}")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype):
        raise ValueError(f"delta {tuple(delta.shape)} {delta.dtype}; expected {tuple(x.shape)} {x.dtype}")
    if x.shape[-1] > FUSED_MAX_NORM_DIM:
        raise ValueError(f"last dim {x.shape[-1]} > {FUSED_MAX_NORM_DIM}; use the reference")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check_norm(x, weight)
    return _norm(x, None, weight, eps)[1]


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_norm(x, weight, delta)
    return _norm(x, delta, weight, eps)


def add_residual(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not (x.shape == a.shape == b.shape and x.dtype == a.dtype == b.dtype):
        raise ValueError(f"x {tuple(x.shape)} {x.dtype}, a {tuple(a.shape)} {a.dtype}, b {tuple(b.shape)} {b.dtype}; "
                         "expected one shape and dtype")  # fmt: skip
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        block = 1024
        _add_residual_kernel[(triton.cdiv(x.numel(), block),)](
            x, a, b, out, x.numel(), BLOCK=block, num_warps=4, **pdl_args(x.device)
        )
    return out


def _check_rope(q, k, cos, sin):
    batch, seq, n_heads, head_dim = q.shape
    if k.shape[:2] != q.shape[:2] or k.shape[3] != head_dim or head_dim % 2 or k.dtype != q.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}; expected (batch, seq, "
                         "heads, even head_dim) with the same batch, seq, head_dim and dtype")  # fmt: skip
    half = head_dim // 2
    if cos.shape != sin.shape or cos.shape[1:] != (seq, half) or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}; expected ({batch} or 1, {seq}, {half})"
        )


def _launch_rope(q, k, cos, sin, eps, q_out, k_dst, kv_args=(), **kv_consts):
    """One program per (token, head): q heads into ``q_out``, k heads into ``k_dst`` (a like-shaped tensor, or
    with ``kv_args`` (WRITE_KV) the key storage of the cache)."""
    batch, seq, n_heads, head_dim = q.shape
    half = head_dim // 2
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    block = triton.next_power_of_2(half)
    kv_args = kv_args or (q, q, q, q, q, 1, 0, 0, 0, 0, 1)  # unused without WRITE_KV
    _rope_qk_norm_kernel[(batch * seq, n_heads + k.shape[2])](
        q, k, q_out, k_dst, cos, sin, seq, n_heads, k.shape[2], half, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), stride_cb, cos.stride(1), eps if eps is not None else 0.0,
        *kv_args, NORM=eps is not None, BLOCK=block, num_warps=1 if block <= 64 else 2, **kv_consts,
        **pdl_args(q.device),
    )  # fmt: skip


def _rope_operands(q, k, cos, sin):
    """Checked q, k (last dim contiguous), fp32 cos / sin tables, and the rotated q's output tensor."""
    _check_rope(q, k, cos, sin)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    return (
        q,
        k,
        cos.float().contiguous(),
        sin.float().contiguous(),
        torch.empty(q.shape, dtype=q.dtype, device=q.device),
    )


def rope_qk_norm(q, k, cos, sin, eps):
    q, k, cos, sin, q_out = _rope_operands(q, k, cos, sin)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] * q.shape[1]:
        _launch_rope(q, k, cos, sin, eps, q_out, k_out)
    return q_out, k_out


def rope_write_kv_decode(q, k, v, cos, sin, eps, k_store, v_store, positions, ring_size=None, block_table=None,
                         block_size=None):  # fmt: skip
    """:func:`rope_qk_norm` and :func:`write_kv_decode` in one launch: the rotated (and normed) keys and the values
    go straight into the cache. Returns (rotated q, kv_lens)."""
    q, k, cos, sin, q_out = _rope_operands(q, k, cos, sin)
    slots, table, paged = _check_kv_store(k, v, k_store, v_store, ring_size, block_table, block_size)
    _check_kv_scales(k_store, v_store, None, None)  # an FP8 store takes RoPE, then write_kv_decode
    v = v if v.stride(-1) == 1 else v.contiguous()
    kv_lens = torch.empty(q.shape[0], dtype=torch.int32, device=q.device)
    table = table if paged else kv_lens
    kv_args = (v, v_store, positions, table, kv_lens, slots, v.stride(0), v.stride(2), positions.stride(0),
               table.stride(0), table.shape[-1])  # fmt: skip
    _launch_rope(q, k, cos, sin, eps, q_out, k_store, kv_args, WRITE_KV=True, PAGED=paged)
    return q_out, kv_lens


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} vs up {tuple(up.shape)} {up.dtype}")
    gate_rows, up_rows = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    size_n = gate.shape[-1]
    if gate_rows.shape[0] and size_n:
        block = min(1024, triton.next_power_of_2(size_n))
        _silu_mul_kernel[(gate_rows.shape[0], triton.cdiv(size_n, block))](
            gate_rows, up_rows, out, size_n, gate_rows.stride(0), up_rows.stride(0), BLOCK=block,
            num_warps=4 if block >= 512 else 1, **pdl_args(gate.device),
        )  # fmt: skip
    return out


def _router(x, weight, top_k: int, shared_slot: bool, norm=None):
    """Launch :func:`_router_kernel` on (tokens, H) ``x``; ``norm`` = (delta, norm weight, eps): the kernel's
    ``NORM`` form. Returns (topk_weights, topk_ids, logits) and, with ``norm``, (x + delta, h) first."""
    tokens, size_h = x.shape
    n_experts = weight.shape[0]
    if weight.shape != (n_experts, size_h) or weight.dtype != x.dtype or not 1 <= top_k <= n_experts:
        raise ValueError(f"router weight {tuple(weight.shape)} {weight.dtype}, top_k {top_k}; expected "
                         f"(n_experts, {size_h}) {x.dtype} and 1 <= top_k <= n_experts")  # fmt: skip
    if n_experts > ROUTER_MAX_EXPERTS:
        raise ValueError(f"{n_experts} experts > {ROUTER_MAX_EXPERTS}; use the reference")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    logits = torch.empty(tokens, n_experts, dtype=x.dtype, device=x.device)
    extra = int(bool(shared_slot))
    topk_weights = torch.empty(tokens, top_k + extra, dtype=x.dtype, device=x.device)
    topk_ids = torch.empty(tokens, top_k + extra, dtype=torch.int64, device=x.device)
    block_h = triton.next_power_of_2(size_h)
    if norm is None:
        delta = norm_weight = summed = h = x  # unused slots
        eps, warps = 0.0, 4
    else:
        delta, norm_weight, eps = norm
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
        norm_weight = norm_weight.contiguous()
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        warps = _norm_warps(block_h)  # as the norm kernel: the same one-row sum, so the same rstd
    if tokens:
        _router_kernel[(tokens, n_experts)](
            x, weight, logits, topk_weights, topk_ids, arrival_counters(x.device, tokens), delta, norm_weight,
            summed, h, size_h, n_experts, x.stride(0), delta.stride(0), eps, TOP_K=top_k, EXTRA=extra,
            BLOCK_E=triton.next_power_of_2(n_experts), BLOCK_K=min(4096, block_h), NORM=norm is not None,
            BLOCK_H=block_h if norm is not None else 1, num_warps=warps, **pdl_args(x.device),
        )  # fmt: skip
    routed = (topk_weights, topk_ids, logits)
    return routed if norm is None else (summed, h) + routed


def router_topk(hidden: torch.Tensor, weight: torch.Tensor, top_k: int, shared_slot: bool = False):
    """``shared_slot``: the top-k outputs get one more column, expert ``n_experts`` with weight 1.0 (the shared
    expert folded into the routed stacks, :func:`scout_mm.fusion.fuse_shared_expert`)."""
    return _router(hidden, weight, top_k, shared_slot)


def add_rms_norm_router(x, delta, norm_weight, eps, weight, top_k: int, shared_slot: bool = False):
    """:func:`add_rms_norm` then :func:`router_topk` on its output, in ONE launch (the router kernel with
    ``NORM``): returns ``(x + delta, h, topk_weights, topk_ids, logits)`` for (tokens, H) ``x`` and ``delta``."""
    _check_norm(x, norm_weight, delta)
    if x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)}; expected (tokens, hidden)")
    return _router(x, weight, top_k, shared_slot, norm=(delta, norm_weight, eps))


def _check_kv_store(k, v, k_store, v_store, ring_size, block_table, block_size):
    """Check one decode token's keys/values against the cache storage; returns (slots, block table, paged)."""
    batch, q_len, n_kv_heads, head_dim = k.shape
    if q_len != 1 or v.shape != k.shape:
        raise ValueError(
            f"k {tuple(k.shape)}, v {tuple(v.shape)}; expected one token: (batch, 1, heads, dim)"
        )
    if (ring_size is None) == (block_table is None) or (block_table is not None and block_size is None):
        raise ValueError("give ring_size (ring layout) or block_table + block_size (paged layout)")
    if not (k_store.is_contiguous() and v_store.is_contiguous()) or k_store.shape[2:] != (
        n_kv_heads,
        head_dim,
    ):
        raise ValueError(
            f"KV storage {tuple(k_store.shape)} must be contiguous (.., .., {n_kv_heads}, {head_dim})"
        )
    paged = block_table is not None
    return (block_size if paged else ring_size), block_table, paged


def _check_kv_scales(k_store, v_store, k_scale_store, v_scale_store) -> bool:
    """True for an FP8 store (:func:`scout_mm.kernels.reference.check_kv_scales`, contiguous scales)."""
    return check_kv_scales(k_store, v_store, k_scale_store, v_scale_store, ("k_scale_store", "v_scale_store"),
                           contiguous=True)  # fmt: skip


def write_kv_decode(k, v, k_store, v_store, positions, ring_size=None, block_table=None, block_size=None,
                    k_scale_store=None, v_scale_store=None):  # fmt: skip
    batch, _, n_kv_heads, head_dim = k.shape
    slots, block_table, paged = _check_kv_store(k, v, k_store, v_store, ring_size, block_table, block_size)
    fp8 = _check_kv_scales(k_store, v_store, k_scale_store, v_scale_store)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    kv_lens = torch.empty(batch, dtype=torch.int32, device=k.device)
    table = block_table if paged else kv_lens
    scales = (k_scale_store, v_scale_store) if fp8 else (kv_lens, kv_lens)
    _write_kv_kernel[(batch, n_kv_heads)](
        k, v, k_store, v_store, *scales, positions, table, kv_lens, n_kv_heads, head_dim,
        slots, k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        positions.stride(0), table.stride(0), table.shape[-1], PAGED=paged, FP8=fp8,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1, **pdl_args(k.device),
    )  # fmt: skip
    return kv_lens
