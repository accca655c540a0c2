"""Experiment: :mod:`scout_mm.kernels.int4_mma` with a warp-specialised TMA producer (Hopper).

The register chain of ``int4_mma`` (packed words -> m16n8k16 A fragments without data movement, activations
as the narrow B operand, fp32 group sums scaled once per group) is kept as it is. What changes is where the
words and the activations come from: a 1-warp loader partition streams, per stage of ``SB`` groups, the
``(SB G / 8, BLOCK_N)`` packed words of the program's column tile and the ``(BLOCK_M, SB G)`` activations into a
ring of ``STAGES`` shared-memory slots with TMA (rows and columns past the tensor read as zeros), and the
consumer warps (the default partition) read each slot into the same register layouts the plain kernel loads
from global memory. The consumer's loop then waits on a shared-memory load (tens of cycles) instead of an HBM
round trip, and holds no prefetch registers, so more of its warps fit on an SM.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from scout_mm.kernels.flash_attention import set_descriptor_allocator
from scout_mm.kernels.int4 import check_linear_input
from scout_mm.kernels.int4_mma import _group_product, _index4, _split
from scout_mm.kernels.launch import arrival_counters


@gluon.jit
def _loader(x_ptr, qw_ptr, w_bufs, x_bufs, ready, empty, m_rows, size_n, size_k, g_begin, n_steps,
            G: gl.constexpr, SB: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            STAGES: gl.constexpr):  # fmt: skip
    n0 = gl.program_id(0) * BLOCK_N
    w_desc = tma.make_tensor_descriptor(
        qw_ptr, shape=[size_k // 8, size_n], strides=[size_n, 1], block_shape=[SB * G // 8, BLOCK_N],
        layout=w_bufs.type.layout,
    )  # fmt: skip
    x_desc = tma.make_tensor_descriptor(
        x_ptr, shape=[m_rows, size_k], strides=[size_k, 1], block_shape=[BLOCK_M, SB * G],
        layout=x_bufs.type.layout,
    )  # fmt: skip
    nbytes: gl.constexpr = (
        SB * G // 8 * BLOCK_N * 4 + BLOCK_M * SB * G * x_bufs.type.element_ty.primitive_bitwidth // 8
    )
    for i in range(n_steps):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), (i // STAGES & 1) ^ 1)  # a fresh barrier: the first pass is free
        mbarrier.expect(ready.index(slot), nbytes)
        k0 = (g_begin + i * SB) * G
        tma.async_copy_global_to_shared(w_desc, [k0 // 8, n0], ready.index(slot), w_bufs.index(slot))
        tma.async_copy_global_to_shared(x_desc, [0, k0], ready.index(slot), x_bufs.index(slot))


@gluon.jit
def _consumer(s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, w_bufs, x_bufs, ready, empty, m_rows, size_n, n_groups,
              g_begin, n_steps, split_k, stride_out,
              G: gl.constexpr, SB: gl.constexpr, SYMMETRIC: gl.constexpr, BLOCK_M: gl.constexpr,
              W: gl.constexpr, STAGES: gl.constexpr, FUSED_SPLIT: gl.constexpr, SPLIT_MAX: gl.constexpr):  # fmt: skip
    BLOCK_N: gl.constexpr = 32 * W
    KB: gl.constexpr = G // 32
    act: gl.constexpr = x_bufs.type.element_ty
    IS_BF16: gl.constexpr = act == gl.bfloat16
    MAGIC: gl.constexpr = 128.0 if IS_BF16 else 1024.0
    g_layout: gl.constexpr = gl.BlockedLayout([1, 4, KB, 1], [8, 1, 1, 4], [W, 1, 1, 1], [1, 2, 3, 0])
    x_layout: gl.constexpr = gl.BlockedLayout([1, KB, 1, 8], [8, 1, 4, 1], [1, 1, W, 1], [3, 1, 2, 0])
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8])
    plain4: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[3, 2, 1, 0])
    # The unswizzled TMA slots read as plain row-major arrays: words [4 b + t][4 gg + rr] as
    # (SB KB [b], 4 [t], 8 W [gg], 4 [rr]); activations [m][32 b + 8 t + j] as (BLOCK_M, SB KB, 4, 8).

    n0 = gl.program_id(0) * BLOCK_N
    pid_k = gl.program_id(1)
    n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    n_col = n0 + 32 * ((n // 16) % W) + 4 * (n % 8) + 2 * (n // (16 * W)) + (n // 8) % 2
    s_mask = n_col < size_n
    s_ptrs = s_ptr + g_begin * size_n + n_col
    if not SYMMETRIC:
        z_col = n0 + 4 * _index4(8 * W, 0, g_layout) + _index4(4, 1, g_layout)
        z_zero = _index4(KB, 2, g_layout) * 0 + _index4(4, 3, g_layout) * 0
        z_ptrs = z_ptr + g_begin * size_n + z_col + z_zero
        z_mask = (z_col < size_n) & (z_zero == 0)
    g_end = gl.minimum(g_begin + n_steps * SB, n_groups)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    scales = gl.load(s_ptrs, mask=s_mask, other=0.0)
    for i in range(n_steps):
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), i // STAGES & 1)
        w_slot = w_bufs.index(slot)._reinterpret(gl.int32, [SB * KB, 4, 8 * W, 4], plain4)
        w_slot = w_slot.permute((2, 3, 0, 1))  # (8 W, 4, SB KB, 4)
        x_slot = x_bufs.index(slot)._reinterpret(act, [BLOCK_M, SB * KB, 4, 8], plain4)
        for j in gl.static_range(SB):
            g = g_begin + i * SB + j
            packed = w_slot.slice(j * KB, KB, dim=2).load(g_layout)
            xt = x_slot.slice(j * KB, KB, dim=1).load(x_layout)
            s_cur = scales
            # the next group's scales (a group past the end reads zeros and is never used)
            scales = gl.load(s_ptrs + (g + 1 - g_begin) * size_n, mask=s_mask & (g + 1 < g_end), other=0.0)
            if SYMMETRIC:
                offset = gl.full([8 * W, 4, KB, 4], MAGIC + 8.0, act, layout=g_layout)
            else:
                zero = gl.load(z_ptrs + (g - g_begin) * size_n, mask=z_mask & (g < g_end), other=0.0)
                offset = (zero.to(gl.float32) + MAGIC).to(act)
            if j == SB - 1:
                gl.thread_barrier()  # every warp has read the slot before it is handed back
                mbarrier.arrive(empty.index(slot))
            part = _group_product(packed, offset, xt, W, KB, BLOCK_M, IS_BF16, mma)
            acc += part * gl.expand_dims(s_cur.to(gl.float32), 1)

    rows = gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma)), 0)
    cols = gl.expand_dims(n_col, 1)
    n_ok = cols < size_n
    last = True
    if FUSED_SPLIT:
        p_ptrs = part_ptr + rows * size_n + cols
        gl.store(p_ptrs + pid_k * BLOCK_M * size_n, acc, mask=n_ok)
        gl.thread_barrier()
        counter = count_ptr + gl.program_id(0)
        arrived = gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        last = arrived == split_k - 1
        if last:
            acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
            for split in gl.static_range(SPLIT_MAX):
                acc += gl.load(p_ptrs + split * BLOCK_M * size_n, mask=n_ok & (split < split_k), other=0.0,
                               cache_modifier=".cg")  # fmt: skip
            gl.atomic_xchg(counter, 0)
    if last:
        gl.store(out_ptr + rows * stride_out + cols, acc.to(act), mask=n_ok & (rows < m_rows))


@gluon.jit
def _mma_ws_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, part_ptr, count_ptr,
    m_rows, size_n, size_k, n_groups, groups_per_split, split_k, stride_out,
    G: gl.constexpr, SB: gl.constexpr, SYMMETRIC: gl.constexpr, BLOCK_M: gl.constexpr, W: gl.constexpr,
    STAGES: gl.constexpr, FUSED_SPLIT: gl.constexpr, SPLIT_MAX: gl.constexpr, LOADER_REGS: gl.constexpr,
):  # fmt: skip
    BLOCK_N: gl.constexpr = 32 * W
    act: gl.constexpr = x_ptr.dtype.element_ty
    w_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    x_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    w_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, SB * G // 8, BLOCK_N], w_layout)
    x_bufs = gl.allocate_shared_memory(act, [STAGES, BLOCK_M, SB * G], x_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    g_begin = gl.program_id(1) * groups_per_split
    n_steps = gl.cdiv(gl.minimum(groups_per_split, n_groups - g_begin), SB)
    # fmt: off
    gl.warp_specialize(
        [
            (_consumer, (s_ptr, z_ptr, out_ptr, part_ptr, count_ptr, w_bufs, x_bufs, ready, empty, m_rows, size_n,
                         n_groups, g_begin, n_steps, split_k, stride_out, G, SB, SYMMETRIC, BLOCK_M, W, STAGES,
                         FUSED_SPLIT, SPLIT_MAX)),
            (_loader, (x_ptr, qw_ptr, w_bufs, x_bufs, ready, empty, m_rows, size_n, size_k, g_begin, n_steps, G,
                       SB, BLOCK_M, BLOCK_N, STAGES)),
        ],
        [1],
        [LOADER_REGS],
    )
    # fmt: on


def ws_config(warps: int = 4, stage_k: int = 128, stages: int = 4, occupancy: float = 2.0, min_splits: int = 1,
              loader_regs: int = 40, maxnreg: int | None = 128) -> dict:  # fmt: skip
    """warps: consumer warps (32 weight columns each); stage_k: K rows per ring slot (whole groups);
    stages: ring slots; occupancy / min_splits: the K split as in :func:`scout_mm.kernels.int4_mma._split`."""
    return {"kind": "mma_ws", "num_warps": warps, "stage_k": stage_k, "stages": stages, "occupancy": occupancy,
            "min_splits": min_splits, "loader_regs": loader_regs, "maxnreg": maxnreg}  # fmt: skip


def supported(x: torch.Tensor, qweight: torch.Tensor, group_size: int) -> bool:
    """Hopper, bf16/fp16, 1..16 rows, groups of 32k, TMA-readable rows (N % 4 == 0, 16-byte aligned bases)."""
    return (
        x.is_cuda
        and torch.cuda.get_device_capability(x.device) == (9, 0)
        and x.dtype in (torch.bfloat16, torch.float16)
        and 1 <= x.shape[0] <= 16
        and group_size % 32 == 0
        and qweight.shape[-1] % 4 == 0
        and qweight.data_ptr() % 16 == 0
        and qweight.is_contiguous()
    )


def int4_linear_mma_ws(
    x, qweight, scales, zeros, group_size: int, config: dict | None = None
) -> torch.Tensor:
    """:func:`scout_mm.kernels.int4_mma.int4_linear_mma` through the warp-specialised TMA producer."""
    check_linear_input(x, qweight, scales, zeros, group_size)
    if not supported(x, qweight, group_size):
        raise ValueError(
            f"int4_linear_mma_ws needs Hopper, bf16/fp16 x of 1..16 rows, group size % 32 == 0 and N % 4 == 0; got "
            f"x {tuple(x.shape)} {x.dtype} on {x.device}, N={qweight.shape[-1]}, group size {group_size}"
        )
    cfg = config or ws_config()
    warps = cfg["num_warps"]
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    m_rows, size_k = x.shape
    size_n = qweight.shape[-1]
    block_m = 8 if m_rows <= 8 else 16
    sb = max(1, cfg["stage_k"] // group_size)
    n_groups = scales.shape[0]
    n_tiles = triton.cdiv(size_n, 32 * warps)
    split_k, per_split = _split(n_groups, n_tiles, cfg["occupancy"], sb, x.device, cfg.get("min_splits", 1))
    out = torch.empty(m_rows, size_n, dtype=x.dtype, device=x.device)
    fused = split_k > 1
    if fused:
        part = torch.empty(split_k, block_m, size_n, dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, n_tiles)
    else:
        part, counters = out, out
    set_descriptor_allocator(x.device)
    extra = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}
    _mma_ws_kernel[(n_tiles, split_k)](
        x, qweight, scales, zeros if zeros is not None else scales, out, part, counters,
        m_rows, size_n, size_k, n_groups, per_split, split_k, out.stride(0),
        G=group_size, SB=sb, SYMMETRIC=zeros is None, BLOCK_M=block_m, W=warps, STAGES=cfg["stages"],
        FUSED_SPLIT=fused, SPLIT_MAX=triton.next_power_of_2(split_k) if fused else 1,
        LOADER_REGS=cfg["loader_regs"], num_warps=warps, **extra,
    )  # fmt: skip
    return out
