"""W4A16 for few rows (M = 1..16) on the tensor cores, weight as the MMA's large operand ("swap AB").

``out^T (N, M) = W^T (N, K) @ x^T (K, M)``: the N columns of the Int4 weight fill the MMA's 16-row side and the
few activation rows are its narrow side (padded to 8 or 16), so a 16-row matmul costs the same MMAs as a 1-row
one. The weight never goes through shared memory: each thread loads whole packed words (the on-disk layout of
``scout_mm/quant/FORMAT.md``, unchanged) and turns them, in registers, into exactly the elements of its own MMA
operand fragment. That works without repacking the weight because a dot product does not care about the order
of K: inside every 32-wide K block, operand position ``kk = 16 s + 8 h + 2 t + e`` (what thread ``t`` of a quad
holds in an m16n8k16 A fragment) is given the weight row ``k = 8 t + 4 e + 2 s + h``, i.e. nibbles ``2 s + h``
and ``2 s + h + 4`` of the thread's own word ``t``; the activations are gathered in the same order (they are
tiny). Triton's layout propagation then makes the word load, the unpacking and the A operand one register
layout (checked in the compiled TTGIR: no shared-memory conversion for the weight).

Dequantisation per pair of codes (compiled path): one ``lop3`` ORs nibbles ``i`` and ``i + 4`` of a word into
the mantissas of two 16-bit ``magic`` floats (bf16 128 + q, fp16 1024 + q) and one ``sub.x2`` removes
``magic + zero``, leaving ``q - zero`` exactly (small integers). The MMA sums ``(q - zero) x`` of a group in
fp32 and one fp32 multiply-add per output applies the group's scale, so no weight is ever rounded to the
activation dtype (the reference rounds ``(q - zero) * scale`` once). K is split over programs; the last program
to finish a column tile sums the splits in split order (deterministic), so a matmul is one launch.

bf16 or fp16 activations only (the compiled unpack is 16-bit arithmetic); fp32 activations stay on
:mod:`scout_mm.kernels.int4`'s kernels. Measured on an H100 in ``bench/results/int4_gemv_h100.md``.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from scout_mm.kernels.int4 import _n_sms, check_linear_input
from scout_mm.kernels.launch import arrival_counters

BF16_MAGIC = 0x43004300  # bf16 128.0 twice: a code q in the low mantissa bits reads as 128 + q (exact)
FP16_MAGIC = 0x64006400  # fp16 1024.0 twice

# The layout chain, as reshape/permute steps shared by the kernel and :func:`emulate_operands` (CPU tests).
# Words tile: (8 W [gg], 4 [rr], KB [b], 4 [t]) = word 4 b + t of weight column 4 gg + rr (the 4 columns of a
# thread are adjacent in memory: one 16-byte load).
# -> (W, 8 [g], 2 [r1], 2 [r0], KB, 4) -> permute -> (2 [r1], W, 2 [r0], 8 [g], KB, 4) -> (BN, KB, 4): operand
# row n = 16 W r1 + 16 w + 8 r0 + g, which is the row the m16n8k16 fragment of warp w, lane 4 g + t holds.
ROWS_PERM = gl.constexpr((2, 0, 3, 1, 4, 5))
# Operand: pairs (nibble i, nibble i + 4) of word t for i = 2 s + h, joined as (BN, KB, 4 [t], 2 [e], 2 [h],
# 2 [s]) -> permute -> (BN, KB, s, h, t, e) -> (BN, BK): operand column kk = 32 b + 16 s + 8 h + 2 t + e holds
# weight row k = 32 b + 8 t + 4 e + 2 s + h.
COLS_PERM = gl.constexpr((0, 1, 5, 4, 2, 3))
# Activations: (BM, KB, 4 [t], 8 [j]) with j = 4 e + 2 s + h -> (BM, KB, 4, 2 [e], 2 [s], 2 [h]) -> permute ->
# (KB, s, h, t, e, BM) -> (BK, BM): the same row order as the operand's columns.
X_PERM = gl.constexpr((1, 4, 5, 2, 3, 0))


@gluon.jit
def _index4(size: gl.constexpr, dim: gl.constexpr, layout: gl.constexpr):
    """arange(size) along ``dim`` of a rank-4 tensor of ``layout`` (size 1 elsewhere)."""
    if dim == 0:
        i = gl.arange(0, size, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, layout))))
        return gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 1), 2), 3)
    elif dim == 1:
        i = gl.arange(0, size, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, layout))))
        return gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 0), 2), 3)
    elif dim == 2:
        i = gl.arange(0, size, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, layout))))
        return gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 0), 1), 3)
    else:
        i = gl.arange(0, size, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, layout))))
        return gl.expand_dims(gl.expand_dims(gl.expand_dims(i, 0), 1), 2)


@gluon.jit
def _to_operand_rows(tile, W: gl.constexpr, KB: gl.constexpr):
    """(8 W, 4, KB, 4) in column order -> (32 W, KB, 4) in operand-row order (ROWS_PERM)."""
    tile = gl.reshape(tile, (W, 8, 2, 2, KB, 4))
    tile = gl.permute(tile, ROWS_PERM.value)
    return gl.reshape(tile, (32 * W, KB, 4))


@gluon.jit
def _code_pairs(words, offset, IS_BF16: gl.constexpr):
    """``words`` int32 (..., 2), both entries the same word, codes of interest at bits 0..3 and 16..19;
    ``offset`` (..., 2) = magic + zero point in the activation dtype. One lop3 puts the two codes in the
    mantissas of two magic floats, one sub.x2 leaves ``q - zero`` (exact small integers; the group's scale is
    applied to the fp32 MMA result). pack=2: one packed register per instance."""
    if IS_BF16:
        return gl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xEA; sub.rn.bf16x2 $0, t, $3; }",
            "=r,r,r,r", [words, offset], dtype=gl.bfloat16, is_pure=True, pack=2,
        )  # fmt: skip
    else:
        return gl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xEA; sub.rn.f16x2 $0, t, $3; }",
            "=r,r,r,r", [words, offset], dtype=gl.float16, is_pure=True, pack=2,
        )  # fmt: skip


@gluon.jit
def _group_product(packed, offset, xt, W: gl.constexpr, KB: gl.constexpr, BLOCK_M: gl.constexpr,
                   IS_BF16: gl.constexpr, acc_layout: gl.constexpr):  # fmt: skip
    """fp32 (32 W, BLOCK_M): the unscaled ``sum_k (q - zero) x`` of one group: words (8 W, 4, KB, 4) through the
    register chain into the A operand, the group's activations ``xt`` (BM, KB, 4, 8) gathered in the same K order
    into the B operand."""
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=acc_layout, k_width=2)
    words = _to_operand_rows(packed, W, KB)  # (BN, KB, 4) [n, b, t]
    offset = _to_operand_rows(offset, W, KB)
    offset2 = gl.join(offset, offset)
    v0 = _code_pairs(gl.join(words, words), offset2, IS_BF16)  # (BN, KB, 4, 2) [n, b, t, e]
    w1 = words >> 4
    v1 = _code_pairs(gl.join(w1, w1), offset2, IS_BF16)
    w2 = words >> 8
    v2 = _code_pairs(gl.join(w2, w2), offset2, IS_BF16)
    w3 = words >> 12
    v3 = _code_pairs(gl.join(w3, w3), offset2, IS_BF16)
    a = gl.join(gl.join(v0, v1), gl.join(v2, v3))  # [n, b, t, e, h, s]
    a = gl.reshape(gl.permute(a, COLS_PERM.value), (32 * W, 32 * KB))
    a = gl.convert_layout(a, a_layout, assert_trivial=True)  # compile-time proof: no data movement
    xt = gl.reshape(xt, (BLOCK_M, KB, 4, 2, 2, 2))
    xt = gl.reshape(gl.permute(xt, X_PERM.value), (32 * KB, BLOCK_M))
    xt = gl.convert_layout(xt, b_layout, assert_trivial=True)
    return mma_v2(a, xt, gl.zeros([32 * W, BLOCK_M], gl.float32, layout=acc_layout))


@gluon.jit
def _mma_kernel(
    x_ptr,  # (M, K) activations, bf16 / fp16
    qw_ptr,  # (K // 8, N) int32
    s_ptr,  # (K // G, N)
    z_ptr,  # (K // G, N) or a dummy (SYMMETRIC)
    out_ptr,  # (M, N) in x's dtype
    part_ptr,  # FUSED_SPLIT: (SPLIT, BLOCK_M, N) fp32 partial sums of the K splits
    count_ptr,  # FUSED_SPLIT: int32 arrival counters, one per column tile, zero between calls
    m_rows,
    size_n,
    n_groups,
    groups_per_split,
    split_k,
    stride_x,
    stride_out,
    G: gl.constexpr,
    STEP: gl.constexpr,  # groups per loop step (1 or 2; divides groups_per_split)
    SYMMETRIC: gl.constexpr,
    BLOCK_M: gl.constexpr,
    W: gl.constexpr,  # warps; BLOCK_N = 32 W weight columns per program (two m16 tiles per warp)
    FUSED_SPLIT: gl.constexpr,
    SPLIT_MAX: gl.constexpr,
    PREFETCH: gl.constexpr,
    PREFETCH_X: gl.constexpr,  # with PREFETCH: the next step's activations and scales too
    EVICT: gl.constexpr,
):
    BLOCK_N: gl.constexpr = 32 * W
    KB: gl.constexpr = G // 32  # 32-row blocks per group
    IS_BF16: gl.constexpr = x_ptr.dtype.element_ty == gl.bfloat16
    MAGIC: gl.constexpr = 128.0 if IS_BF16 else 1024.0
    act: gl.constexpr = x_ptr.dtype.element_ty
    # words: (8 W [gg], 4 [rr], STEP x KB [b], 4 [t]); a thread holds 4 adjacent columns x its words
    q_layout: gl.constexpr = gl.BlockedLayout([1, 4, STEP * KB, 1], [8, 1, 1, 4], [W, 1, 1, 1], [1, 2, 3, 0])
    g_layout: gl.constexpr = gl.BlockedLayout([1, 4, KB, 1], [8, 1, 1, 4], [W, 1, 1, 1], [1, 2, 3, 0])
    # activations: (BM [m], KB [b], 4 [t], 8 [j]); 8 contiguous activations per load, warps all alike
    x_layout: gl.constexpr = gl.BlockedLayout([1, KB, 1, 8], [8, 1, 4, 1], [1, 1, W, 1], [3, 1, 2, 0])
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BLOCK_N
    g_begin = pid_k * groups_per_split
    n_steps = gl.minimum(groups_per_split, n_groups - g_begin) // STEP

    col = n0 + 4 * _index4(8 * W, 0, q_layout) + _index4(4, 1, q_layout)  # (8W, 4, 1, 1)
    col_ok = col < size_n
    word = 4 * _index4(STEP * KB, 2, q_layout) + _index4(4, 3, q_layout)  # (1, 1, STEP KB, 4)
    qw_ptrs = qw_ptr + (g_begin * (G // 8) + word) * size_n + col
    qw_mask = col_ok & (word >= 0)
    if not SYMMETRIC:
        z_col = n0 + 4 * _index4(8 * W, 0, g_layout) + _index4(4, 1, g_layout)
        z_zero = _index4(KB, 2, g_layout) * 0 + _index4(4, 3, g_layout) * 0  # every block and t: one zero
        z_ptrs = z_ptr + g_begin * size_n + z_col + z_zero
        z_mask = (z_col < size_n) & (z_zero == 0)
    # operand row n -> weight column (inverse of ROWS_PERM); the group scales are applied to fp32 partials
    n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    n_col = n0 + 32 * ((n // 16) % W) + 4 * (n % 8) + 2 * (n // (16 * W)) + (n // 8) % 2
    s_ptrs = s_ptr + g_begin * size_n + n_col
    s_mask = n_col < size_n

    xm = _index4(BLOCK_M, 0, x_layout)
    xk = 32 * _index4(KB, 1, x_layout) + 8 * _index4(4, 2, x_layout) + _index4(8, 3, x_layout)
    x_ptrs = x_ptr + xm * stride_x + g_begin * G + xk
    xm_ok = (xm < m_rows) & (xk >= 0)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    step_words: gl.constexpr = STEP * G // 8
    if PREFETCH:
        nxt = gl.load(qw_ptrs, mask=qw_mask, other=0, eviction_policy=EVICT)
        if PREFETCH_X:
            # the loop below reads group i of a step from x0 / s0 (i = 0) and x1 / s1 (i = 1)
            x0_nxt = gl.load(x_ptrs, mask=xm_ok, other=0.0)
            s0_nxt = gl.load(s_ptrs, mask=s_mask, other=0.0)
            if STEP == 2:
                x1_nxt = gl.load(x_ptrs + G, mask=xm_ok, other=0.0)
                s1_nxt = gl.load(s_ptrs + size_n, mask=s_mask, other=0.0)
    for step in range(n_steps):
        more = step + 1 < n_steps
        if PREFETCH:
            packed = nxt
            nxt = gl.load(qw_ptrs + step_words * size_n, mask=qw_mask & more, other=0, eviction_policy=EVICT)
            if PREFETCH_X:
                x0 = x0_nxt
                s0 = s0_nxt
                x0_nxt = gl.load(x_ptrs + STEP * G, mask=xm_ok & more, other=0.0)
                s0_nxt = gl.load(s_ptrs + STEP * size_n, mask=s_mask & more, other=0.0)
                if STEP == 2:
                    x1 = x1_nxt
                    s1 = s1_nxt
                    x1_nxt = gl.load(x_ptrs + 3 * G, mask=xm_ok & more, other=0.0)
                    s1_nxt = gl.load(s_ptrs + 3 * size_n, mask=s_mask & more, other=0.0)
        else:
            packed = gl.load(qw_ptrs, mask=qw_mask, other=0, eviction_policy=EVICT)
        if not (PREFETCH and PREFETCH_X):
            x0 = gl.load(x_ptrs, mask=xm_ok, other=0.0)
            s0 = gl.load(s_ptrs, mask=s_mask, other=0.0)
            if STEP == 2:
                x1 = gl.load(x_ptrs + G, mask=xm_ok, other=0.0)
                s1 = gl.load(s_ptrs + size_n, mask=s_mask, other=0.0)
        if STEP == 2:
            halves = gl.permute(gl.reshape(packed, (8 * W, 4, 2, KB, 4)), (0, 1, 3, 4, 2))
            first, second = gl.split(halves)
            firsts = (gl.convert_layout(first, g_layout, assert_trivial=True),
                      gl.convert_layout(second, g_layout, assert_trivial=True))  # fmt: skip
            xs = (x0, x1)
            ss = (s0, s1)
        else:
            firsts = (gl.convert_layout(packed, g_layout, assert_trivial=True),)
            xs = (x0,)
            ss = (s0,)
        for i in gl.static_range(STEP):
            if SYMMETRIC:
                offset = gl.full([8 * W, 4, KB, 4], MAGIC + 8.0, act, layout=g_layout)
            else:
                zero = gl.load(z_ptrs + i * size_n, mask=z_mask, other=0.0)
                offset = (zero.to(gl.float32) + MAGIC).to(act)
            part = _group_product(firsts[i], offset, xs[i], W, KB, BLOCK_M, IS_BF16, mma)
            acc += part * gl.expand_dims(ss[i].to(gl.float32), 1)
        qw_ptrs += step_words * size_n
        s_ptrs += STEP * size_n
        x_ptrs += STEP * G
        if not SYMMETRIC:
            z_ptrs += STEP * size_n

    rows = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma)), 0)
    cols = gl.expand_dims(n_col, 1)
    n_ok = cols < size_n
    last = True
    if FUSED_SPLIT:
        p_ptrs = part_ptr + rows * size_n + cols  # (BN, BM)
        gl.store(p_ptrs + pid_k * BLOCK_M * size_n, acc, mask=n_ok)
        gl.thread_barrier()  # every thread's partial is written before the (release) arrival below
        counter = count_ptr + pid_n
        arrived = gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        last = arrived == split_k - 1
        if last:
            acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
            for split in gl.static_range(SPLIT_MAX):  # fixed order: independent of arrival order
                # .cg: read from L2, where the other programs' stores are (never a stale L1 line)
                acc += gl.load(p_ptrs + split * BLOCK_M * size_n, mask=n_ok & (split < split_k), other=0.0,
                               cache_modifier=".cg")  # fmt: skip
            gl.atomic_xchg(counter, 0)  # ready for the next call (and the next replay of a CUDA graph)
    if last:
        gl.store(out_ptr + rows * stride_out + cols, acc.to(act), mask=n_ok & (rows < m_rows))


def emulate_operands(words: torch.Tensor, x_tile: torch.Tensor, warps: int):
    """CPU model of the kernel's register chain for one (BLOCK_N, BLOCK_K) step, with the same reshape /
    permute steps: ``words`` (BLOCK_K // 8, 32 W) int32 (rows of qweight), ``x_tile`` (BM, BLOCK_K). Returns
    (codes (BLOCK_N, BLOCK_K) in operand order, x^T (BLOCK_K, BM) in operand order, operand row -> column)
    so that ``codes @ x^T`` equals ``unpack(words)^T[col] @ x^T``."""
    kw, block_n = words.shape
    kb = kw // 4
    tile = words.T.reshape(8 * warps, 4, kb, 4)  # [gg, rr, b, t] = word 4 b + t of column 4 gg + rr
    tile = tile.reshape(warps, 8, 2, 2, kb, 4).permute(ROWS_PERM.value).reshape(block_n, kb, 4)
    pairs = [torch.stack([(tile >> (4 * i)) & 0xF, (tile >> (4 * i + 16)) & 0xF], dim=-1) for i in range(4)]
    joined = torch.stack([torch.stack([pairs[0], pairs[1]], -1), torch.stack([pairs[2], pairs[3]], -1)], -1)
    codes = joined.permute(COLS_PERM.value).reshape(block_n, 32 * kb)
    bm = x_tile.shape[0]
    xt = x_tile.reshape(bm, kb, 4, 2, 2, 2).permute(X_PERM.value).reshape(32 * kb, bm)
    n = torch.arange(block_n)
    col = 32 * ((n // 16) % warps) + 4 * (n % 8) + 2 * (n // (16 * warps)) + (n // 8) % 2
    return codes, xt, col


def mma_config(warps: int = 2, step: int = 1, occupancy: float = 4.0, prefetch: bool = True,
               evict: str = "evict_first", min_splits: int = 1, prefetch_x: bool = False) -> dict:  # fmt: skip
    """warps: a program covers 32 weight columns per warp (two m16 MMA tiles); step: groups per loop step
    (1 or 2; 1 where it does not divide the group count); occupancy: the K split aims at this many programs
    per SM (a ceiling); min_splits: at least this many K splits (where K has the steps), above the ceiling if
    need be (wide outputs); prefetch: the next step's words are loaded before this step's math; prefetch_x (with
    prefetch): the next step's activations and group scales too."""
    return {"kind": "mma", "num_warps": warps, "step": step, "occupancy": occupancy, "prefetch": prefetch,
            "evict": evict, "min_splits": min_splits, "prefetch_x": prefetch_x}  # fmt: skip


MAX_ROWS = 16
# H100 2026-11-24 (`bench/bench_int4.py --sections mma`, bench/results/int4_gemv_h100.md), the Scout shapes
# 16384x5120 and 5120x8192: up to 8 rows (an m8 tile) 4 warps, two groups per step led (19.9 + 13.5 us at one
# row, 22.9 + 17.0 us at eight); 16 rows: 2 warps, ~4 programs per SM, but at least 4 K splits (`--sections rows`,
# session 5: 16384x5120 gets only 2 splits under the ceiling, 27.0 us; with 4 splits 24.3-24.4 us, whether by 4
# warps or a higher ceiling; 5120x8192, 7168x5120 and 5120x5120 already have 4-6 splits and lose with more:
# 18.5 / 16.9 / 14.6 us vs 21.9-22.1 / 18.5 / 17.1-17.7).
# Up to 8 rows since session 9 (`--sections mma16`, same file): the next step's activations and scales are loaded
# with its words (prefetch_x), which takes the 4-warp, two-group program from 128 to 166 registers, so an SM holds
# 3 of them: the K split aims at 3 per SM (one wave). 1.04-1.18x at 2, 4 and 8 rows on all four Scout shapes (e.g.
# 16384x5120 at 8 rows 21.7 -> 20.2 us, 5120x8192 17.3 -> 14.6 us); prefetch_x with the split still aiming at 4
# per SM (a second wave) lost 0.85-0.92x on 16384x5120. At 16 rows no variant tried was faster on every shape
# (0.34-1.05x: prefetch_x, two groups a step, 2-3 K splits, an L1 prefetch of x, '.cg' weight loads, a register
# cap); the best, two groups a step with prefetch_x, gained 1-5% on the three smaller shapes and lost 1-2% on
# 16384x5120.
TUNED = mma_config(min_splits=4)
TUNED_FEW_ROWS = mma_config(warps=4, step=2, occupancy=3.0, prefetch_x=True)


def config_for_rows(m_rows: int) -> dict:
    """The measured config for ``m_rows`` rows."""
    return TUNED_FEW_ROWS if m_rows <= 8 else TUNED


def _split(
    n_groups: int, tiles: int, occupancy: float, step: int, device, min_splits: int = 1
) -> tuple[int, int]:
    """(split_k, groups per split): the most K splits that keep programs at or under ``occupancy`` per SM, and
    at least ``min_splits``; every split is whole steps of ``step`` groups (the last may be shorter)."""
    under = int(occupancy * _n_sms(device)) // max(tiles, 1)
    want = max(1, min(n_groups // step, max(under, min_splits)))
    per_split = triton.cdiv(triton.cdiv(n_groups, want), step) * step
    return triton.cdiv(n_groups, per_split), per_split


def supported(x: torch.Tensor, group_size: int) -> bool:
    """Whether :func:`int4_linear_mma` takes this input (CUDA sm_80+, bf16/fp16, 1..16 rows, groups of 32k)."""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and 1 <= x.shape[0] <= MAX_ROWS
        and group_size % 32 == 0
        and torch.cuda.get_device_capability(x.device)[0] >= 8
    )


def int4_linear_mma(
    x: torch.Tensor,  # (M, K), M <= 16, bf16 / fp16, on a CUDA device
    qweight: torch.Tensor,  # (K // 8, N) int32
    scales: torch.Tensor,  # (K // G, N)
    zeros: torch.Tensor | None,  # (K // G, N) or None
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:  # (M, N) in x.dtype
    """:func:`scout_mm.kernels.int4_reference.int4_linear` for few rows on the tensor cores (one launch).
    Each weight is ``(q - zero)`` exactly in the MMA and the group's scale multiplies the fp32 group sum, so
    the result is at least as close to the exact product as the reference's (weight rounded to x.dtype)."""
    check_linear_input(x, qweight, scales, zeros, group_size)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x dtype {x.dtype}; the tensor-core Int4 kernel takes bfloat16 or float16")
    m_rows = x.shape[0]
    if not 1 <= m_rows <= MAX_ROWS:
        raise ValueError(f"x has {m_rows} rows; the tensor-core Int4 kernel takes 1..{MAX_ROWS}")
    if group_size % 32:
        raise ValueError(f"group size {group_size}; the tensor-core Int4 kernel needs a multiple of 32")
    if not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 8:
        raise ValueError(
            f"x on {x.device}; the tensor-core Int4 kernel (Gluon, mma.sync) needs a CUDA sm_80+ GPU"
        )
    cfg = config or TUNED
    if cfg["num_warps"] not in (1, 2, 4, 8) or cfg["step"] not in (1, 2):
        raise ValueError(f"config num_warps={cfg['num_warps']}, step={cfg['step']}; expected 1/2/4/8 and 1/2")
    return launch(x, qweight, scales, zeros, group_size, cfg)


def launch(x, qweight, scales, zeros, group_size: int, cfg: dict) -> torch.Tensor:
    """:func:`int4_linear_mma` without its input checks, for a caller that made them
    (:func:`scout_mm.kernels.int4.int4_linear`: the weight and shapes, then :func:`supported`)."""
    warps, m_rows, size_n = cfg["num_warps"], x.shape[0], qweight.shape[-1]
    x = x.contiguous()
    block_m = 8 if m_rows <= 8 else 16
    n_groups = scales.shape[0]
    step = cfg["step"] if n_groups % cfg["step"] == 0 else 1
    n_tiles = triton.cdiv(size_n, 32 * warps)
    split_k, per_split = _split(n_groups, n_tiles, cfg["occupancy"], step, x.device, cfg.get("min_splits", 1))
    out = torch.empty(m_rows, size_n, dtype=x.dtype, device=x.device)
    fused = split_k > 1
    if fused:
        part = torch.empty(split_k, block_m, size_n, dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, n_tiles)
    else:
        part, counters = out, out
    _mma_kernel[(n_tiles, split_k)](
        x, qweight, scales, zeros if zeros is not None else scales, out, part, counters, m_rows, size_n,
        n_groups, per_split, split_k, x.stride(0), out.stride(0),
        G=group_size, STEP=step, SYMMETRIC=zeros is None, BLOCK_M=block_m, W=warps, FUSED_SPLIT=fused,
        SPLIT_MAX=triton.next_power_of_2(split_k) if fused else 1, PREFETCH=cfg["prefetch"],
        PREFETCH_X=cfg.get("prefetch_x", False), EVICT=cfg["evict"], num_warps=warps,
    )  # fmt: skip
    return out
