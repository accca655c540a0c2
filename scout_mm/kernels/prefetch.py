"""Ask the L2 cache for byte ranges of device memory ahead of their use (Hopper ``cp.async.bulk.prefetch.L2``).

A batch-1 decode step alternates weight-streaming matmuls, which keep HBM busy, with short latency-bound kernels
(RoPE, KV writes, decode attention, norms, the router) during which HBM is nearly idle. A prefetch issued when
a matmul ends fills the L2 with the next matmul's weights during those kernels, so that matmul reads part of its
stream from the L2. :mod:`scout_mm.prefetch` decides what to ask for and when; this module only asks.

A prefetch is a hint: it reads nothing into registers, writes nothing, and is never waited for, so the results
of every kernel are the same with or without it. :func:`l2_prefetch` therefore does nothing where the
instruction does not exist (devices below compute capability 9.0, the CPU, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Ranges one launch takes (more are split over several launches).
MAX_RANGES = 4
# Bytes of one prefetch instruction (one per thread) and threads per program: 128 KB per program.
CHUNK = 4096
THREADS = 32


@triton.jit
def _l2_prefetch_kernel(a0, a1, a2, a3, n0, n1, n2, n3, v1, v2, v3, v_end, log_ptr, CHUNK: tl.constexpr,
                        THREADS: tl.constexpr, LOG: tl.constexpr):  # fmt: skip
    """Range r is ``n_r`` bytes at address ``a_r``; it starts at byte ``v_r`` (a multiple of ``CHUNK``; v0 = 0) of
    a virtual concatenation of all ranges that ends at ``v_end``. Each thread asks for one ``CHUNK`` of it.
    ``LOG`` (tests, and the interpreter, which has no inline PTX): write each thread's (address, bytes, asks) to
    ``log_ptr`` instead of asking."""
    off = (tl.program_id(0) * THREADS + tl.arange(0, THREADS)).to(tl.int64) * CHUNK
    in1 = off >= v1
    in2 = off >= v2
    in3 = off >= v3
    base = tl.where(in3, a3, tl.where(in2, a2, tl.where(in1, a1, a0)))
    start = tl.where(in3, v3, tl.where(in2, v2, tl.where(in1, v1, 0)))
    size = tl.where(in3, n3, tl.where(in2, n2, tl.where(in1, n1, n0)))
    local = off - start
    nbytes = tl.minimum(size - local, CHUNK).to(tl.int32)
    ok = ((off < v_end) & (local < size)).to(tl.int32)
    if LOG:
        row = log_ptr + (off // CHUNK) * 3
        tl.store(row, base + local)
        tl.store(row + 1, nbytes.to(tl.int64))
        tl.store(row + 2, ok.to(tl.int64))
        return
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }",
        "=r,l,r,r", [base + local, ok, nbytes], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@functools.cache
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def supported(device: torch.device) -> bool:
    """Whether :func:`l2_prefetch` issues anything on ``device``: a CUDA device of compute capability >= 9.0,
    compiled kernels (not ``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def aligned_ranges(ranges) -> list[tuple[int, int]]:
    """(address, bytes) pairs shrunk to 16-byte boundaries (the instruction's alignment; a hint may drop the
    few bytes at the ends) without the empty ones."""
    out = []
    for address, nbytes in ranges:
        first = -(-address // 16) * 16
        end = (address + nbytes) // 16 * 16
        if end > first:
            out.append((first, end - first))
    return out


def launch_layout(ranges) -> list[tuple[tuple[int, ...], int]]:
    """(kernel arguments, programs) of each launch for aligned (address, bytes) ranges, at most
    :data:`MAX_RANGES` per launch (unused slots repeat the first address with 0 bytes)."""
    launches = []
    for i in range(0, len(ranges), MAX_RANGES):
        group = list(ranges[i : i + MAX_RANGES])
        starts, v = [], 0
        for _, nbytes in group:
            starts.append(v)
            v += triton.cdiv(nbytes, CHUNK) * CHUNK
        while len(group) < MAX_RANGES:
            group.append((group[0][0], 0))
            starts.append(v)
        addresses = tuple(a for a, _ in group)
        sizes = tuple(n for _, n in group)
        launches.append(((*addresses, *sizes, *starts[1:], v), triton.cdiv(v, CHUNK * THREADS)))
    return launches


def logged_requests(ranges, device: torch.device | str = "cpu") -> list[tuple[int, int]]:
    """The (address, bytes) requests the kernel makes for ``ranges`` (already aligned), computed by the kernel
    itself in its ``LOG`` form (on CPU under ``TRITON_INTERPRET=1``): what the tests check the layout with."""
    out = []
    for args, programs in launch_layout(ranges):
        log = torch.zeros(programs * THREADS, 3, dtype=torch.int64, device=device)
        _l2_prefetch_kernel[(programs,)](*args, log, CHUNK=CHUNK, THREADS=THREADS, LOG=True, num_warps=1)
        out += [(a, n) for a, n, ok in log.tolist() if ok]
    return out


def l2_prefetch(ranges, device: torch.device) -> int:
    """Ask the L2 of ``device`` for the (address, bytes) ``ranges`` on the current stream; returns the bytes asked
    for (0 where :func:`supported` is False: nothing is launched). The ranges must stay allocated until the
    kernels ran (the caller's weights)."""
    if not supported(device):
        return 0
    ranges = aligned_ranges(ranges)
    for args, programs in launch_layout(ranges):
        _l2_prefetch_kernel[(programs,)](*args, None, CHUNK=CHUNK, THREADS=THREADS, LOG=False, num_warps=1)
    return sum(n for _, n in ranges)
