"""Decode attention: a few new query tokens against the KV cache, split-K (flash-decoding), GQA-packed.

KV cache layouts (the kernel reads either in place; only the last dim must be contiguous):
- contiguous: k, v (batch, n_kv_heads, capacity, head_dim), as :func:`scout_mm.kernels.attention` (dispatch) takes
  them (a (batch, capacity, n_kv_heads, head_dim) buffer transposed to that view needs no copy).
- paged: k, v (n_blocks, block_size, n_kv_heads, head_dim), a shared block pool, with
  ``block_table`` (batch, max_blocks) int32: logical block ``j`` of sequence ``b`` (its keys
  ``[j * block_size, (j + 1) * block_size)``) lives in pool block ``block_table[b, j]``.
  Any block_size works (it need not match the kernel's tile).

``kv_lens`` (batch,) int32 holds each sequence's number of cached keys, the new tokens included (None: all
of the contiguous capacity). The ``q_len`` queries are the sequence's last positions: query ``j`` sits at
key index ``kv_lens[b] - q_len + j`` and sees keys ``[kv_start[b], that index]`` (causal among the new
tokens; ``kv_start`` skips left padding, or keys outside a local window).

Split-K: the live keys ``[kv_start, kv_lens)`` of each (sequence, kv head) are cut into ``n_splits`` equal
ranges of whole key tiles, one program each, so that one long sequence still fills the GPU. The ranges are
computed in the kernel from ``kv_lens``, not from the cache's capacity: a cache reserved for far more tokens
than it holds (and a CUDA graph replayed as the sequence grows) still spreads the keys over every split. A
program takes all ``group * q_len`` query rows of its kv head as the rows of one matmul, so each K/V byte is
read once for the whole group. Each split writes its normalised partial output and log-sum-exp;
:func:`merge_states` combines them. The same merge combines attention over disjoint key sets computed any
other way (sparse blocks, offloaded blocks, a local window).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from scout_mm.kernels.launch import arrival_counters, pdl_args, pdl_wait_and_trigger
from scout_mm.kernels.reference import FP8_KV_DTYPE, check_kv_scales

_LOG2E = 1.4426950408889634
# Compiled kernels convert e4m3 words to bf16 with inline PTX (_e4m3_words); the interpreter runs the fp32 arithmetic.
USE_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _e4m3_byte(words, j: tl.constexpr):
    """Code ``j`` (byte j) of each int32 word of four e4m3 codes, as its exact fp32 value: the sign to bit 31, the
    exponent and mantissa to the top of the fp32 exponent and mantissa fields, times 2**120 (the formats' bias gap,
    127 - 7; exact, subnormal codes too)."""
    code = (words >> (8 * j)) & 0xFF
    bits = ((code & 0x80) << 24) | ((code & 0x7F) << 20)
    return bits.to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2**120


@triton.jit
def _e4m3_words(words, dtype: tl.constexpr):
    """(rows, W) int32 words, four e4m3 codes each (byte j = element 4 w + j) -> (rows, 4 W) values in ``dtype``.
    bf16 (compiled): inline PTX, per pair of codes a ``prmt`` (each code byte to the high byte of a 16-bit half),
    a shift right by 4 (exponent into the low bits of the bf16 exponent, mantissa to the top of the bf16
    mantissa), the sign masked off and put back (``and``, ``lop3``), then times 2**120 as a bf16x2 FMA (subnormal
    codes stay exact). Otherwise :func:`_e4m3_byte` in fp32, then cast. The words are read with wide loads in a
    plain layout; Triton's own e4m3 conversion is done in the matmul operand layout, which reads an 8-bit V tile
    from shared memory one byte at a time (``bench/results/kv_fp8_h100.md``, session 18)."""
    if USE_ASM and dtype == tl.bfloat16:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(
            """{
            .reg .b32 d0, d1, t0, t1, two120, nzero;
            mov.b32 two120, 0x7B807B80;
            mov.b32 nzero, 0x80008000;
            prmt.b32 d0, 0, $4, 0x5040;
            prmt.b32 d1, 0, $4, 0x7060;
            shr.b32 t0, d0, 4;
            shr.b32 t1, d1, 4;
            and.b32 t0, t0, 0x07FF07FF;
            and.b32 t1, t1, 0x07FF07FF;
            lop3.b32 t0, t0, d0, nzero, 0xF8;
            lop3.b32 t1, t1, d1, nzero, 0xF8;
            fma.rn.bf16x2 t0, t0, two120, nzero;
            fma.rn.bf16x2 t1, t1, two120, nzero;
            mov.b32 {$0, $1}, t0;
            mov.b32 {$2, $3}, t1;
            }""",
            "=h,=h,=h,=h,r",
            [words],
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
            is_pure=True,
            pack=1,
        )
    else:
        c0 = _e4m3_byte(words, 0).to(dtype)
        c1 = _e4m3_byte(words, 1).to(dtype)
        c2 = _e4m3_byte(words, 2).to(dtype)
        c3 = _e4m3_byte(words, 3).to(dtype)
    # tl.join appends its new axis last: [..., w, i, j] = join(c_i, c_{2+i})[..., j] = code 2 i + j of word w
    both = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    return tl.reshape(both, (words.shape[0], 4 * words.shape[1]))


@triton.jit
def _weighted_part(PartOut, PartLse, p, n_rows, out_row, dims, ok, m, HEAD_DIM: tl.constexpr):
    """Split ``p``'s normalised partial rows times ``exp(lse - m)`` (zeros where not ``ok``); read from the L2
    (``.cg``), where the other programs' stores are."""
    w = tl.exp(
        tl.load(PartLse + p * n_rows + out_row, mask=ok, other=float("-inf"), cache_modifier=".cg") - m
    )
    o = tl.load(PartOut + (p * n_rows + out_row)[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0,
                cache_modifier=".cg")  # fmt: skip
    return o * w[:, None]


@triton.jit
def _decode_split_kernel(
    Q, K, V, KScale, VScale, BlockTable, KVLens, KVStart, QScale, PartOut, PartLse, Out, Lse, Counters,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,  # paged: (block, head, slot)
    stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,  # KV_FP8: the scales', same order
    stride_table, n_kv_heads, n_rows, n_splits, capacity, min_split, block_size, qk_scale,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGED: tl.constexpr, HAS_LENS: tl.constexpr, HAS_KV_START: tl.constexpr,
    HAS_Q_SCALE: tl.constexpr, KV_FP8: tl.constexpr, FUSED_MERGE: tl.constexpr, BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait_and_trigger(PDL)
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // n_kv_heads
    kv_h = pid % n_kv_heads
    b64 = b.to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    head = kv_h * GROUP + r // Q_LEN
    qi = r % Q_LEN
    row_ok = r < GROUP * Q_LEN
    dims = tl.arange(0, HEAD_DIM)
    words = tl.arange(0, HEAD_DIM // 4)  # KV_FP8 3: a row of codes as int32 words
    q = tl.load(Q + b64 * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    if HAS_Q_SCALE:
        # NoPE temperature: q times the fp32 scale, rounded once to q's dtype (as HF and the prefill kernels)
        q_scale = tl.load(QScale + b64 * Q_LEN + qi, mask=row_ok, other=0.0)
        q = (q.to(tl.float32) * q_scale[:, None]).to(q.dtype)

    kv_len = capacity
    if HAS_LENS:
        kv_len = tl.load(KVLens + b)
    kv0 = 0
    if HAS_KV_START:
        kv0 = tl.load(KVStart + b)
    t = kv_len - Q_LEN + qi  # key index of each query row
    # The splits share the live keys [kv0, kv_len) (read here, so a CUDA graph replayed at another length
    # still spreads them over every split), in whole BLOCK_N tiles of at least min_split keys each.
    live_lo = kv0 // BLOCK_N * BLOCK_N
    split_len = tl.cdiv(tl.maximum(kv_len - live_lo, 0), n_splits)
    split_len = tl.cdiv(tl.maximum(split_len, min_split), BLOCK_N) * BLOCK_N
    lo = live_lo + split * split_len
    hi = tl.minimum(lo + split_len, kv_len)

    if not PAGED:
        K += b64 * stride_kb + kv_h * stride_kh
        V += b64 * stride_vb + kv_h * stride_vh
        KScale += b64 * stride_ksb + kv_h * stride_ksh
        VScale += b64 * stride_vsb + kv_h * stride_vsh
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        if PAGED:
            block = tl.load(BlockTable + b64 * stride_table + cols // block_size, mask=col_ok, other=0)
            slot = cols % block_size
            k_off = block.to(tl.int64) * stride_kb + slot * stride_kn + kv_h * stride_kh
            v_off = block.to(tl.int64) * stride_vb + slot * stride_vn + kv_h * stride_vh
            ks_off = block.to(tl.int64) * stride_ksb + slot * stride_ksn + kv_h * stride_ksh
            vs_off = block.to(tl.int64) * stride_vsb + slot * stride_vsn + kv_h * stride_vsh
        else:
            k_off = cols * stride_kn
            v_off = cols * stride_vn
            ks_off = cols * stride_ksn
            vs_off = cols * stride_vsn
        if KV_FP8 == 3:  # int32 words of 4 codes (K, V passed as int32 views, strides in words)
            k = _e4m3_words(
                tl.load(K + k_off[:, None] + words[None, :], mask=col_ok[:, None], other=0), q.dtype
            )
        else:
            k = tl.load(K + k_off[:, None] + dims[None, :], mask=col_ok[:, None], other=0.0)
        # KV_FP8 1: e4m3 times its row's power-of-two scale (exact in fp32), in q's dtype, as dequantize_kv
        if KV_FP8 == 1:
            k = (k.to(tl.float32) * tl.load(KScale + ks_off, mask=col_ok, other=0.0)[:, None]).to(q.dtype)
        if KV_FP8 >= 2:
            # the scale applied to the scores instead: a power of two commutes with every fp32 product and sum
            k_scale = tl.load(KScale + ks_off, mask=col_ok, other=0.0)
            qk = tl.dot(q, tl.trans(k.to(q.dtype))) * (k_scale * qk_scale)[None, :]
        else:
            qk = tl.dot(q, tl.trans(k)) * qk_scale
        visible = (cols[None, :] <= t[:, None]) & (cols[None, :] >= kv0) & col_ok[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_FP8 == 3:
            v = _e4m3_words(
                tl.load(V + v_off[:, None] + words[None, :], mask=col_ok[:, None], other=0), q.dtype
            )
        else:
            v = tl.load(V + v_off[:, None] + dims[None, :], mask=col_ok[:, None], other=0.0)
        if KV_FP8 >= 2 and q.dtype == tl.bfloat16:
            # bf16: the value scale on the probabilities instead (p * 2^e rounds as p does, in bf16's fp32 range)
            p_v = p * tl.load(VScale + vs_off, mask=col_ok, other=0.0)[None, :]
            acc = tl.dot(p_v.to(q.dtype), v.to(q.dtype), acc * alpha[:, None])
        else:
            if KV_FP8 != 0:
                v = (v.to(tl.float32) * tl.load(VScale + vs_off, mask=col_ok, other=0.0)[:, None]).to(q.dtype)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)
    # Partial rows are laid out (split, batch, n_heads, q_len): the rows of the final output, per split.
    out_row = ((b64 * n_kv_heads * GROUP + head) * Q_LEN + qi).to(tl.int64)  # row of the final output
    row = split * n_rows + out_row
    tl.store(PartOut + row[:, None] * HEAD_DIM + dims[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
    tl.store(PartLse + row, lse, mask=row_ok)
    if FUSED_MERGE:
        # The last split of this (sequence, kv head) to arrive — counted with an atomic — merges all splits'
        # rows (what _merge_kernel does, one launch less). Same math; splits summed in split order.
        tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
        arrived = tl.atomic_add(Counters + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == n_splits - 1:
            parts = tl.arange(0, BLOCK_P)
            part_ok = parts < n_splits
            lses = tl.load(PartLse + parts[:, None] * n_rows + out_row[None, :],
                           mask=part_ok[:, None] & row_ok[None, :], other=float("-inf"),
                           cache_modifier=".cg")  # fmt: skip
            m = tl.max(lses, 0)
            m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, output 0, LSE -inf
            total = tl.sum(tl.exp(lses - m[None, :]), 0)
            merged = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            if BLOCK_P <= 16:
                # unrolled (masked past n_splits): every split's partial in flight at once, summed in split order
                for p in tl.static_range(BLOCK_P):
                    merged += _weighted_part(PartOut, PartLse, p, n_rows, out_row, dims, row_ok & (p < n_splits), m,
                                             HEAD_DIM)  # fmt: skip
            else:
                for p in range(n_splits):
                    merged += _weighted_part(PartOut, PartLse, p, n_rows, out_row, dims, row_ok, m, HEAD_DIM)
            merged = merged / tl.where(total == 0.0, 1.0, total)[:, None]
            tl.store(Out + out_row[:, None] * HEAD_DIM + dims[None, :], merged.to(Out.dtype.element_ty),
                     mask=row_ok[:, None])  # fmt: skip
            tl.store(Lse + out_row, tl.where(total == 0.0, float("-inf"), m + tl.log(total)), mask=row_ok)
            tl.atomic_xchg(Counters + pid, 0)  # ready for the next call (and the next replay of a CUDA graph)


@triton.jit
def _merge_kernel(
    PartOut, PartLse, Out, Lse, n_parts, n_rows,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, STORE_LSE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_wait_and_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, BLOCK_P)
    part_ok = parts < n_parts
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(PartLse + parts * n_rows + row, mask=part_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every part empty: weights 0, output 0, LSE -inf
    w = tl.exp(lse - m)
    total = tl.sum(w, 0)
    o = tl.load(PartOut + (parts[:, None] * n_rows + row) * HEAD_DIM + dims[None, :], mask=part_ok[:, None],
                other=0.0)  # fmt: skip
    out = tl.sum(o.to(tl.float32) * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + row * HEAD_DIM + dims, out.to(Out.dtype.element_ty))
    if STORE_LSE:
        tl.store(Lse + row, tl.where(total == 0.0, float("-inf"), m + tl.log(total)))


def merge_states(
    outs: torch.Tensor,  # (n_parts, *rows, head_dim): each part's normalised attention output
    lses: torch.Tensor,  # (n_parts, *rows) natural-log LSE; -inf marks a part with no visible key
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (*rows, head_dim), (*rows,) fp32
    """Combine attention over disjoint key sets: softmax-weight each part by ``exp(lse)``. Rows whose
    parts are all empty get output 0 and LSE -inf."""
    out_dtype = out_dtype or outs.dtype
    n_parts, head_dim = outs.shape[0], outs.shape[-1]
    rows = outs.shape[1:-1]
    if not (outs.is_cuda or _interpreting()) or head_dim & (head_dim - 1) or head_dim < 16:
        lse = torch.logsumexp(lses.float(), dim=0)
        weight = torch.exp(lses.float() - torch.where(lse.isinf(), 0.0, lse)).nan_to_num(0.0)
        out = (weight[..., None] * outs.float()).sum(0)
        return out.to(out_dtype), lse
    outs = outs.reshape(n_parts, -1, head_dim).contiguous()
    lses = lses.reshape(n_parts, -1).float().contiguous()
    n_rows = outs.shape[1]
    out = torch.empty(n_rows, head_dim, device=outs.device, dtype=out_dtype)
    lse = torch.empty(n_rows, device=outs.device, dtype=torch.float32)
    _merge_kernel[(n_rows,)](
        outs, lses, out, lse, n_parts, n_rows,
        HEAD_DIM=head_dim, BLOCK_P=triton.next_power_of_2(n_parts), STORE_LSE=True, **pdl_args(outs.device),
    )  # fmt: skip
    return out.view(*rows, head_dim), lse.view(rows)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Launch parameters on CUDA: (BLOCK_N, num_warps, num_stages) per layout, and split-K programs per SM (so
# one sequence still fills the GPU). Picked on an H100 as the best worst case over 128K and 1M keys; a
# re-sweep timed under CUDA graphs (bench_attention.py --tune, 2026-11-24) put these within 1% of its best
# (contiguous 2.88 / 3.09 TB/s at 128K / 1M, paged 2.85 / 3.02; bench/results/attention_h100*.md).
_CUDA_CONFIG = {"contiguous": (128, 4, 3), "paged": (32, 4, 3)}
# An FP8 cache (per layout): converting e4m3 tiles makes the loop issue-bound at 32-key tiles (form 2: 0.66-0.74x the
# bf16 cache at (32, 4, 3)); 128-key tiles gave form 2 1.08-1.11x at 128K-512K keys, and give form 3 with two stages
# 1.32-1.35x (H100, bench/results/kv_fp8_h100.md; the paged layout is what the model's FP8 global layers use).
_CUDA_CONFIG_FP8 = {"contiguous": (128, 4, 3), "paged": (128, 4, 2)}
_PROGRAMS_PER_SM_BY_LAYOUT = {"contiguous": 4, "paged": 4}
# FP8 caches (form 3, (128, 4, 2) tiles) of at least FP8_WIDE_FROM keys' capacity: 8 programs per SM on the paged
# pool, 1.40-1.44x the bf16 cache at 128K-512K keys against 1.33-1.36x with 4 (16: 1.07-1.21x); but at 8K keys 8 are
# 0.94-0.95x against 1.11x with 4 (H100, bench/results/kv_fp8_h100.md, session 18), so smaller caches keep 4.
_PROGRAMS_PER_SM_FP8 = {"contiguous": 4, "paged": 8}
FP8_WIDE_FROM = 131072
_INTERPRET_CONFIG = (16, 4, 1)
# True: the last split program to finish a (sequence, kv head) merges the splits (one launch per call instead
# of two). Measured slower on an H100 in the Scout decode step (bench/results/int4_decode_step_h100.md, session
# 4: split kernel 16.3 us vs 10.1 + 1.9 us for split + merge kernel): the one merging program's loop over the
# splits was a serial chain of L2 round trips, longer than a second (PDL-overlapped) launch; up to 16 splits
# the loop is now unrolled (all loads in flight). None: per layout (FUSED_MERGE_BY_LAYOUT); True / False: always.
FUSED_MERGE = None
FUSED_MERGE_BY_LAYOUT = {"contiguous": False, "paged": False}
# How the split kernel reads an FP8 cache: 1 = each K / V tile dequantised to q's dtype as it is loaded
# (reference.dequantize_kv); 2 = the e4m3 tiles converted only, the key scales applied to the scores and (bf16) the
# value scales to the probabilities; 3 = form 2 with the tiles read as int32 words of four codes and converted by bit
# arithmetic (_e4m3_words; falls back to 2 where a cache's strides or offset are not whole words). The same products
# every way (powers of two). On an H100 (bench/bench_kv_fp8.py, 128K-512K keys): form 1 1.05-1.08x the bf16 cache at
# 32-key tiles, form 2 1.07-1.11x at 128-key tiles, form 3 1.32-1.35x at (128, 4, 2) (shipped).
KV_FP8_FORM = 3


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# The shortest split worth a program of its own, in keys (rounded up to whole tiles), per layout: it also caps
# the programs launched at capacity / minimum, and a sequence shorter than n_splits * minimum leaves its last
# splits empty (they only write an empty partial). Picked in the Scout decode step on an H100 (8K chunked rings
# contiguous, the global layers paged; bench/results/int4_decode_step_h100.md, session 13): contiguous 1024 of
# 64..4096 (fewer, longer splits: 8 a head on an 8K ring), paged 64 of 32..512 (64 splits of 128 keys at 8K).
MIN_SPLIT_KEYS_BY_LAYOUT = {"contiguous": 1024, "paged": 64}


def _n_splits(
    batch: int, n_kv_heads: int, capacity: int, layout: str, device: torch.device, fp8: bool = False
) -> int:
    # Enough programs to give every SM its share, but no more splits than a full cache has minimum-length runs.
    wide = fp8 and capacity >= FP8_WIDE_FROM
    per_sm = (_PROGRAMS_PER_SM_FP8 if wide else _PROGRAMS_PER_SM_BY_LAYOUT)[layout]
    want = max(1, -(-per_sm * _sm_count(device) // (batch * n_kv_heads)))
    return max(1, min(want, capacity // MIN_SPLIT_KEYS_BY_LAYOUT[layout]))


def _check_fp8_cache(q, k, v, k_scale, v_scale) -> bool:
    """True for an FP8 cache (:func:`scout_mm.kernels.reference.check_kv_scales`); any other holds q's dtype."""
    fp8 = check_kv_scales(k, v, k_scale, v_scale)
    if not fp8 and k.dtype != q.dtype:
        raise ValueError(f"k/v {k.dtype} vs q {q.dtype}: the cache holds q's dtype or {FP8_KV_DTYPE}")
    return fp8


def decode_attention(
    q: torch.Tensor,  # (batch, n_heads, q_len, head_dim)
    k: torch.Tensor,  # contiguous (batch, n_kv_heads, capacity, head_dim) | paged (n_blocks, block_size, n_kv_heads, head_dim)
    v: torch.Tensor,  # same layout as k
    *,
    scale: float,
    kv_lens: torch.Tensor | None = None,  # (batch,) int32
    block_table: torch.Tensor | None = None,  # (batch, max_blocks) int32: paged layout
    kv_start: torch.Tensor | None = None,  # (batch,) int32
    q_scale: torch.Tensor | None = None,  # (batch, q_len)
    k_scale: torch.Tensor | None = None,  # FP8 cache: fp32 scale of each row, k's layout without head_dim
    v_scale: torch.Tensor | None = None,
    n_splits: int | None = None,
    config: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, n_heads, q_len, head_dim), (batch, n_heads, q_len) fp32 LSE
    """Split-K flash-decoding over a contiguous or paged KV cache (layouts in the module docstring), in q's dtype
    or FP8 (e4m3 ``k`` / ``v`` with ``k_scale`` / ``v_scale``, each row dequantised as
    :func:`scout_mm.kernels.reference.dequantize_kv` does before it is used).
    Returns the output and the natural-log LSE of each query row, for :func:`merge_states`."""
    batch, n_heads, q_len, head_dim = q.shape
    paged = block_table is not None
    kv_fp8 = _check_fp8_cache(q, k, v, k_scale, v_scale)
    form = KV_FP8_FORM if kv_fp8 else 0
    if form == 3:  # the codes read as int32 words of four (the strides below then count words)
        if k.shape[-1] % 4 or any(s % 4 for t in (k, v) for s in (*t.stride()[:-1], t.storage_offset())):
            form = 2
        else:
            k, v = k.view(torch.int32), v.view(torch.int32)
    # strides as (block, head, slot) when paged, else (batch, head, key); the scales' without head_dim
    order = (0, 2, 1) if paged else (0, 1, 2)
    strides_k, strides_v = (tuple(t.stride(i) for i in order) for t in (k, v))
    strides_scales = tuple(t.stride(i) for t in (k_scale, v_scale) for i in order) if kv_fp8 else (0,) * 6
    if paged:
        block_size, n_kv_heads = k.shape[1], k.shape[2]
        capacity = block_table.shape[1] * block_size
        if kv_lens is None:
            raise ValueError("a paged cache needs kv_lens")
    else:
        n_kv_heads, capacity = k.shape[1], k.shape[2]
        block_size = 1
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last dim")
    group = n_heads // n_kv_heads
    if q_scale is not None and q_scale.shape != (batch, q_len):
        raise ValueError(f"q_scale shape {tuple(q_scale.shape)}; expected {(batch, q_len)}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    layout = "paged" if paged else "contiguous"
    cuda_config = (_CUDA_CONFIG_FP8 if kv_fp8 else _CUDA_CONFIG)[layout]
    block_n, num_warps, num_stages = config or (cuda_config if q.is_cuda else _INTERPRET_CONFIG)
    if n_splits is None:
        n_splits = _n_splits(batch, n_kv_heads, capacity, layout, q.device, kv_fp8)
        min_split = MIN_SPLIT_KEYS_BY_LAYOUT[layout]
    elif n_splits < 1:
        raise ValueError(f"n_splits={n_splits}; expected >= 1")
    else:
        min_split = 1  # as asked: the live keys over n_splits, however few
    n_rows = batch * n_heads * q_len
    part_out = torch.empty(n_splits, n_rows, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(n_splits, n_rows, device=q.device, dtype=torch.float32)
    dummy = part_lse
    lens = kv_lens.to(device=q.device, dtype=torch.int32) if kv_lens is not None else dummy
    starts = kv_start.to(device=q.device, dtype=torch.int32) if kv_start is not None else dummy
    table = block_table.to(device=q.device, dtype=torch.int32) if paged else dummy
    scales = q_scale.to(device=q.device, dtype=torch.float32).contiguous() if q_scale is not None else dummy
    fused_merge = FUSED_MERGE_BY_LAYOUT[layout] if FUSED_MERGE is None else FUSED_MERGE
    if fused_merge:
        out = torch.empty(n_rows, head_dim, device=q.device, dtype=q.dtype)
        lse = torch.empty(n_rows, device=q.device, dtype=torch.float32)
        counters = arrival_counters(q.device, batch * n_kv_heads)
    else:
        out, lse, counters = part_out, part_lse, table
    kv_scales = (k_scale, v_scale) if kv_fp8 else (dummy, dummy)
    _decode_split_kernel[(n_splits, batch * n_kv_heads)](
        q, k, v, *kv_scales, table, lens, starts, scales, part_out, part_lse, out, lse, counters,
        q.stride(0), q.stride(1), q.stride(2), *strides_k, *strides_v, *strides_scales,
        table.stride(0) if paged else 0, n_kv_heads, n_rows, n_splits, capacity, min_split, block_size,
        scale * _LOG2E, GROUP=group, Q_LEN=q_len, BLOCK_M=max(16, triton.next_power_of_2(group * q_len)),
        HEAD_DIM=head_dim, BLOCK_N=block_n, PAGED=paged, HAS_LENS=kv_lens is not None,
        HAS_KV_START=kv_start is not None, HAS_Q_SCALE=q_scale is not None, KV_FP8=form,
        FUSED_MERGE=fused_merge,
        # BLOCK_P only matters to the in-kernel merge: a constant otherwise, so a new split count compiles nothing
        BLOCK_P=triton.next_power_of_2(n_splits) if fused_merge else 1, num_warps=num_warps, num_stages=num_stages,
        **pdl_args(q.device),
    )  # fmt: skip
    if not fused_merge:
        out, lse = merge_states(part_out, part_lse, out_dtype=q.dtype)
    return out.view(batch, n_heads, q_len, head_dim), lse.view(batch, n_heads, q_len)


def decode_sdpa(q, k, v, *, scale):
    """Decode of one token over a full contiguous cache through PyTorch SDPA, GQA folded into the query
    length (no repeated K/V): the case where SDPA's semantics fit (no lengths, no padding, q_len 1)."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads = k.shape[1]
    folded = q.reshape(batch, n_kv_heads, (n_heads // n_kv_heads) * q_len, head_dim)
    out = F.scaled_dot_product_attention(folded, k, v, scale=scale)
    return out.view(batch, n_heads, q_len, head_dim)
