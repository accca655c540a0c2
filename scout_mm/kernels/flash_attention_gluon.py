"""Hopper (sm_90) flash attention forward in Gluon, FlashAttention-3 style: warp-specialised producer,
asynchronous wgmma, softmax overlapped with the tensor cores.

Semantics are those of :func:`scout_mm.kernels.reference.attention` (causal or chunked-local, GQA, per-row
query scale ``q_scale``, left padding ``kv_start``, cache offset ``q_start``), with the log-sum-exp output
of :func:`scout_mm.kernels.flash_attention.attention_with_lse` (natural log, -inf for padding rows), so the
Triton backward of that file can consume it. Forward only.

Structure of one program (one (batch, q head, 128-query tile)):
- a 1-warp loader partition builds TMA descriptors over this head's K and V (rows past the last query's key
  read as zeros) and streams (BLOCK_N, head_dim) tiles into a ring of ``STAGES`` shared-memory slots, K and
  V with separate "ready" / "empty" mbarriers so QK^T can start before V lands;
- two 4-warp consumer partitions (one warpgroup each) own 64 query rows each. Per key block j a warpgroup
  issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} as asynchronous wgmma, then waits for S_j only and runs the
  softmax of block j while P_{j-1} V_{j-1} is still on the tensor cores (intra-warpgroup overlap);
- with ``PINGPONG`` the two warpgroups take turns issuing their GEMMs (an mbarrier pair), so one's softmax
  runs under the other's GEMMs (inter-warpgroup overlap).
The key blocks walked are those intersecting the tile's visible range (chunked cost grows with the chunk);
only blocks where the range starts (chunk start / padding edge) and the diagonal blocks are masked.
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

from scout_mm.kernels.flash_attention import set_descriptor_allocator

_LOG2E = 1.4426950408889634
BLOCK_M = gl.constexpr(128)  # query rows per program: 64 per consumer warpgroup
WG_M = gl.constexpr(64)
HEAD_DIMS = (64, 128)


@gluon.jit
def _chunk_start(t, kv0, chunk_size, CHUNKED: gl.constexpr):
    # First key visible from key index t; positions (and chunk boundaries) count from kv0. A padding query
    # (t < kv0) gets kv0 > t: it sees nothing.
    if CHUNKED:
        return kv0 + gl.maximum(t - kv0, 0) // chunk_size * chunk_size
    else:
        return kv0 + t * 0


@gluon.jit
def _tile_ranges(pid_m, q_len, q_start, kv0, chunk_size, BLOCK_N: gl.constexpr, CHUNKED: gl.constexpr):
    """Key blocks of the program's 128 queries on a BLOCK_N grid from lo: blocks before mid_lo and from
    mid_hi on need masks, those in between are seen in full by every query of the tile."""
    q_first = q_start + pid_m * BLOCK_M
    q_last = q_start + gl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1
    hi = q_last + 1
    lo = _chunk_start(q_first, kv0, chunk_size, CHUNKED) // BLOCK_N * BLOCK_N
    full_lo = _chunk_start(q_last, kv0, chunk_size, CHUNKED)  # latest chunk start of the tile
    mid_lo = gl.minimum(lo + gl.cdiv(gl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N, hi)
    full_hi = lo + gl.maximum(q_first + 1 - lo, 0) // BLOCK_N * BLOCK_N  # earliest diagonal of the tile
    mid_hi = gl.maximum(gl.minimum(full_hi, hi), mid_lo)
    n_blocks = gl.cdiv(gl.maximum(hi - lo, 0), BLOCK_N)
    return lo, mid_lo, mid_hi, n_blocks


@gluon.jit
def _program_coords(KVStart, n_heads, GROUP: gl.constexpr, HAS_KV_START: gl.constexpr):
    # Latest query tiles (most keys under a causal mask) start first: a shorter tail.
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kv0 = 0
    if HAS_KV_START:
        kv0 = gl.load(KVStart + b)
    return pid_m, pid_bh, b, h, h // GROUP, kv0


@gluon.jit
def _loader(
    K, V, KVStart, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    n_heads, q_len, q_start, chunk_size,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CHUNKED: gl.constexpr, HAS_KV_START: gl.constexpr,
):  # fmt: skip
    pid_m, pid_bh, b, h, kv_h, kv0 = _program_coords(KVStart, n_heads, GROUP, HAS_KV_START)
    lo, mid_lo, mid_hi, n_blocks = _tile_ranges(pid_m, q_len, q_start, kv0, chunk_size, BLOCK_N, CHUNKED)
    b64 = b.to(gl.int64)
    layout: gl.constexpr = k_bufs.type.layout
    # No query sees a key past q_start + q_len: the descriptors end there, so a diagonal block's rows
    # beyond it (maybe unwritten cache slots) read as zeros.
    k_desc = tma.make_tensor_descriptor(
        K + b64 * stride_kb + kv_h * stride_kh, shape=[q_start + q_len, HEAD_DIM], strides=[stride_kn, 1],
        block_shape=[BLOCK_N, HEAD_DIM], layout=layout,
    )  # fmt: skip
    v_desc = tma.make_tensor_descriptor(
        V + b64 * stride_vb + kv_h * stride_vh, shape=[q_start + q_len, HEAD_DIM], strides=[stride_vn, 1],
        block_shape=[BLOCK_N, HEAD_DIM], layout=layout,
    )  # fmt: skip
    nbytes: gl.constexpr = BLOCK_N * HEAD_DIM * k_bufs.type.element_ty.primitive_bitwidth // 8
    for i in range(n_blocks):
        slot = i % STAGES
        # A fresh mbarrier counts as having completed the phase before phase 0: the first pass is free.
        phase = (i // STAGES & 1) ^ 1
        start_n = lo + i * BLOCK_N
        mbarrier.wait(k_empty.index(slot), phase)
        mbarrier.expect(k_ready.index(slot), nbytes)
        tma.async_copy_global_to_shared(k_desc, [start_n, 0], k_ready.index(slot), k_bufs.index(slot))
        mbarrier.wait(v_empty.index(slot), phase)
        mbarrier.expect(v_ready.index(slot), nbytes)
        tma.async_copy_global_to_shared(v_desc, [start_n, 0], v_ready.index(slot), v_bufs.index(slot))


@gluon.jit
def _softmax_block(s, m_i, l_i, t, t_start, start_n, masked, qk_scale, BLOCK_N: gl.constexpr,
                   s_layout: gl.constexpr):  # fmt: skip
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    if masked:
        cols = start_n + gl.arange(0, BLOCK_N, layout=col_layout)
        visible = (cols[None, :] <= t[:, None]) & (cols[None, :] >= t_start[:, None])
        s = gl.where(visible, s, float("-inf"))
    # m_i starts finite (-1e30), so a row with nothing visible yet keeps p = 0 and alpha = 1, not NaN.
    # The scale folds into one FMA per score: exp2(s * scale - m).
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, l_i, alpha


@gluon.jit
def _consumer(
    Q, Out, Lse, QScale, KVStart, q_bufs, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn,
    stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om,
    n_heads, q_len, q_start, chunk_size, qk_scale,
    WG: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CHUNKED: gl.constexpr, HAS_Q_SCALE: gl.constexpr, HAS_KV_START: gl.constexpr,
    PINGPONG: gl.constexpr,
):  # fmt: skip
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    load_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    lrow_layout: gl.constexpr = gl.SliceLayout(1, load_layout)
    lcol_layout: gl.constexpr = gl.SliceLayout(0, load_layout)
    ocol_layout: gl.constexpr = gl.SliceLayout(0, o_layout)
    dtype: gl.constexpr = k_bufs.type.element_ty

    pid_m, pid_bh, b, h, kv_h, kv0 = _program_coords(KVStart, n_heads, GROUP, HAS_KV_START)
    lo, mid_lo, mid_hi, n_blocks = _tile_ranges(pid_m, q_len, q_start, kv0, chunk_size, BLOCK_N, CHUNKED)
    b64 = b.to(gl.int64)
    row0 = pid_m * BLOCK_M + WG * WG_M

    # This warpgroup's 64 query rows -> registers (scaled, rounded to the input dtype as the reference
    # does) -> shared memory, the A operand of every QK^T.
    q_smem = q_bufs.index(WG)
    rows_ld = row0 + gl.arange(0, WG_M, layout=lrow_layout)
    dims_ld = gl.arange(0, HEAD_DIM, layout=lcol_layout)
    ok_ld = rows_ld < q_len
    q_ptrs = Q + b64 * stride_qb + h * stride_qh + rows_ld[:, None] * stride_qm + dims_ld[None, :]
    q = gl.load(q_ptrs, mask=ok_ld[:, None], other=0.0)
    if HAS_Q_SCALE:
        q_scale = gl.load(QScale + b64 * q_len + rows_ld, mask=ok_ld, other=1.0)
        q = (q.to(gl.float32) * q_scale[:, None]).to(dtype)
    q_smem.store(q)
    fence_async_shared()
    gl.thread_barrier()

    t = q_start + row0 + gl.arange(0, WG_M, layout=row_layout)  # key index of each query row
    t_start = _chunk_start(t, kv0, chunk_size, CHUNKED)
    m_i = gl.full([WG_M], -1.0e30, gl.float32, layout=row_layout)
    l_i = gl.zeros([WG_M], gl.float32, layout=row_layout)
    acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, layout=s_layout)

    if n_blocks > 0:
        # Block 0: S_0 and its softmax, nothing to overlap yet.
        mbarrier.wait(k_ready.index(0), 0)
        s = warpgroup_mma(q_smem, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s, _, _ = warpgroup_mma_wait(0, deps=(s, q_smem, k_bufs.index(0)))
        mbarrier.arrive(k_empty.index(0))
        masked = (lo < mid_lo) | (lo >= mid_hi)
        p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, t, t_start, lo, masked, qk_scale, BLOCK_N, s_layout)
        for i in range(1, n_blocks):
            slot = i % STAGES
            prev = (i - 1) % STAGES
            if PINGPONG:
                mbarrier.wait(turn.index(WG), (i - 1) & 1)
            mbarrier.wait(k_ready.index(slot), i // STAGES & 1)
            s = warpgroup_mma(
                q_smem, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            # Rescale O by the previous block's alpha while S_i runs (P_{i-1} V_{i-1} has completed).
            acc = acc * gl.convert_layout(alpha, orow_layout)[:, None]
            mbarrier.wait(v_ready.index(prev), (i - 1) // STAGES & 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            acc = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - WG))
            # Wait for S_i only; P_{i-1} V_{i-1} stays on the tensor cores under this block's softmax.
            s, _, _ = warpgroup_mma_wait(1, deps=(s, q_smem, k_bufs.index(slot)))
            mbarrier.arrive(k_empty.index(slot))
            start_n = lo + i * BLOCK_N
            masked = (start_n < mid_lo) | (start_n >= mid_hi)
            p, m_i, l_i, alpha = _softmax_block(s, m_i, l_i, t, t_start, start_n, masked, qk_scale, BLOCK_N,
                                                s_layout)  # fmt: skip
            acc, _, _ = warpgroup_mma_wait(0, deps=(acc, p_op, v_bufs.index(prev)))
            mbarrier.arrive(v_empty.index(prev))
        last = (n_blocks - 1) % STAGES
        acc = acc * gl.convert_layout(alpha, orow_layout)[:, None]
        mbarrier.wait(v_ready.index(last), (n_blocks - 1) // STAGES & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
        acc, _, _ = warpgroup_mma_wait(0, deps=(acc, p_op, v_bufs.index(last)))
        mbarrier.arrive(v_empty.index(last))

    empty = l_i == 0.0  # padding query rows
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc / gl.convert_layout(l_safe, orow_layout)[:, None]
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) / 1.4426950408889634)
    rows_o = row0 + gl.arange(0, WG_M, layout=orow_layout)
    dims_o = gl.arange(0, HEAD_DIM, layout=ocol_layout)
    o_ptrs = Out + b64 * stride_ob + h * stride_oh + rows_o[:, None] * stride_om + dims_o[None, :]
    gl.store(o_ptrs, out.to(dtype), mask=(rows_o < q_len)[:, None])
    rows = row0 + gl.arange(0, WG_M, layout=row_layout)
    gl.store(Lse + pid_bh.to(gl.int64) * q_len + rows, lse, mask=rows < q_len)


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr):
    """The mbarriers of a two-operand TMA ring of STAGES slots (operands a and b: K and V, or Q and dOut):
    (a_ready, b_ready, a_empty, b_empty). A slot is ready when the loader's one arrival and its bytes land, and
    empty again when both consumer warpgroups have released it."""
    a_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    a_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    b_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(a_ready.index(i), count=1)
        mbarrier.init(b_ready.index(i), count=1)
        mbarrier.init(a_empty.index(i), count=2)
        mbarrier.init(b_empty.index(i), count=2)
    return a_ready, b_ready, a_empty, b_empty


@gluon.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, QScale, KVStart,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    n_heads, q_len, q_start, chunk_size, qk_scale,
    GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CHUNKED: gl.constexpr, HAS_Q_SCALE: gl.constexpr, HAS_KV_START: gl.constexpr, PINGPONG: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WG_M, HEAD_DIM], dtype)
    q_bufs = gl.allocate_shared_memory(dtype, [2, WG_M, HEAD_DIM], q_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    k_ready, v_ready, k_empty, v_empty = _ring_barriers(STAGES)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first

    # The partitions' argument tuples are written out in the call: a tuple bound to a name first loses its
    # constexpr entries in Gluon 3.6.
    # fmt: off
    gl.warp_specialize(
        [
            (_consumer, (Q, Out, Lse, QScale, KVStart, q_bufs, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                         turn, stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om, n_heads, q_len,
                         q_start, chunk_size, qk_scale, 0, GROUP, HEAD_DIM, BLOCK_N, STAGES, CHUNKED,
                         HAS_Q_SCALE, HAS_KV_START, PINGPONG)),
            (_consumer, (Q, Out, Lse, QScale, KVStart, q_bufs, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty,
                         turn, stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om, n_heads, q_len,
                         q_start, chunk_size, qk_scale, 1, GROUP, HEAD_DIM, BLOCK_N, STAGES, CHUNKED,
                         HAS_Q_SCALE, HAS_KV_START, PINGPONG)),
            (_loader, (K, V, KVStart, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, stride_kb, stride_kh,
                       stride_kn, stride_vb, stride_vh, stride_vn, n_heads, q_len, q_start, chunk_size, GROUP,
                       HEAD_DIM, BLOCK_N, STAGES, CHUNKED, HAS_KV_START)),
        ],
        [4, 1],
        [CONSUMER_REGS, 24],
    )
    # fmt: on


# ---------------------------------------------------------------------------------------------- launcher

DEFAULT_CONFIG = dict(block_n=128, stages=2, pingpong=True, consumer_regs=240, maxnreg=168)


def available(device: torch.device | None = None) -> bool:
    """Whether this kernel can run here: a CUDA device of compute capability 9.0 (Hopper)."""
    if not torch.cuda.is_available():
        return False
    device = device or torch.device("cuda")
    return torch.cuda.get_device_capability(device) == (9, 0)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether these inputs fit the kernel: 4-D bf16/fp16 CUDA tensors on Hopper, head_dim 64 or 128,
    K/V rows readable by TMA (16-byte aligned base and strides, unit last stride)."""
    if not (q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.is_cuda and available(q.device)):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] not in HEAD_DIMS or k.shape != v.shape or k.shape[-1] != q.shape[-1]:
        return False
    if q.shape[1] % k.shape[1]:
        return False
    return _tma_rows_fit(k) and _tma_rows_fit(v)


def _tma_rows_fit(x: torch.Tensor) -> bool:
    """Whether TMA can read ``x``'s rows: unit last stride, 16-byte aligned base and other strides."""
    size = x.element_size()
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in x.stride()[:-1])


def forward(
    q: torch.Tensor,  # (batch, n_heads, q_len, head_dim)
    k: torch.Tensor,  # (batch, n_kv_heads, kv_len, head_dim)
    v: torch.Tensor,  # (batch, n_kv_heads, kv_len, head_dim)
    *,
    scale: float,
    chunk_size: int | None = None,
    q_start: int = 0,
    kv_start: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (batch, n_heads, q_len, head_dim), (batch, n_heads, q_len) fp32
    """Attention output and natural-log LSE per row, as :func:`flash_attention.attention_with_lse` returns
    them (forward only, no autograd)."""
    if not supports(q, k, v):
        raise ValueError(
            "flash_attention_gluon needs Hopper, bf16/fp16, head_dim in (64, 128), 4-D q/k/v with matching K/V "
            f"shapes, 16-byte aligned K/V rows; got q {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)}"
        )
    batch, n_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if q_start + q_len > kv_len:
        raise ValueError(f"q_start={q_start} + q_len={q_len} exceeds kv_len={kv_len}")
    if chunk_size is not None and chunk_size >= kv_len:
        chunk_size = None  # one chunk covers every key: plain causal
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(batch, n_heads, q_len, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, n_heads, q_len, device=q.device, dtype=torch.float32)
    if q_len == 0:
        return out, lse
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    if q_scale is not None:
        q_scale = q_scale.to(device=q.device, dtype=torch.float32).expand(batch, q_len).contiguous()
    set_descriptor_allocator(q.device)
    grid = (triton.cdiv(q_len, BLOCK_M.value), batch * n_heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, q_scale if q_scale is not None else lse, kv_start if kv_start is not None else lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n_heads, q_len, q_start, chunk_size or 1, scale * _LOG2E,
        GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_N=cfg["block_n"], STAGES=cfg["stages"],
        CHUNKED=chunk_size is not None, HAS_Q_SCALE=q_scale is not None, HAS_KV_START=kv_start is not None,
        PINGPONG=cfg["pingpong"], CONSUMER_REGS=cfg["consumer_regs"],
        num_warps=4, maxnreg=cfg["maxnreg"],
    )  # fmt: skip
    return out, lse
