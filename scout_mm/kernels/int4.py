"""W4A16 Triton kernels: Int4 weights dequantised in registers, bf16/fp16 (or fp32) activations.

Same functions as :mod:`scout_mm.kernels.int4_reference` (layout in ``scout_mm/quant/FORMAT.md``). Two matmul
kernels serve both the dense linear layers and the two grouped GEMMs of the Int4 MoE:

- ``_gemv_kernel`` (few rows: decode). Plain FMAs, no tensor cores: each program streams a
  ``(BLOCK_K // 8, BLOCK_N)`` tile of packed words per step (the next tile loaded during this one's math) and
  keeps every nibble's product in a per-word accumulator; the group's scale is applied once per word, not
  once per weight. Decode is instruction-bound as much as memory-bound (an H100 streams a Scout weight in
  ~17 us; the math of the first version took ~45 instructions per packed word), so codes never go through an
  int->float conversion: ``unpack`` 2 (bf16/fp16) ORs each nibble, left where one of three shifts puts it,
  into the mantissa of 2**23 and feeds it straight to the FMA (one lop3 + one FMA per code, the 2**23 terms
  summed per word row and subtracted once); ``unpack`` 1 (fp32 activations) adds one exact FMA per code to
  remove the offset (:func:`_codes_minus`); ``unpack`` 0 is the ``1 + q / 16`` form (:func:`_unit_codes`).
  K is split over programs so that even a 5120-wide output fills the GPU;
  the last program to finish a tile sums the splits in a fixed order (deterministic) and runs the epilogue,
  so a decode matmul is ONE launch (the MoE gate_up launch also applies the routing weight and SwiGLU; where it
  fits the registers it streams a tile's gate and up columns as one tile in one loop, ``DUAL``). Per-shape configs:
  ``TUNED["gemv_by_shape"]`` (dense, one row) and ``TUNED["moe_gemv_by_shape"]`` (the decode MoE's launches).
  Shipped: the split-K partials loaded all at once (``reduce_unrolled``) and the split of least estimated finish
  time with 4 programs resident per SM (``resident_per_sm``, :func:`_least_makespan_split`; it replaced a cap of
  4.25 programs per SM, ``split_cap``, which put a second wave behind q|k|v and o). Optional weight loaders
  pipelined in shared memory (``loader`` 1 = cp.async, 2 = TMA tensor descriptor) measured slower on an H100:
  their no-math stream is only ~4% faster than plain register loads, because what caps a ~10-20 us stream is a
  ~3 us fixed cost per launch, not bytes in flight (``bench/results/int4_gemv_h100.md``).
- ``_gemm_kernel`` (more rows), ``tl.dot`` in two forms: ``NIBBLE_DOTS`` (3-16 rows) reads each packed word
  once and runs one 16-deep dot per nibble against the matching strided activation columns; the tile form
  (more rows) dequantises a whole ``(BLOCK_K, BLOCK_N)`` tile and runs one dot. Measured on an H100, the first
  wins at 16 rows and loses 3-5x from 64 on (``bench/results/int4_h100.md``).

Row modes (``MODE``): 0 dense rows; 1 = MoE gate_up, rows gathered from the tokens through the sorted
routing layout of :class:`scout_mm.kernels.moe.Routing`, written at their sorted position; 2 = MoE down,
sorted rows in, each written at its (token, slot) row. MoE epilogues of the tl.dot path are separate small
kernels: ``_swiglu_kernel`` (sum of K splits, routing weight applied to the expert INPUT — exact as a scale
of the fp32 pre-activation, since ``(w x) @ W = w (x @ W)`` — then SwiGLU); both paths end with
``_sum_rows_kernel`` (sum of K splits and of the top-k slots in a fixed order).

Many prompt tokens: dequantising the weight once into a scratch bf16 matrix and calling cuBLAS (dense) or
the bf16 fused MoE (``scout_mm.kernels.moe``) beats dequantising a tile per output block; ``_dequant_kernel``
does that (thresholds in ``TUNED``).
"""

from __future__ import annotations

import functools
import heapq
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from scout_mm.kernels.launch import arrival_counters, pdl_args, pdl_enabled, pdl_wait_and_trigger
from scout_mm.kernels.moe import Routing, _tile

# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

# fp32 bits of 1.0: a code q placed in mantissa bits 19..22 reads as 1 + q / 16 (exact, 5 significant bits)
ONE_BITS = tl.constexpr(0x3F800000)
CODE_BITS = tl.constexpr(0x00780000)
# fp32 bits of 2**23: a code q left at bits s..s+3 (s <= 16) of the mantissa reads as 2**23 + q * 2**s (exact)
MAGIC_BITS = tl.constexpr(0x4B000000)
# Compiled kernels do an and-then-or with two constants as ONE lop3 (inline PTX; LLVM + ptxas emit two
# instructions for ``(v & mask) | bits``); the interpreter runs the plain expression.
USE_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _row_layout(
    pid_m,
    m_rows,
    sorted_rows_ptr,
    block_expert_ptr,
    n_rows,
    top_k,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROUTE_BLOCK: tl.constexpr,
):
    """(expert, input row, output row, valid) of this program's BLOCK_M rows; expert -1 = nothing to do."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if MODE == 0:
        expert = (pid_m * 0).to(tl.int64)
        valid = rows < m_rows
        a_rows = tl.where(valid, rows, 0)
        out_rows = rows
    else:
        expert = tl.load(block_expert_ptr + pid_m * BLOCK_M // ROUTE_BLOCK).to(tl.int64)
        flat = tl.load(sorted_rows_ptr + rows)
        valid = flat < n_rows
        if MODE == 1:
            a_rows = tl.where(valid, flat // top_k, 0)
            out_rows = rows
        else:
            a_rows = rows
            out_rows = flat
    return expert, a_rows.to(tl.int64), out_rows.to(tl.int64), valid


@triton.jit
def _and_or(value, MASK: tl.constexpr, BITS: tl.constexpr):
    """``(value & MASK) | BITS`` on int32 as one ``lop3`` (the constants travel in registers)."""
    if USE_ASM:
        mask = tl.full(value.shape, MASK, tl.int32)
        bits = tl.full(value.shape, BITS, tl.int32)
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;",
            "=r,r,r,r",
            [value, mask, bits],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    return (value & MASK) | BITS


@triton.jit
def _unit_codes(packed, j: tl.constexpr):
    """Nibble ``j`` of each packed word as the fp32 ``1 + q / 16``: one shift and one and-or (a single
    ``lop3``) put the code into mantissa bits 19..22 of 1.0 — no int->float conversion, no subtraction."""
    if 4 * j <= 19:
        moved = packed << (19 - 4 * j)
    else:
        moved = packed >> (4 * j - 19)  # arithmetic shift: the sign bits land outside the mask
    return _and_or(moved, CODE_BITS, ONE_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _magic(words, MASK: tl.constexpr):
    """The code under ``MASK`` (bits s..s+3) OR-ed into the mantissa of 2**23: the fp32 ``2**23 + q 2**s``."""
    return _and_or(words, MASK, MAGIC_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _rotate16(words):
    """int32 words rotated by 16 bits (one funnel shift)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "shf.l.wrap.b32 $0, $1, $1, 16;", "=r,r", [words], dtype=tl.int32, is_pure=True, pack=1
        )
    return (words << 16) | ((words >> 16) & 0xFFFF)


@triton.jit
def _codes_minus(packed, high, j: tl.constexpr, ZERO: tl.constexpr):
    """Nibble ``j`` of each packed word as the exact fp32 ``q - ZERO`` without moving the nibble: codes 0..4
    sit at bits 4j..4j+3 of ``packed``, codes 5..7 at bits 4j-12.. of ``high = packed >> 12``; one ``lop3``
    ORs the bits into the mantissa of 2**23 (value ``2**23 + q 2**s``) and one FMA scales by ``2**-s`` and
    subtracts ``2**(23-s) + ZERO`` (every step exact)."""
    if j < 5:
        magic = _and_or(packed, 0xF << (4 * j), MAGIC_BITS).to(tl.float32, bitcast=True)
        return magic * (1.0 / (1 << (4 * j))) - ((1 << (23 - 4 * j)) + ZERO)
    else:
        magic = _and_or(high, 0xF << (4 * j - 12), MAGIC_BITS).to(tl.float32, bitcast=True)
        return magic * (1.0 / (1 << (4 * j - 12))) - ((1 << (35 - 4 * j)) + ZERO)


@triton.jit
def _group_params(s_ptrs, z_ptrs, first_k, size_n, mask, G: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Scale and zero point of every (word row, column) of a tile: (BLOCK_K // 8, BLOCK_N) fp32 each.
    Rows of one group load the same values (cache hits): the tile may span several groups."""
    offs = (first_k // G)[:, None] * size_n
    scale = tl.load(s_ptrs + offs, mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        zero = scale * 0.0 + 8.0
    else:
        zero = tl.load(z_ptrs + offs, mask=mask, other=0.0).to(tl.float32)
    return scale, zero


@triton.jit
def _decode_words(packed, x_row, k0, row_ok, scale, zero, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, UNPACK: tl.constexpr):  # fmt: skip
    """fp32 (BLOCK_K // 8, BLOCK_N): each packed word of ``packed`` (K rows k0 + 8 r .. k0 + 8 r + 7) times
    its 8 activations from ``x_row`` (word rows past ``row_ok`` read x = 0), scaled by the word's group."""
    dot = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    x_sum = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
    if UNPACK == 0:
        for j in tl.static_range(8):
            xj = tl.load(x_row + k0 + j, mask=row_ok, other=0.0).to(tl.float32)
            dot += xj[:, None] * _unit_codes(packed, j)
            x_sum += xj
        contrib = scale * (16.0 * dot - (16.0 + zero) * x_sum[:, None])
    elif UNPACK == 2:
        # Codes left where three shifts put them, at mantissa bits 12..15 or 16..19 of 2**23: a code is
        # one lop3 and one FMA. Each term x_j 2**-s (2**23 + q 2**s) carries x_j 2**(23-s), summed per
        # word row once (``offset``, with the symmetric zero point) and subtracted up front. fp32 keeps
        # ~15 bits of sum(x q) after that cancellation: for bf16/fp16 activations only.
        words_a = packed  # codes 3 (s=12), 4 (s=16)
        words_b = packed << 8  # codes 1 (s=12), 2 (s=16)
        words_c = packed >> 8  # codes 5 (s=12), 6 (s=16)
        words_d = _rotate16(packed)  # codes 7 (s=12), 0 (s=16)
        x0 = tl.load(x_row + k0 + 0, mask=row_ok, other=0.0).to(tl.float32)
        x1 = tl.load(x_row + k0 + 1, mask=row_ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + k0 + 2, mask=row_ok, other=0.0).to(tl.float32)
        x3 = tl.load(x_row + k0 + 3, mask=row_ok, other=0.0).to(tl.float32)
        x4 = tl.load(x_row + k0 + 4, mask=row_ok, other=0.0).to(tl.float32)
        x5 = tl.load(x_row + k0 + 5, mask=row_ok, other=0.0).to(tl.float32)
        x6 = tl.load(x_row + k0 + 6, mask=row_ok, other=0.0).to(tl.float32)
        x7 = tl.load(x_row + k0 + 7, mask=row_ok, other=0.0).to(tl.float32)
        x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        offset = 2048.0 * ((x1 + x3) + (x5 + x7)) + 128.0 * ((x0 + x2) + (x4 + x6))
        if SYMMETRIC:
            offset += 8.0 * x_sum
        s12: tl.constexpr = 1.0 / 4096
        s16: tl.constexpr = 1.0 / 65536
        dot = (x0 * s16)[:, None] * _magic(words_d, 0xF0000) - offset[:, None]
        dot += (x1 * s12)[:, None] * _magic(words_b, 0xF000)
        dot += (x2 * s16)[:, None] * _magic(words_b, 0xF0000)
        dot += (x3 * s12)[:, None] * _magic(words_a, 0xF000)
        dot += (x4 * s16)[:, None] * _magic(words_a, 0xF0000)
        dot += (x5 * s12)[:, None] * _magic(words_c, 0xF000)
        dot += (x6 * s16)[:, None] * _magic(words_c, 0xF0000)
        dot += (x7 * s12)[:, None] * _magic(words_d, 0xF000)
        if SYMMETRIC:
            contrib = scale * dot
        else:
            contrib = scale * (dot - zero * x_sum[:, None])
    else:
        # Codes read in place (_codes_minus): symmetric weights subtract the zero point 8 inside the
        # conversion, so per code it is one lop3 and two FMAs and no sum of x is kept.
        high = packed >> 12
        for j in tl.static_range(8):
            xj = tl.load(x_row + k0 + j, mask=row_ok, other=0.0).to(tl.float32)
            if SYMMETRIC:
                dot += xj[:, None] * _codes_minus(packed, high, j, 8)
            else:
                dot += xj[:, None] * _codes_minus(packed, high, j, 0)
                x_sum += xj
        if SYMMETRIC:
            contrib = scale * dot
        else:
            contrib = scale * (dot - zero * x_sum[:, None])
    return contrib


@triton.jit
def _gemv_columns(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    offs_n,
    n_ok,
    a_rows,
    k_begin,
    k_end,
    size_n,
    stride_x,
    G: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UNPACK: tl.constexpr,
    PREFETCH: tl.constexpr,
    EVICT: tl.constexpr,
    qw_desc,
    desc_row0,
    col0,
    LOADER: tl.constexpr,
    STAGES: tl.constexpr,
    first_tile=None,
):
    """fp32 (BLOCK_M, BLOCK_N): rows ``a_rows`` of x times columns ``offs_n`` of one weight, over
    K in [k_begin, k_end). Pointers are already offset to the expert. ``first_tile``: the first weight tile,
    already loaded (:func:`_first_tile`, before the PDL wait), for the one-row ``PREFETCH`` path.

    Decode (BLOCK_M 1) weight loads, ``LOADER``: 0 = pointer loads in registers (``PREFETCH``: one tile
    ahead); 1 = pointer loads in a ``tl.range(num_stages=STAGES)`` loop (the pipeliner turns them into
    ``cp.async`` copies into shared memory, STAGES - 1 tiles ahead); 2 = the same loop over a tensor
    descriptor ``qw_desc`` (Hopper TMA: one thread issues a whole tile; tile (BLOCK_K // 8, BLOCK_N) at word
    row ``desc_row0 + k0 // 8``, column ``col0`` of the (experts x K // 8, N) matrix; rows past the end read
    as zeros).

    Per packed word (8 codes of one group and column): ``sum_j x_j f_j`` with ``f_j = 1 + q_j / 16``
    (:func:`_unit_codes`) and ``sum_j x_j``; then ``sum_j x_j (q_j - z) s = s (16 sum x f - (16 + z) sum x)``,
    so per code there is one shift, one and-or and one FMA, and the group's scale and zero point are applied
    once per word. In fp32 ``sum x f`` loses about 2 bits to the cancellation (well below bf16/fp16
    rounding; fp32 activations stay within ~1e-6)."""
    words = tl.arange(0, BLOCK_K // 8)
    qw_ptrs = qw_ptr + words[:, None] * size_n + offs_n[None, :]
    s_ptrs = s_ptr + offs_n[None, :]
    z_ptrs = z_ptr + offs_n[None, :]
    if BLOCK_M == 1:
        # Decode: plain 2-D tiles (the 3-D form below would cost layout shuffles for nothing).
        x_row = x_ptr + tl.sum(a_rows, axis=0) * stride_x + words * 8  # (BLOCK_K // 8,)
        acc2 = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        if LOADER == 0:
            if PREFETCH:
                if first_tile is None:
                    packed_next = _first_tile(qw_ptr, offs_n, n_ok, k_begin, k_end, size_n, BLOCK_K, EVICT)
                else:
                    packed_next = first_tile
            for k0 in range(k_begin, k_end, BLOCK_K):
                first_k = k0 + words * 8
                row_ok = first_k < k_end
                mask = row_ok[:, None] & n_ok[None, :]
                if PREFETCH:
                    # Registers double-buffer the weight stream: the next tile is in flight during this one's math.
                    packed = packed_next
                    next_mask = ((first_k + BLOCK_K) < k_end)[:, None] & n_ok[None, :]
                    packed_next = tl.load(qw_ptrs + ((k0 + BLOCK_K) // 8) * size_n, mask=next_mask, other=0,
                                          eviction_policy=EVICT)  # fmt: skip
                else:
                    packed = tl.load(qw_ptrs + (k0 // 8) * size_n, mask=mask, other=0, eviction_policy=EVICT)
                scale, zero = _group_params(s_ptrs, z_ptrs, first_k, size_n, mask, G, SYMMETRIC)
                acc2 += _decode_words(
                    packed, x_row, k0, row_ok, scale, zero, SYMMETRIC, BLOCK_N, BLOCK_K, UNPACK
                )
        else:
            for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
                first_k = k0 + words * 8
                row_ok = first_k < k_end
                mask = row_ok[:, None] & n_ok[None, :]
                if LOADER == 2:
                    packed = qw_desc.load([desc_row0 + k0 // 8, col0])
                else:
                    packed = tl.load(qw_ptrs + (k0 // 8) * size_n, mask=mask, other=0, eviction_policy=EVICT)
                scale, zero = _group_params(s_ptrs, z_ptrs, first_k, size_n, mask, G, SYMMETRIC)
                acc2 += _decode_words(packed, x_row, k0, row_ok, scale, zero, SYMMETRIC, BLOCK_N, BLOCK_K,
                                      UNPACK)  # fmt: skip
        out = tl.sum(acc2, axis=0)[None, :]  # (1, BLOCK_N)
    else:
        x_ptrs = x_ptr + a_rows[:, None] * stride_x + words[None, :] * 8  # (BLOCK_M, BLOCK_K // 8)
        acc = tl.zeros([BLOCK_M, BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            first_k = k0 + words * 8
            row_ok = first_k < k_end
            mask = row_ok[:, None] & n_ok[None, :]
            packed = tl.load(qw_ptrs + (k0 // 8) * size_n, mask=mask, other=0)  # (BLOCK_K // 8, BLOCK_N)
            dot_f = tl.zeros([BLOCK_M, BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
            x_sum = tl.zeros([BLOCK_M, BLOCK_K // 8], dtype=tl.float32)
            for j in tl.static_range(8):
                # rows past the end read row 0 (never stored)
                xj = tl.load(x_ptrs + k0 + j, mask=row_ok[None, :], other=0.0).to(tl.float32)
                dot_f += xj[:, :, None] * _unit_codes(packed, j)[None, :, :]
                x_sum += xj
            scale, zero = _group_params(s_ptrs, z_ptrs, first_k, size_n, mask, G, SYMMETRIC)
            acc += scale[None, :, :] * (16.0 * dot_f - (16.0 + zero[None, :, :]) * x_sum[:, :, None])
        out = tl.sum(acc, axis=1)  # (BLOCK_M, BLOCK_N)
    return out


@triton.jit
def _first_tile(qw_ptr, offs_n, n_ok, k_begin, k_end, size_n, BLOCK_K: tl.constexpr, EVICT: tl.constexpr):
    """The (BLOCK_K // 8, BLOCK_N) packed words of K rows [k_begin, k_begin + BLOCK_K) (zeros past k_end)."""
    words = tl.arange(0, BLOCK_K // 8)
    mask = ((k_begin + words * 8) < k_end)[:, None] & n_ok[None, :]
    ptrs = qw_ptr + (k_begin // 8 + words)[:, None] * size_n + offs_n[None, :]
    return tl.load(ptrs, mask=mask, other=0, eviction_policy=EVICT)


@triton.jit
def _slot_partial(part_ptr, ids_ptr, row, split, offs_n, mask, n_experts, stride_split, stride_row):
    """Split ``split``'s fp32 partial of (token, slot) row ``row`` at columns ``offs_n``; zeros for a non-local
    slot (expert id outside [0, n_experts)). ``.cg``: read from L2, where the other programs stored it."""
    expert = tl.load(ids_ptr + row)
    ok = mask & (expert >= 0) & (expert < n_experts)
    return tl.load(part_ptr + split * stride_split + row * stride_row + offs_n, mask=ok, other=0.0,
                   cache_modifier=".cg")  # fmt: skip


@triton.jit
def _gate_and_up(both, BLOCK_N: tl.constexpr):
    """(1, 2 BLOCK_N) gate columns then up columns -> the (1, BLOCK_N) gate and up halves."""
    gate, up = tl.split(tl.trans(tl.reshape(both, (2, BLOCK_N))))
    return gate[None, :], up[None, :]


@triton.jit
def _direct_layout(pid_m, ids_ptr, n_experts, top_k, MODE: tl.constexpr):
    """One-row blocks straight from the routing ids (no sorted layout): row block ``pid_m`` is (token, slot) row
    ``pid_m``; MODE 1 gathers token ``pid_m // top_k`` and writes row ``pid_m``, MODE 2 reads and writes row
    ``pid_m``. Returns (expert, input row, output row, valid (1,), local): a non-local slot (id outside
    [0, E)) reads expert 0 over an empty K range, so it still takes part in the arrival counts."""
    expert = tl.load(ids_ptr + pid_m, cache_modifier=".cg").to(tl.int64)  # .cg: also safe before a PDL wait
    local = (expert >= 0) & (expert < n_experts)
    rows = pid_m + tl.arange(0, 1)
    a_rows = rows // top_k if MODE == 1 else rows
    return tl.where(local, expert, 0), a_rows.to(tl.int64), rows.to(tl.int64), (rows >= 0) & local, local


@triton.jit
def _gemv_kernel(
    x_ptr,  # (rows, K) activations
    qw_ptr,  # ([E,] K // 8, N) int32
    s_ptr,  # ([E,] K // G, N)
    z_ptr,  # ([E,] K // G, N) or a dummy (SYMMETRIC)
    out_ptr,  # MODE 0: (rows, N) output; MODE 1: (max_rows, N // 2) SwiGLU output; MODE 2: (SPLIT, n_rows, N) fp32
    part_ptr,  # FUSED_SPLIT: (SPLIT, rows, N) fp32 partial sums of the K splits, else unused
    count_ptr,  # FUSED_SPLIT: int32 arrival counters, one per (row block, column tile), zero between calls
    routing_ptr,  # MODE 1: (n_rows,) routing weight of each (token, slot)
    sorted_rows_ptr,
    block_expert_ptr,
    qw_desc,  # LOADER 2: tensor descriptor of the ([E x] K // 8, N) words, tile (BLOCK_K // 8, BLOCK_N)
    m_rows,
    size_n,
    n_rows,
    top_k,
    n_groups,
    groups_per_split,
    split_k,
    n_experts,
    stride_x,
    stride_qe,
    stride_se,
    stride_split,
    stride_out,
    G: tl.constexpr,
    MODE: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    ROUTE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FUSED_SPLIT: tl.constexpr,
    UNPACK: tl.constexpr,
    PREFETCH: tl.constexpr,
    EVICT: tl.constexpr,
    PDL: tl.constexpr,
    LOADER: tl.constexpr,
    STAGES: tl.constexpr,
    SPLIT_MAX: tl.constexpr,
    DIRECT: tl.constexpr,
    FUSED_SUM: tl.constexpr,
    TOP_K: tl.constexpr,
    DUAL: tl.constexpr,
    EARLY_IDS: tl.constexpr,
    TAIL: tl.constexpr = False,
    full_tiles=0,
):
    """One launch per matmul. With K split over programs (FUSED_SPLIT), every program stores its fp32
    partial, and the last program to arrive at a (row block, column tile) — counted with an atomic — sums
    the partials in split order (deterministic) and runs the epilogue: the cast (MODE 0) or the routing
    weight + SwiGLU (MODE 1, where a program computes gate columns n and up columns N/2 + n together).
    MODE 2 stores the partials for :func:`_sum_rows_kernel`, which also sums the top-k slots — or, with
    ``FUSED_SUM`` (``DIRECT`` layouts), the last program to arrive at a column tile sums them itself.

    ``DIRECT`` (MoE, one-row blocks): the rows come straight from the routing ids (:func:`_direct_layout`,
    ``block_expert_ptr`` = the (n_rows,) ids, n_groups.. as usual), so no routing kernel runs before.

    ``TAIL`` (MODE 0, one-dimensional grid): programs below ``full_tiles`` take column tile ``pid`` over the whole
    of K and store it; the rest split the remaining tiles' K ``split_k`` ways (split-major, so programs of one
    split start side by side) through the partial sums above: the tiles one wave cannot hold are spread thin over
    the SMs instead of doubling the work of a few. On an H100 that pays at 5120x8192 only (bench/results/
    int4_gemv_h100.md, session 14)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_cols = size_n // 2 if MODE == 1 else size_n  # MODE 1: program columns index the SwiGLU output
    if TAIL:
        tail_pid = tl.maximum(pid_n - full_tiles, 0)
        whole = pid_n < full_tiles
        n_tail = tl.cdiv(n_cols, BLOCK_N) - full_tiles
        pid_k = tl.where(whole, 0, tail_pid // n_tail)
        pid_n = tl.where(whole, pid_n, full_tiles + tail_pid % n_tail)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_cols
    k_begin = pid_k * groups_per_split * G
    k_end = tl.minimum(k_begin + groups_per_split * G, n_groups * G)
    if TAIL:
        k_end = tl.where(whole, n_groups * G, k_end)
    # PDL (scout_mm.kernels.launch): 1 = let the next kernel launch, then wait for the previous one; 2 = wait,
    # then trigger (the shipped form, one kernel ahead). Before the wait only constant weights are read: a
    # dense matmul's first weight tile streams in during the previous kernel's tail. An MoE matmul's expert
    # comes from the routing ids, an activation, so the gate_up launch loads nothing early; EARLY_IDS (the down
    # launch, DIRECT): its ids were written before the gate_up launch ahead of it, which passed its own wait (on
    # the kernel that wrote them, or on one that waited for it) before it let this launch start, so they are
    # final here: read them (from L2) and the expert's first tile before the wait.
    first = None
    qw_first = qw_ptr  # the weight whose first tile may stream in before the wait
    if DIRECT and EARLY_IDS:
        expert, a_rows, out_rows, valid, local = _direct_layout(
            pid_m, block_expert_ptr, n_experts, top_k, MODE
        )
        k_end = tl.where(local, k_end, k_begin)
        qw_first = qw_ptr + expert * stride_qe
    if PDL == 2 and (MODE == 0 or EARLY_IDS) and BLOCK_M == 1 and LOADER == 0 and PREFETCH:
        first = _first_tile(qw_first, offs_n, n_ok, k_begin, k_end, size_n, BLOCK_K, EVICT)
    if PDL == 1:
        gdc_launch_dependents()
        gdc_wait()
    if PDL == 2:
        gdc_wait()
        gdc_launch_dependents()
    if DIRECT and not EARLY_IDS:
        expert, a_rows, out_rows, valid, local = _direct_layout(
            pid_m, block_expert_ptr, n_experts, top_k, MODE
        )
        k_end = tl.where(local, k_end, k_begin)
    elif not DIRECT:
        expert, a_rows, out_rows, valid = _row_layout(
            pid_m, m_rows, sorted_rows_ptr, block_expert_ptr, n_rows, top_k, MODE, BLOCK_M, ROUTE_BLOCK
        )
        if expert < 0:
            return
    qw = qw_ptr + expert * stride_qe
    sp = s_ptr + expert * stride_se
    zp = z_ptr + expert * stride_se
    desc_row0 = (expert * (n_groups * G // 8)).to(tl.int32)  # this expert's first word row (LOADER 2)
    if DUAL:
        # MODE 1, one row: the gate columns and their up columns as ONE tile of 2 BLOCK_N columns (gate, then up),
        # so one loop streams both (one pipeline, each x row loaded and converted once for both).
        both = tl.arange(0, 2 * BLOCK_N)
        gate_cols = pid_n * BLOCK_N + both % BLOCK_N
        p_cols = gate_cols + (both // BLOCK_N) * n_cols
        p_ok = gate_cols < n_cols
    else:
        p_cols = offs_n
        p_ok = n_ok
    out = _gemv_columns(x_ptr, qw, sp, zp, p_cols, p_ok, a_rows, k_begin, k_end, size_n, stride_x,
                        G, SYMMETRIC, BLOCK_M, BLOCK_N * (1 + DUAL), BLOCK_K, UNPACK, PREFETCH, EVICT,
                        qw_desc, desc_row0, pid_n * BLOCK_N, LOADER, STAGES, first)  # fmt: skip
    if MODE == 1 and not DUAL:
        up = _gemv_columns(x_ptr, qw, sp, zp, offs_n + n_cols, n_ok, a_rows, k_begin, k_end, size_n, stride_x,
                           G, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K, UNPACK, PREFETCH, EVICT,
                           qw_desc, desc_row0, pid_n * BLOCK_N + n_cols, LOADER, STAGES)  # fmt: skip
    elif DUAL:
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # (in ``out``)
    else:
        up = out
    if MODE == 2:
        o_ptrs = out_ptr + pid_k * stride_split + out_rows[:, None] * stride_out + offs_n[None, :]
        tl.store(o_ptrs, out, mask=valid[:, None] & n_ok[None, :])
        if FUSED_SUM:
            # part_ptr is the (tokens, N) output here. Every (row, split) program of this column tile arrives;
            # the last sums the slots like _sum_rows_kernel (same order: splits, then slots; bit-identical).
            tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
            counter = count_ptr + pid_n
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == tl.num_programs(1) * split_k - 1:
                for token in range(n_rows // TOP_K):
                    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                    if SPLIT_MAX > 0:
                        # unrolled (masked past split_k): every partial's load in flight at once, same order
                        for split in tl.static_range(SPLIT_MAX):
                            for slot in tl.static_range(TOP_K):
                                acc += _slot_partial(out_ptr, block_expert_ptr, token * TOP_K + slot, split, offs_n,
                                                     n_ok & (split < split_k), n_experts, stride_split, stride_out)  # fmt: skip
                    else:
                        for split in range(split_k):
                            for slot in tl.static_range(TOP_K):
                                acc += _slot_partial(out_ptr, block_expert_ptr, token * TOP_K + slot, split, offs_n,
                                                     n_ok, n_experts, stride_split, stride_out)  # fmt: skip
                    tl.store(part_ptr + token * size_n + offs_n, acc.to(part_ptr.dtype.element_ty), mask=n_ok)
                tl.atomic_xchg(counter, 0)  # ready for the next call (and the next replay of a CUDA graph)
        return
    if TAIL:
        if whole:  # a whole tile: no partial sums
            o_ptrs = out_ptr + out_rows[:, None] * stride_out + offs_n[None, :]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])
            return
    rows_local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # row of this launch's row space
    last = True
    if FUSED_SPLIT:
        p_ptrs = part_ptr + rows_local[:, None] * size_n + p_cols[None, :]
        tl.store(p_ptrs + pid_k * stride_split, out, mask=p_ok[None, :])
        if MODE == 1 and not DUAL:
            tl.store(p_ptrs + pid_k * stride_split + n_cols, up, mask=n_ok[None, :])
        tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
        counter = count_ptr + pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        last = arrived == split_k - 1
        if last:
            out = tl.zeros_like(out)
            up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if SPLIT_MAX > 0:
                # unrolled (masked past split_k): every partial's load in flight at once, summed in split order
                for split in tl.static_range(SPLIT_MAX):
                    out += tl.load(p_ptrs + split * stride_split, mask=p_ok[None, :] & (split < split_k), other=0.0,
                                   cache_modifier=".cg")  # fmt: skip
                    if MODE == 1 and not DUAL:
                        in_split = n_ok[None, :] & (split < split_k)
                        up += tl.load(p_ptrs + split * stride_split + n_cols, mask=in_split, other=0.0,
                                      cache_modifier=".cg")  # fmt: skip
            else:
                for split in range(split_k):  # fixed order: the result does not depend on arrival order
                    # .cg: read from L2, where the other programs' stores are (never a stale L1 line)
                    out += tl.load(p_ptrs + split * stride_split, mask=p_ok[None, :], other=0.0,
                                   cache_modifier=".cg")  # fmt: skip
                    if MODE == 1 and not DUAL:
                        up += tl.load(p_ptrs + split * stride_split + n_cols, mask=n_ok[None, :], other=0.0,
                                      cache_modifier=".cg")  # fmt: skip
            tl.atomic_xchg(counter, 0)  # ready for the next call (and the next replay of a CUDA graph)
    if last:
        if MODE == 0:
            o_ptrs = out_ptr + out_rows[:, None] * stride_out + offs_n[None, :]
            tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])
        else:
            if DUAL:
                gate_sum, up_sum = _gate_and_up(out, BLOCK_N)
            else:
                gate_sum, up_sum = out, up
            # Routing weight on the expert INPUT: (w x) @ W = w (x @ W), exact as a scale of the fp32 sums.
            if DIRECT:
                flat = rows_local
            else:
                flat = tl.load(sorted_rows_ptr + rows_local)
            weight = tl.load(routing_ptr + flat, mask=valid, other=0.0).to(tl.float32)[:, None]
            gate = gate_sum * weight
            h = gate * tl.sigmoid(gate) * (up_sum * weight)  # zero on padding rows (weight 0)
            o_ptrs = out_ptr + rows_local[:, None] * stride_out + offs_n[None, :]
            tl.store(o_ptrs, h.to(out_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _gemm_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    sorted_rows_ptr,
    block_expert_ptr,
    m_rows,
    size_n,
    n_rows,
    top_k,
    n_groups,
    groups_per_split,
    num_row_blocks,
    stride_x,
    stride_qe,
    stride_se,
    stride_split,
    stride_out,
    G: tl.constexpr,
    MODE: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    ROUTE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NIBBLE_DOTS: tl.constexpr,
):
    pid_m, pid_n = _tile(tl.program_id(0), num_row_blocks, tl.cdiv(size_n, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    expert, a_rows, out_rows, valid = _row_layout(
        pid_m, m_rows, sorted_rows_ptr, block_expert_ptr, n_rows, top_k, MODE, BLOCK_M, ROUTE_BLOCK
    )
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < size_n
    k_begin = pid_k * groups_per_split * G
    k_end = tl.minimum(k_begin + groups_per_split * G, n_groups * G)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if NIBBLE_DOTS:
        # Few rows: each packed word is read once. Nibble j of the tile's words holds rows k0 + 8r + j, so one
        # (BLOCK_K / 8)-deep dot per nibble, against activation columns k0 + 8r + j, covers the tile. Any
        # BLOCK_K (>= 128) and group size: scales are looked up per word row.
        words = tl.arange(0, BLOCK_K // 8)
        qw_ptrs = qw_ptr + expert * stride_qe + words[:, None] * size_n + offs_n[None, :]
        s_ptrs = s_ptr + expert * stride_se + offs_n[None, :]
        z_ptrs = z_ptr + expert * stride_se + offs_n[None, :]
        x_ptrs = x_ptr + a_rows[:, None] * stride_x + words[None, :] * 8  # (BLOCK_M, BLOCK_K // 8)
        for k0 in range(k_begin, k_end, BLOCK_K):
            first_k = k0 + words * 8
            row_ok = first_k < k_end
            mask = row_ok[:, None] & n_ok[None, :]
            packed = tl.load(qw_ptrs + (k0 // 8) * size_n, mask=mask, other=0)  # (BLOCK_K // 8, BLOCK_N)
            scale, zero = _group_params(s_ptrs, z_ptrs, first_k, size_n, mask, G, SYMMETRIC)
            # (q - z) s = f (16 s) - (16 + z) s with f = 1 + q / 16: one FMA per code, and exact in fp32
            # (f has 5 significant bits, s 8 or 11, 16 + z <= 31), so the one rounding to the activation
            # dtype below matches the reference.
            scale16 = 16.0 * scale
            offset = (16.0 + zero) * scale
            for j in tl.static_range(8):
                a = tl.load(x_ptrs + k0 + j, mask=valid[:, None] & row_ok[None, :], other=0.0)
                w = _unit_codes(packed, j) * scale16 - offset
                acc = tl.dot(a, w.to(x_ptr.dtype.element_ty), acc)
    else:
        # Many rows: dequantise a whole (BLOCK_K, BLOCK_N) tile (each word is loaded by the 8 rows of its
        # nibbles, from cache) and run one dot over contiguous activations. BLOCK_K divides G.
        offs_k = tl.arange(0, BLOCK_K)
        shifts = (offs_k % 8) * 4
        a_ptrs = x_ptr + a_rows[:, None] * stride_x + (k_begin + offs_k)[None, :]
        w_ptrs = qw_ptr + expert * stride_qe + ((k_begin + offs_k) // 8)[:, None] * size_n + offs_n[None, :]
        s_ptrs = s_ptr + expert * stride_se + offs_n
        z_ptrs = z_ptr + expert * stride_se + offs_n
        for k0 in range(k_begin, k_end, BLOCK_K):
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            code = (
                tl.load(w_ptrs, mask=n_ok[None, :], other=0) >> shifts[:, None]
            ) & 0xF  # (BLOCK_K, BLOCK_N)
            group = k0 // G
            scale = tl.load(s_ptrs + group * size_n, mask=n_ok, other=0.0).to(tl.float32)
            if SYMMETRIC:
                w = (code - 8).to(tl.float32) * scale[None, :]
            else:
                zero = tl.load(z_ptrs + group * size_n, mask=n_ok, other=0.0).to(tl.float32)
                w = (code.to(tl.float32) - zero[None, :]) * scale[None, :]
            acc = tl.dot(a, w.to(x_ptr.dtype.element_ty), acc)
            a_ptrs += BLOCK_K
            w_ptrs += (BLOCK_K // 8) * size_n
    o_ptrs = out_ptr + pid_k * stride_split + out_rows[:, None] * stride_out + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _sum_rows_kernel(
    partial_ptr,  # (split_k, n_out * TOP_K, N)
    ids_ptr,  # (n_out * TOP_K,) expert of each slot (HAS_IDS), rows of non-local slots were never written
    out_ptr,  # (n_out, N)
    size_n,
    split_k,
    stride_split,
    n_experts,
    TOP_K: tl.constexpr,
    HAS_IDS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait_and_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size_n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(split_k):
        for slot in tl.static_range(TOP_K):
            mask = ok
            if HAS_IDS:
                expert = tl.load(ids_ptr + row * TOP_K + slot)
                mask = ok & (expert >= 0) & (expert < n_experts)
            p_ptrs = partial_ptr + split * stride_split + (row * TOP_K + slot) * size_n + offs
            acc += tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * size_n + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_kernel(
    partial_ptr,  # (split_k, max_rows, 2 * inter) gate_up pre-activations (sorted rows)
    routing_ptr,  # (n_rows,) routing weight of each (token, slot)
    sorted_rows_ptr,
    h_ptr,  # (max_rows, inter) out: silu(w * gate) * (w * up), zero on padding rows
    n_rows,
    inter_size,
    split_k,
    stride_split,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter_size
    flat = tl.load(sorted_rows_ptr + row)
    valid = flat < n_rows
    mask = ok & valid  # padding rows were never written
    gate = tl.zeros([BLOCK], dtype=tl.float32)
    up = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(split_k):
        p_ptrs = partial_ptr + split * stride_split + row * 2 * inter_size + offs
        gate += tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
        up += tl.load(p_ptrs + inter_size, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(routing_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    gate = gate * weight
    up = up * weight
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + row * inter_size + offs, h.to(h_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_kernel(
    qw_ptr,  # (E, K // 8, N)
    s_ptr,
    z_ptr,
    out_ptr,  # (E, K, N)
    size_k,
    size_n,
    G: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.program_id(2).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < size_k)[:, None] & (offs_n < size_n)[None, :]
    packed = tl.load(qw_ptr + expert * (size_k // 8) * size_n + (offs_k // 8)[:, None] * size_n + offs_n[None, :],
                     mask=mask, other=0)  # fmt: skip
    code = (packed >> ((offs_k % 8) * 4)[:, None]) & 0xF
    g_ptrs = expert * (size_k // G) * size_n + (offs_k // G)[:, None] * size_n + offs_n[None, :]
    scale = tl.load(s_ptr + g_ptrs, mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        w = (code - 8).to(tl.float32) * scale
    else:
        w = (code.to(tl.float32) - tl.load(z_ptr + g_ptrs, mask=mask, other=0.0).to(tl.float32)) * scale
    o_ptrs = out_ptr + expert * size_k * size_n + offs_k[:, None].to(tl.int64) * size_n + offs_n[None, :]
    tl.store(o_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def _gemv(
    block_n,
    block_k,
    warps,
    stages,
    occupancy,
    unpack=1,
    prefetch=False,
    evict="",
    pdl=False,
    loader=0,
    reduce_unrolled=False,
    split_cap=False,
    rows_per_program=4,
    resident_per_sm=0,
    split_overhead=2.0,
):
    """occupancy: programs per SM the K split aims for; unpack: 0 = codes as 1 + q/16 (shift + lop3 + FMA,
    sum of x per word), 1 = codes read in place (lop3 + 2 FMAs, :func:`_codes_minus`); prefetch: the next
    weight tile is loaded before this one's math (register double buffer); evict: eviction policy of the
    weight loads ("" or "evict_first"); pdl: programmatic dependent launch (Hopper; 1 = dependents triggered
    before the wait, 2 = after it, see :func:`_gemv_kernel`); reduce_unrolled: the split-K
    epilogue loads every partial at once (unrolled to the next power of two of split_k); loader (one-row
    programs): 0 = register loads, 1 = ``cp.async`` pipeline, 2 = TMA pipeline, both ``stages`` deep
    (:func:`_gemv_columns`; 2 falls back to 1 where the weight does not fit a tensor descriptor); split_cap:
    occupancy is a ceiling on programs per SM (the most K splits under it) instead of a floor;
    rows_per_program: the most rows one program takes (dense rows, or MoE rows of one expert): 1 = the one-row
    tiles (shipped), more = the 3-D multi-row form, which reads each weight tile once for its rows but measured
    4.6-6.5x slower at 2 rows on an H100 (bench/results/int4_gemv_h100.md, session 5); resident_per_sm > 0: the
    K split is the one of least estimated finish time with this many programs resident per SM, each costing
    ``split_overhead`` groups on top of its own (:func:`_least_makespan_split`; occupancy and split_cap unused).
    Per-shape keys (``TUNED["gemv_by_shape"]``): ``split_k`` a fixed number of K splits; ``tail_split`` (one dense
    row): ``tail_full_per_sm`` (default 1) whole column tiles a SM, the tiles past them K-split that many ways
    (``TAIL`` in :func:`_gemv_kernel`)."""
    return {"kind": "gemv", "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages,
            "occupancy": occupancy, "unpack": unpack, "prefetch": prefetch, "evict": evict, "pdl": pdl,
            "loader": loader, "reduce_unrolled": reduce_unrolled, "split_cap": split_cap,
            "rows_per_program": rows_per_program, "resident_per_sm": resident_per_sm,
            "split_overhead": split_overhead}  # fmt: skip


def _gemm(block_m, block_n, block_k, warps, stages, occupancy=0, group_m=8, nibble_dots=False):
    """occupancy 0 = no K split; nibble_dots: the few-rows variant of the kernel (BLOCK_K >= 128)."""
    return {"kind": "gemm", "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps,
            "num_stages": stages, "occupancy": occupancy, "GROUP_M": group_m, "nibble_dots": nibble_dots}  # fmt: skip


# Picked by rows (dense: M; MoE: rows per touched expert). ``bench/bench_int4.py --sections tune`` sweeps
# candidates on the GPU and prints every timing; the winners of the H100 sweeps of 2026-11-23 and (GEMV,
# nibble-dot after the 1 + q/16 unpack) 2026-11-24 (bench/results/int4_h100.md) are copied here by hand. GEMV_MAX_ROWS: up to this many rows the FMA kernel
# runs. DEQUANT_MIN_ROWS: from this many rows on, dequantise once + cuBLAS (2.4-2.5x the tl.dot kernel at
# M=4096; the switch point is an estimate from the dequantise cost, ~70 us for 16384x5120, not measured).
# MoE: dequantise all experts + the bf16 fused MoE from this many rows per expert (measured faster at 256
# rows/expert, slower at 32).
TUNED = {
    # 2026-11-24 sweep #2 (bench/results/int4_gemv_h100.md): best sum over the two Scout shapes, 22.7 + 13.3 us;
    # sweep #4 (same file): the unrolled split-K epilogue, 22.4 + 13.2 us vs 23.2 + 13.6 us without it
    # sweep #5: K splits capped at 4.25 programs per SM (2 splits of 16384x5120 instead of 3; 7 of 5120x8192)
    # session 6 (`--sections grid`): the split of least estimated finish time with 4 programs resident per SM (the
    # kernel has 127-128 registers a thread, 4 warps: 4 programs fill an SM's 64K registers); same splits as the
    # 4.25 ceiling at gate_up / down, and q|k|v 7168x5120 13.3 -> 11.7 us, o 5120x5120 10.8 -> 10.2-10.4 us
    "gemv": _gemv(
        64,
        256,
        4,
        1,
        4.25,
        unpack=2,
        prefetch=True,
        evict="evict_first",
        reduce_unrolled=True,
        split_cap=True,
        rows_per_program=1,
        resident_per_sm=4,
    ),  # fmt: skip
    # One-row dense GEMVs at the Scout decode shapes, (N, K) -> overrides of "gemv" above ("split_k": a fixed
    # number of K splits). Session 7 sweep (bench/results/int4_gemv_h100.md, `--sections shapes`): 8-warp
    # programs of 16 packed words a thread and NO K split (no partial sums, no last-arrival epilogue), with the
    # column tile that gives one wave of at most 2 programs per SM, against the shipped rule: q|k|v 7168x5120
    # 11.5 -> 9.3 us, o 5120x5120 10.4 -> 9.3 us, gate_up-sized 16384x5120 20.0 -> 17.1 us. Not at 5120x8192
    # (the same tile measured 13.6 us against 11.9), nor in the MoE (within 3%): those keep the rule. Other
    # shapes keep the rule too.
    # Session 14 (`--sections tailsplit`): at 5120x8192 the same 32x1024 / 8-warp tiles, one whole tile a SM and
    # the 28 tiles past that wave K-split 4 ways (``tail_split``): 12.0 -> 11.3-11.4 us. At the other three shapes
    # every tail split was 0.56-1.00x the entries here.
    "gemv_by_shape": {
        (7168, 5120): {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 8, "split_k": 1},
        (5120, 5120): {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 8, "split_k": 1},
        (16384, 5120): {"BLOCK_N": 64, "BLOCK_K": 512, "num_warps": 8, "split_k": 1},
        (5120, 8192): {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 8, "split_k": 1, "tail_split": 4},
    },
    # The decode MoE's one-row launches (DirectRoute: a few tokens, one program row per (token, slot)): (N, K of
    # the expert weight, rows = tokens x slots) -> overrides of "gemv", for gate_up (N = 2 I) and down separately.
    # Session 8 sweep (`bench_int4.py --sections moeshapes`, bench/results/int4_gemv_h100.md), Scout's experts at
    # T=1: one slot (top-1) and two (top-1 + the folded shared expert). gate_up: no K split, gate and up streamed
    # as one tile (16 packed words a thread), 21.9 -> 18.3 us at 1 slot and 38.0 -> 33.4 us at 2. Whole MoE: 34.9 ->
    # 31.4 us (2.00 TB/s) at 1 slot; Scout decode step 5.55 -> 5.46 ms. Other shapes keep the rule. Session 8 also
    # recorded down at 2 slots (6 splits of 32-wide tiles, 23.1 -> 22.0 us alone); session 13 dropped it: inside
    # the decode step the rule is 0.8-1.5% faster (`--sections instep`, `--sections downtable`,
    # bench/results/int4_decode_step_h100.md).
    "moe_gemv_by_shape": {
        (16384, 5120, 1): {"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 8, "split_k": 1},
        (16384, 5120, 2): {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 8, "split_k": 1},
    },
    "gemm_small": _gemm(16, 256, 128, 8, 3, occupancy=4, nibble_dots=True),  # rows <= 16; 44.1 + 31.3 us
    "gemm_medium": _gemm(64, 64, 128, 4, 4, occupancy=2),  # rows <= 128
    "gemm_large": _gemm(128, 256, 64, 8, 3),
    "GEMV_MAX_ROWS": 2,
    # MoE: the GEMV (one-row programs) up to this many rows per touched expert, the nibble-dot kernel above
    # (2026-11-24 session 5, `--sections rows`: 32 tokens top-1, 2 rows per expert: 632 us nibble-dot vs 749 us
    # one-row GEMV; 1 row per expert, decode: the GEMV, 34.9 us at T=1)
    "MOE_GEMV_MAX_ROWS_PER_EXPERT": 1.5,
    "DEQUANT_MIN_ROWS": 256,
    "MOE_DEQUANT_MIN_ROWS_PER_EXPERT": 256,
}

INTERPRET = {
    "gemv": _gemv(16, 64, 4, 1, 4, unpack=2, prefetch=True, reduce_unrolled=True),
    "gemm_small": _gemm(16, 16, 128, 4, 1, occupancy=2, nibble_dots=True),
    "gemm_medium": _gemm(16, 32, 32, 4, 1, occupancy=1),
    "gemm_large": _gemm(32, 32, 32, 4, 1),
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _n_sms(device: torch.device) -> int:
    return 4 if device.type != "cuda" else _sm_count(device.index or 0)


def _by_shape(cfg: dict, table_name: str, key) -> dict:
    """``cfg`` with the overrides recorded under ``key`` in the per-shape table ``table_name`` of the active
    tuning table (``TUNED``, or ``INTERPRET`` under the interpreter); ``cfg`` itself where none is recorded."""
    over = (INTERPRET if _interpreting() else TUNED).get(table_name, {}).get(key)
    return dict(cfg, **over) if over else cfg


def moe_gemv_config(cfg: dict, weight: torch.Tensor, n_rows: int) -> dict:
    """``cfg`` (the decode MoE's GEMV config) with the overrides recorded for this expert weight's (N, K) at
    ``n_rows`` one-row programs (``TUNED["moe_gemv_by_shape"]``), if any."""
    return _by_shape(cfg, "moe_gemv_by_shape", (weight.shape[-1], weight.shape[-2] * 8, n_rows))


def pick_config(rows: float, moe: bool = False, shape: tuple[int, int] | None = None) -> dict:
    """The config for a matmul of ``rows`` rows (dense M, or with ``moe`` rows per touched expert); ``shape``:
    the (N, K) of a dense weight, for the one-row GEMVs recorded per shape (``TUNED["gemv_by_shape"]``)."""
    table = INTERPRET if _interpreting() else TUNED
    if rows <= TUNED["MOE_GEMV_MAX_ROWS_PER_EXPERT" if moe else "GEMV_MAX_ROWS"]:
        return _by_shape(table["gemv"], "gemv_by_shape", shape) if rows == 1 and not moe else table["gemv"]
    if rows <= 16:
        return table["gemm_small"]
    if rows <= 128:
        return table["gemm_medium"]
    return table["gemm_large"]


@functools.lru_cache(maxsize=256)
def _least_makespan_split(
    n_groups: int, tiles: int, step: int, slots: int, overhead: float
) -> tuple[int, int]:
    """(split_k, groups per split) whose launch is estimated to finish first. Model: the ``tiles * split_k``
    programs start in launch order (column tiles fastest, then K splits) on ``slots`` resident program slots, each
    as soon as a slot frees (list scheduling), and a program takes ``overhead`` + its number of groups (time in
    units of one group's stream per program). Ties go to fewer programs. On an H100 this picks the measured best
    program count at all six Scout decode shapes (``bench_int4.py --sections grid``), where a fixed ceiling on
    programs per SM lost 6-12% at q|k|v and o: one more split put a whole second wave behind the first."""
    best = None
    seen = set()
    for want in range(1, triton.cdiv(n_groups, step) + 1):
        per_split = triton.cdiv(triton.cdiv(n_groups, want), step) * step
        split = triton.cdiv(n_groups, per_split)
        if split in seen or tiles * split > 4 * slots:  # four waves or more never win
            continue
        seen.add(split)
        free = [0.0] * min(slots, tiles * split)
        heapq.heapify(free)
        end = 0.0
        for k in range(split):
            cost = overhead + min(per_split, n_groups - k * per_split)
            for _ in range(tiles):
                finish = heapq.heappop(free) + cost
                end = max(end, finish)
                heapq.heappush(free, finish)
        key = (end, tiles * split)
        if best is None or key < best[0]:
            best = (key, split, per_split)
    if best is None:  # even one split is over four waves: no K split
        return 1, triton.cdiv(n_groups, step) * step
    return best[1], best[2]


def _split(
    n_groups: int,
    tiles: int,
    occupancy: float,
    block_k: int,
    group_size: int,
    device,
    cap: bool = False,
    slots: int = 0,
    overhead: float = 2.0,
    fixed: int = 0,
) -> tuple[int, int]:
    """(split_k, groups per split); each split is whole K tiles. ``fixed`` > 0: at most that many splits (fewer
    when K has fewer tiles, or when whole tiles leave a split empty); else ``slots`` > 0: the split of least
    estimated finish time on that many resident programs (:func:`_least_makespan_split`); else enough programs for
    ``occupancy`` per SM (``cap``: the most splits that keep the programs at or under ``occupancy`` per SM)."""
    step = max(1, block_k // group_size)  # groups per K tile
    if fixed > 0:
        want = fixed
    elif slots > 0:
        return _least_makespan_split(n_groups, max(tiles, 1), step, slots, overhead)
    elif not occupancy:
        return 1, triton.cdiv(n_groups, step) * step
    elif cap:
        want = max(1, min(n_groups, int(occupancy * _n_sms(device)) // max(tiles, 1)))
    else:
        want = max(1, min(n_groups, triton.cdiv(int(occupancy * _n_sms(device)), max(tiles, 1))))
    per_split = triton.cdiv(triton.cdiv(n_groups, want), step) * step
    return triton.cdiv(n_groups, per_split), per_split


def _gemv_split(cfg: dict, n_groups: int, tiles: int, group_size: int, device) -> tuple[int, int]:
    """:func:`_split` with a GEMV config's keys: ``split_k`` (fixed), else ``resident_per_sm`` (least makespan),
    else ``occupancy`` / ``split_cap``."""
    slots = int(cfg.get("resident_per_sm", 0) * _n_sms(device))
    return _split(n_groups, tiles, cfg["occupancy"], cfg["BLOCK_K"], group_size, device, cfg.get("split_cap", False),
                  slots, cfg.get("split_overhead", 2.0), cfg.get("split_k", 0) or 0)  # fmt: skip


def _launch_opts(cfg: dict) -> dict:
    if _interpreting():
        return {}
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if cfg.get("pdl"):
        opts["launch_pdl"] = True
    return opts


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _check_weight(qweight, scales, zeros, group_size, expert_dims: int):
    if qweight.dtype != torch.int32:
        raise ValueError(f"qweight dtype {qweight.dtype}; expected torch.int32 (8 codes per word)")
    if qweight.dim() != 2 + expert_dims:
        raise ValueError(f"qweight shape {tuple(qweight.shape)}; expected {2 + expert_dims} dims")
    size_k, size_n = qweight.shape[-2] * 8, qweight.shape[-1]
    if group_size % 8 or size_k % group_size:
        raise ValueError(f"group size {group_size} must be a multiple of 8 dividing K={size_k}")
    expected = (*qweight.shape[:-2], size_k // group_size, size_n)
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"scales shape {tuple(scales.shape)}; expected {expected} for group size {group_size}"
        )
    if zeros is not None and tuple(zeros.shape) != expected:
        raise ValueError(f"zeros shape {tuple(zeros.shape)}; expected {expected}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    return size_k, size_n


def _tma_fits(qweight: torch.Tensor, block_k: int, block_n: int) -> bool:
    """Whether the copy engine can read ``qweight`` in (block_k // 8, block_n) tiles: sm_90+ (or the
    interpreter), 16-byte aligned base and rows (N % 4 == 0), tile sides <= 256 words."""
    if not _interpreting() and not (
        qweight.is_cuda and torch.cuda.get_device_capability(qweight.device)[0] >= 9
    ):
        return False
    return (
        qweight.data_ptr() % 16 == 0 and qweight.shape[-1] % 4 == 0 and block_k // 8 <= 256 and block_n <= 256
    )


class DirectRoute:
    """The row layout of a few-token Int4 MoE call on the GEMV path with one-row blocks: row ``r`` is (token,
    slot) ``r`` of the routing ids, in place — no sorted layout, so no routing kernel (``DIRECT`` in
    :func:`_gemv_kernel`). Same attributes as :class:`scout_mm.kernels.moe.Routing` where the launcher reads them."""

    route_block = 1

    def __init__(self, topk_ids: torch.Tensor, n_experts: int):
        tokens, self.top_k = topk_ids.shape
        self.n_rows = self.max_rows = tokens * self.top_k
        self.n_experts = n_experts
        self.ids = self.sorted_rows = self.block_expert = topk_ids.reshape(-1)


# The decode MoE's down launch under PDL (after a form-2 gate_up launch) reads its routing ids and its expert's first
# weight tile before its wait (see _gemv_kernel). False: after the wait, like the gate_up launch (bench A/B).
EARLY_DOWN_IDS = True

# Few-token MoE on the GEMV path: route with DirectRoute (no routing kernel) and sum the slots inside the down
# launch (no _sum_rows launch) wherever the blocks are one row. False: Routing + _sum_rows (bench A/B).
DIRECT_DECODE_MOE = True


def _route_args(route, m_rows, dummy):
    if route is None:
        return 1, dummy, dummy, m_rows, 1
    return route.route_block, route.sorted_rows, route.block_expert, route.n_rows, route.top_k


def _pdl_form(cfg: dict, device: torch.device) -> int:
    """PDL form of a GEMV launch: a config's own "pdl" (benchmarks), else the decode-step switch
    (scout_mm.kernels.launch): form 2."""
    return 0 if _interpreting() else int(cfg.get("pdl", 0)) or (2 if pdl_enabled(device) else 0)


def _launch_gemv(x, weight, group_size, mode, m_rows, route, cfg, routing_weights=None, early_ids=False):
    """Launch :func:`_gemv_kernel` (one launch). Returns MODE 0: the (m_rows, N) output; MODE 1: the
    (max_rows, N // 2) SwiGLU output; MODE 2: (split_k, n_rows, N) fp32 partials for :func:`_sum_rows`.
    ``early_ids``: the caller vouches that the routing ids were final before the launch ahead of this one passed
    its PDL wait (the MoE down launch after a form-2 gate_up launch): read them before this launch's wait."""
    qweight, scales, zeros = weight
    size_n = qweight.shape[-1]
    n_cols = size_n // 2 if mode == 1 else size_n
    n_groups = scales.shape[-2]
    device = x.device
    route_block, sorted_rows, block_expert, n_rows, top_k = _route_args(route, m_rows, qweight)
    rows_per_program = cfg.get("rows_per_program", 4)
    block_m = route_block if route is not None else min(rows_per_program, triton.next_power_of_2(m_rows))
    row_space = m_rows if route is None else route.max_rows
    num_row_blocks = triton.cdiv(row_space, block_m)
    block_n = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(n_cols)))
    n_tiles = triton.cdiv(n_cols, block_n)
    block_k = cfg["BLOCK_K"]
    split_k, per_split = _gemv_split(cfg, n_groups, num_row_blocks * n_tiles, group_size, device)
    grid = (n_tiles, num_row_blocks, split_k)
    full_tiles = 0
    if cfg.get("tail_split", 0) > 1 and mode == 0 and route is None and block_m == 1 and num_row_blocks == 1:
        # one whole column tile per program up to tail_full_per_sm a SM, the rest K-split (TAIL in the kernel)
        full = min(n_tiles, int(cfg.get("tail_full_per_sm", 1) * _n_sms(device)))
        tail_split, tail_per_split = _split(
            n_groups, 0, 0, block_k, group_size, device, fixed=cfg["tail_split"]
        )
        if 0 < full < n_tiles and tail_split > 1:
            full_tiles, split_k, per_split = full, tail_split, tail_per_split
            grid = (full + (n_tiles - full) * split_k, 1, 1)
    fused = split_k > 1 and mode != 2
    direct = isinstance(route, DirectRoute)
    fused_sum = direct and mode == 2
    if mode == 0:
        out = torch.empty(m_rows, size_n, dtype=x.dtype, device=device)
    elif mode == 1:
        out = torch.empty(row_space, n_cols, dtype=x.dtype, device=device)
    else:
        out = torch.empty(split_k, n_rows, size_n, dtype=torch.float32, device=device)
    if fused:
        part = torch.empty(split_k, num_row_blocks * block_m, size_n, dtype=torch.float32, device=device)
        counters = arrival_counters(device, num_row_blocks * grid[0])
        stride_split, stride_out = part.stride(0), out.stride(0)
    elif fused_sum:  # part: the (tokens, N) sum of the slots, written by the last program of each column tile
        part = torch.empty(n_rows // top_k, size_n, dtype=x.dtype, device=device)
        counters = arrival_counters(device, n_tiles)
        stride_split, stride_out = out.stride(0), out.stride(1)
    else:
        part, counters = out, sorted_rows
        stride_split, stride_out = (out.stride(0), out.stride(1)) if mode == 2 else (0, out.stride(0))
    z = zeros if zeros is not None else scales
    weights = routing_weights if routing_weights is not None else scales
    unpack = cfg.get("unpack", 1)
    if unpack == 2 and x.dtype == torch.float32:
        unpack = 1  # the in-place FMA-only unpack keeps ~15 bits: too few for fp32 activations
    loader = cfg.get("loader", 0) if block_m == 1 else 0  # rows > 1: the 3-D register path (LOADER 0)
    desc = qweight  # any argument fills the slot when no descriptor is read
    if loader == 2:
        if _tma_fits(qweight, block_k, block_n):
            desc = TensorDescriptor(qweight, [qweight.numel() // size_n, size_n], [size_n, 1],
                                    [block_k // 8, block_n])  # fmt: skip
        else:
            loader = 1
    pdl = _pdl_form(cfg, device)
    split_max = (
        triton.next_power_of_2(split_k) if cfg.get("reduce_unrolled", False) and (fused or fused_sum) else 0
    )
    # MODE 1, one row: gate and up streamed as one tile ("dual") where the two together stay at <= 16 packed words a
    # thread; more costs registers (251 a thread at 64x256 / 4 warps: half the resident programs, 1.14x slower)
    dual_words = 2 * block_n * block_k // 8 // (32 * cfg["num_warps"])
    dual = mode == 1 and block_m == 1 and loader != 2 and cfg.get("dual", dual_words <= 16)
    _gemv_kernel[grid](
        x, qweight, scales, z, out, part, counters, weights, sorted_rows, block_expert, desc, m_rows, size_n, n_rows,
        top_k, n_groups, per_split, split_k, route.n_experts if direct else 0, x.stride(0),
        qweight.stride(0) if qweight.dim() == 3 else 0, scales.stride(0) if scales.dim() == 3 else 0,
        stride_split, stride_out,
        G=group_size, MODE=mode, SYMMETRIC=zeros is None, ROUTE_BLOCK=route_block, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, FUSED_SPLIT=fused, UNPACK=unpack,
        PREFETCH=cfg.get("prefetch", False), EVICT=cfg.get("evict", ""), PDL=pdl, LOADER=loader,
        STAGES=cfg["num_stages"], SPLIT_MAX=split_max, DIRECT=direct, FUSED_SUM=fused_sum,
        TOP_K=top_k if fused_sum else 1, DUAL=dual, EARLY_IDS=direct and pdl == 2 and early_ids,
        TAIL=full_tiles > 0, full_tiles=full_tiles, **_launch_opts({**cfg, "pdl": pdl}),
    )  # fmt: skip
    return part if fused_sum else out


def _matmul(x, weight, group_size, mode, m_rows, route, cfg):
    """Launch the tl.dot GEMM kernel; returns (split_k, rows, N) partials (fp32 when split_k > 1)."""
    qweight, scales, zeros = weight
    size_n = qweight.shape[-1]
    n_groups = scales.shape[-2]
    stride_qe = qweight.stride(0) if qweight.dim() == 3 else 0
    stride_se = scales.stride(0) if scales.dim() == 3 else 0
    route_block, sorted_rows, block_expert, n_rows, top_k = _route_args(route, m_rows, qweight)
    if route is None:
        out_rows = m_rows
    else:
        out_rows = route.max_rows if mode == 1 else route.n_rows
    block_n = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(size_n)))
    nibble_dots = cfg.get("nibble_dots", False)
    # The nibble-dot kernel takes any BLOCK_K (scales per word row); the tile kernel one group per step.
    block_k = cfg["BLOCK_K"] if nibble_dots else min(cfg["BLOCK_K"], group_size)
    if nibble_dots and block_k < 128:
        raise ValueError(
            f"nibble-dot config BLOCK_K={block_k}; expected >= 128 (tl.dot needs 16-deep slices)"
        )
    z = zeros if zeros is not None else scales
    block_m = cfg["BLOCK_M"] if route is None else min(cfg["BLOCK_M"], route_block)
    row_space = m_rows if route is None else route.max_rows
    num_row_blocks = triton.cdiv(row_space, block_m)
    tiles = num_row_blocks * triton.cdiv(size_n, block_n)
    split_k, per_split = _split(n_groups, tiles, cfg["occupancy"], block_k, group_size, x.device)
    dtype = x.dtype if split_k == 1 else torch.float32
    out = torch.empty(split_k, out_rows, size_n, dtype=dtype, device=x.device)
    _gemm_kernel[(tiles, split_k)](
        x, qweight, scales, z, out, sorted_rows, block_expert, m_rows, size_n, n_rows, top_k, n_groups,
        per_split, num_row_blocks, x.stride(0), stride_qe, stride_se, out.stride(0), out.stride(1),
        G=group_size, MODE=mode, SYMMETRIC=zeros is None, ROUTE_BLOCK=route_block, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"], NIBBLE_DOTS=nibble_dots, **_launch_opts(cfg),
    )  # fmt: skip
    return out


def _sum_rows(partial, out, ids=None, n_experts=0, top_k=1):
    n_out, size_n = out.shape
    block = min(1024, triton.next_power_of_2(size_n))
    _sum_rows_kernel[(n_out, triton.cdiv(size_n, block))](
        partial, ids if ids is not None else partial, out, size_n, partial.shape[0], partial.stride(0),
        n_experts, TOP_K=top_k, HAS_IDS=ids is not None, BLOCK=block, **pdl_args(out.device),
    )  # fmt: skip
    return out


def dequantize(qweight, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """([E,] K // 8, N) packed -> ([E,] K, N) in ``dtype`` (same values as the reference)."""
    size_k, size_n = qweight.shape[-2] * 8, qweight.shape[-1]
    n_experts = qweight.shape[0] if qweight.dim() == 3 else 1
    out = torch.empty(*qweight.shape[:-2], size_k, size_n, dtype=dtype, device=qweight.device)
    block_k, block_n = (32, 32) if _interpreting() else (64, 128)
    grid = (triton.cdiv(size_k, block_k), triton.cdiv(size_n, block_n), n_experts)
    z = zeros if zeros is not None else scales
    _dequant_kernel[grid](qweight, scales, z, out, size_k, size_n, G=group_size, SYMMETRIC=zeros is None,
                          BLOCK_K=block_k, BLOCK_N=block_n)  # fmt: skip
    return out


def check_linear_input(x, qweight, scales, zeros, group_size: int) -> int:
    """Check a dense Int4 matmul's weight and its (M, K) input against each other; returns N."""
    size_k, size_n = _check_weight(qweight, scales, zeros, group_size, 0)
    if x.dim() != 2 or x.shape[1] != size_k:
        raise ValueError(f"x shape {tuple(x.shape)}; expected (M, {size_k})")
    return size_n


def int4_linear(
    x: torch.Tensor,  # (M, K)
    qweight: torch.Tensor,  # (K // 8, N) int32
    scales: torch.Tensor,  # (K // G, N)
    zeros: torch.Tensor | None,  # (K // G, N) or None
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:  # (M, N) in x.dtype
    """Triton version of :func:`scout_mm.kernels.int4_reference.int4_linear`. ``config`` overrides the
    recorded choice (benchmarks); ``{"kind": "dequant"}`` forces dequantise + ``torch.matmul``."""
    size_n = check_linear_input(x, qweight, scales, zeros, group_size)
    m_rows = x.shape[0]
    if m_rows == 0:
        return torch.empty(m_rows, size_n, dtype=x.dtype, device=x.device)
    x = x.contiguous()
    if config is None and 2 <= m_rows <= 16 and not _interpreting():
        mma = _mma_module()
        if mma is not None and mma.supported(x, group_size):
            # Tensor cores for 2..16 rows (H100 2026-11-24, bench/results/int4_gemv_h100.md: 1.6-2.5x this
            # file's kernels at M = 2..16); one row stays on the GEMV, which is as fast there.
            return mma.launch(x, qweight, scales, zeros, group_size, mma.config_for_rows(m_rows))
    cfg = config or pick_config(m_rows, shape=(size_n, x.shape[1]))
    if cfg["kind"] == "dequant" or (
        config is None and not _interpreting() and m_rows >= TUNED["DEQUANT_MIN_ROWS"]
    ):
        return x @ dequantize(qweight, scales, zeros, group_size, x.dtype)
    if cfg["kind"] == "gemv":
        return _launch_gemv(x, (qweight, scales, zeros), group_size, 0, m_rows, None, cfg)
    result = _matmul(x, (qweight, scales, zeros), group_size, 0, m_rows, None, cfg)
    if result.shape[0] == 1:
        return result[0]
    return _sum_rows(result, torch.empty(m_rows, size_n, dtype=x.dtype, device=x.device))


@functools.lru_cache(maxsize=1)
def _mma_module():
    """:mod:`scout_mm.kernels.int4_mma` (Gluon), or None with a Triton that has no Gluon."""
    try:
        from scout_mm.kernels import int4_mma
    except ImportError:
        return None
    return int4_mma


def _moe_route_block(rows_per_expert: float, cfg: dict) -> int:
    if cfg["kind"] == "gemv":
        return min(cfg.get("rows_per_program", 4), triton.next_power_of_2(max(1, round(rows_per_expert))))
    return cfg["BLOCK_M"]


def int4_moe_experts(
    hidden: torch.Tensor,  # (tokens, hidden)
    topk_weights: torch.Tensor,  # (tokens, top_k)
    topk_ids: torch.Tensor,  # (tokens, top_k); ids outside [0, E) are non-local slots (contribute 0)
    gate_up: tuple,  # (qweight (E, H // 8, 2I), scales, zeros or None)
    down: tuple,  # (qweight (E, I // 8, H), scales, zeros or None)
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:  # (tokens, hidden)
    """Triton version of :func:`scout_mm.kernels.int4_reference.int4_moe_experts`: routing on the GPU
    (:class:`scout_mm.kernels.moe.Routing`, no host sync), Int4 grouped gate_up over gathered rows, SwiGLU with
    the routing weight on the expert input, Int4 grouped down, slot sum. ``config``: one config for both
    GEMMs (benchmarks); ``{"kind": "dequant"}`` forces dequantise + the bf16 fused MoE."""
    hidden_size, two_inter = gate_up[0].shape[1] * 8, gate_up[0].shape[2]
    n_experts = gate_up[0].shape[0]
    _check_weight(*gate_up, group_size, 1)
    _check_weight(*down, group_size, 1)
    inter = two_inter // 2
    if down[0].shape != (n_experts, inter // 8, hidden_size):
        raise ValueError(
            f"down qweight {tuple(down[0].shape)}; expected {(n_experts, inter // 8, hidden_size)} from gate_up "
            f"{tuple(gate_up[0].shape)}"
        )
    tokens = hidden.shape[0]
    if hidden.shape[1] != hidden_size or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != tokens:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, topk_ids {tuple(topk_ids.shape)}, topk_weights "
            f"{tuple(topk_weights.shape)}; expected (tokens, {hidden_size}) and two (tokens, top_k)"
        )
    if tokens == 0:
        return hidden.new_zeros(hidden.shape)
    hidden, topk_weights, topk_ids = hidden.contiguous(), topk_weights.contiguous(), topk_ids.contiguous()
    top_k = topk_ids.shape[1]
    n_rows = tokens * top_k
    # Rows per touched expert (shape-only estimate: no host sync).
    rows_per_expert = n_rows / min(n_experts, n_rows)
    cfg = config or pick_config(rows_per_expert, moe=True)
    if cfg["kind"] == "dequant" or (
        config is None and not _interpreting() and rows_per_expert >= TUNED["MOE_DEQUANT_MIN_ROWS_PER_EXPERT"]
    ):
        return _dequant_moe(hidden, topk_weights, topk_ids, gate_up, down, group_size)
    route_block = _moe_route_block(rows_per_expert, cfg)
    if cfg["kind"] == "gemv" and route_block == 1 and DIRECT_DECODE_MOE:
        # decode: no routing kernel; SwiGLU inside the gate_up launch, the slot sum inside the down launch
        route = DirectRoute(topk_ids, n_experts)
        cfg_gu, cfg_dn = (
            (cfg, cfg) if config else (moe_gemv_config(cfg, w[0], n_rows) for w in (gate_up, down))
        )
        h = _launch_gemv(hidden, gate_up, group_size, 1, n_rows, route, cfg_gu, topk_weights)  # (n_rows, I)
        early = EARLY_DOWN_IDS and _pdl_form(cfg_gu, hidden.device) == 2
        return _launch_gemv(h, down, group_size, 2, n_rows, route, cfg_dn, early_ids=early)  # (tokens, H)
    route = Routing(topk_ids, n_experts, route_block)
    if cfg["kind"] == "gemv":  # decode: SwiGLU (and the K-split sum) inside the gate_up launch
        h = _launch_gemv(hidden, gate_up, group_size, 1, n_rows, route, cfg, topk_weights)  # (max_rows, I)
        rows_out = _launch_gemv(h, down, group_size, 2, route.max_rows, route, cfg)  # (split, n_rows, H)
    else:
        pre = _matmul(hidden, gate_up, group_size, 1, n_rows, route, cfg)  # (split, max_rows, 2I)
        h = torch.empty(route.max_rows, inter, dtype=hidden.dtype, device=hidden.device)
        block = min(1024, triton.next_power_of_2(inter))
        _swiglu_kernel[(route.max_rows, triton.cdiv(inter, block))](
            pre, topk_weights, route.sorted_rows, h, n_rows, inter, pre.shape[0], pre.stride(0), BLOCK=block
        )
        rows_out = _matmul(h, down, group_size, 2, route.max_rows, route, cfg)  # (split, n_rows, H)
    out = torch.empty(tokens, hidden_size, dtype=hidden.dtype, device=hidden.device)
    return _sum_rows(rows_out, out, route.ids, n_experts, top_k)


# Expert bytes the prefill MoE dequantises at a time. Scout's 17 experts (16 routed + the folded shared one) are
# 4.3 GB in bf16, on top of the weights and the KV cache. In passes of at most 2 GiB (6 + 6 + 5 experts, 1.5 GB)
# the peak of a long prompt's prefill on an H100 drops by 2.7 GB (71.3 vs 74.0 GB at 128K tokens) for 1.6-2.1%
# of prefill speed; passes of 4 experts (1 GiB) cost 3.8-4.9% (bench/results/int4_long_prompts_h100.md).
MOE_DEQUANT_MAX_BYTES = 2 << 30


def _dequant_moe(hidden, topk_weights, topk_ids, gate_up, down, group_size: int) -> torch.Tensor:
    """Many rows per expert: the experts dequantised to the activation dtype, then the fused MoE in that dtype,
    in the fewest passes of at most ``MOE_DEQUANT_MAX_BYTES`` of experts each. A pass sees its experts' slots as
    local (ids shifted to the pass) and every other slot as non-local; the passes' outputs are added in place. Up to two slots per
    token this equals one pass bit for bit (each slot's row is rounded to the activation dtype, and the two rows
    are added once and rounded once) as long as the passes run the fused-MoE tile configs one pass would: the
    tuned ones from ``MOE_DEQUANT_MIN_ROWS_PER_EXPERT`` rows per expert up all reduce K alike (GPU test). With
    more slots a token's sum may round more than once."""
    from scout_mm.kernels import moe

    n_experts = gate_up[0].shape[0]
    per_expert = (gate_up[0][0].numel() + down[0][0].numel()) * 8 * hidden.element_size()
    passes = triton.cdiv(n_experts, max(1, MOE_DEQUANT_MAX_BYTES // per_expert))
    step = triton.cdiv(n_experts, passes)  # passes of even size: the fewest experts dequantised at a time
    total = None
    for first in range(0, n_experts, step):
        last = min(first + step, n_experts)
        gu, dn = ([t if t is None else t[first:last] for t in w] for w in (gate_up, down))
        out = moe.moe_experts(
            hidden, topk_weights, topk_ids - first if first else topk_ids,
            dequantize(*gu, group_size, hidden.dtype), dequantize(*dn, group_size, hidden.dtype),
        )  # fmt: skip
        total = out if total is None else total.add_(out)
    return total


# ----------------------------------------------------------------------------------------------------------
# Host-resident embedding table
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _gather_rows_kernel(table_ptr, ids_ptr, out_ptr, n_ids, size_h, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[i] = table[ids[i]]. ``table`` may be pinned host memory (read over the bus through unified virtual
    addressing): a decode step reads one row, and the kernel is CUDA-graph capturable."""
    pdl_wait_and_trigger(PDL)
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size_h
    row = tl.load(ids_ptr + i).to(tl.int64)
    values = tl.load(table_ptr + row * size_h + offs, mask=ok, other=0.0)
    tl.store(out_ptr + i.to(tl.int64) * size_h + offs, values, mask=ok)


def gather_rows(table: torch.Tensor, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table[ids]`` written on ``device`` (ids.shape + (hidden,)); ``table`` (vocab, hidden) contiguous, on
    the device or in pinned host memory. No bounds check (as ``F.embedding`` in a CUDA graph)."""
    if table.dim() != 2 or not table.is_contiguous():
        raise ValueError(f"table shape {tuple(table.shape)}; expected a contiguous (vocab, hidden) tensor")
    if table.device.type == "cpu" and device.type == "cuda" and not table.is_pinned():
        raise ValueError("a host-resident table must be in pinned memory (tensor.pin_memory())")
    flat = ids.reshape(-1).to(device)
    out = torch.empty(flat.numel(), table.shape[1], dtype=table.dtype, device=device)
    if flat.numel():
        block = min(1024, triton.next_power_of_2(table.shape[1]))
        _gather_rows_kernel[(flat.numel(), triton.cdiv(table.shape[1], block))](
            table, flat, out, flat.numel(), table.shape[1], BLOCK=block, **pdl_args(device)
        )
    return out.view(*ids.shape, table.shape[1])
