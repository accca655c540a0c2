"""Int4 W4A16 kernels vs bf16 matmul and tinygemm (``torch._weight_int4pack_mm``) at Scout shapes, one GPU.

    PYTHONPATH=. python bench/bench_int4.py [--sections tune,linear,moe,scout] [--out bench/results/int4_h100.md]

- tune: sweeps a few configs of the GEMV (M=1) and of the nibble-dot GEMM (M=16) and prints every candidate;
  ``scout_mm/kernels/int4.py::TUNED`` records the winners by hand.
- linear: N x K = 16384 x 5120 and 5120 x 8192, M = 1, 16, 64, 4096: bf16 ``x @ W``, tinygemm (group 128,
  inner k tiles 8), ours (dispatch as shipped). TB/s count the packed Int4 weight bytes (K * N / 2; scales
  are +1.6% on top, not counted), TFLOPS count 2 M N K.
- moe: Scout experts (E=16, H=5120, I=8192, top-1): ours vs the bf16 fused Triton MoE at T = 1, 16, 64, 512,
  4096; TB/s count the Int4 bytes of the experts the tokens touch.
- scout: the ``scout-17b-16e`` preset built directly in Int4 on the GPU with random weights (no bf16 expert is
  ever made): weight memory, prefill tokens/s of an 8K prompt and batch-1 decode tokens/s after it — default
  build, then with the embedding table in pinned host memory, then also with an Int4 LM head — and a kernel
  profile of the last one's decode step.
- profile: the kernel profile (torch.profiler over CUDA-graph replays) of the default build's decode step.
- shapes: the one-row dense GEMV configs recorded per Scout decode shape vs the K-split rule, and the Scout
  decode step with and without them.
- moeshapes: the decode MoE's two launches (T=1, one and two slots) timed one by one over candidate configs, the
  whole MoE with the best of them as a ``moe_gemv_by_shape`` table, and the Scout decode step with and without it.
- earlyids: the Scout decode step with the MoE down launch reading its routing ids before / after its PDL wait.
- mma16: the tensor-core few-rows kernel (``int4_mma``) at 2, 4, 8 and 16 rows on the four Scout shapes, its
  shipped config against variants (``MMA_VARIANTS``), tinygemm beside them, interleaved rounds.
- ropewrite: the Scout decode step with the RoPE layers' rotation and KV write in one kernel and in two.
- grid / splitstep: the decode GEMV's K-split program count (occupancy ceiling or least-makespan rule) at every
  Scout decode shape, and the Scout decode step with each rule (plus the step with the chunked layers mid-chunk).

Timing: each op is captured ``CALLS`` times into one CUDA graph, rotating over weight copies (and routing
choices) so that no weight is served from the 50 MB L2; the median over replays / CALLS is reported.
Random data, never zeros.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
import traceback
import warnings

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from scout_mm.config import write_text_atomically
from scout_mm.kernels import int4
from scout_mm.kernels.int4 import _gemm, _gemv

CALLS = 16
HIDDEN, INTER, EXPERTS, GROUP = 5120, 8192, 16, 128
LINEAR_SHAPES = [(16384, 5120), (5120, 8192)]  # (N, K)
ROWS = [1, 16, 64, 4096]
TOKENS = [1, 16, 64, 512, 4096]
SHIPPED_GEMV = dict(int4.TUNED["gemv"])  # TUNED["gemv"] at import, before any --adopt-tuned
MOE_EXTRA = []  # more GEMV configs timed on the decode MoE (T <= GEMV_MAX_ROWS) in the same run


def _gemv_candidates():
    """M=1 sweep: the three code unpackings x register prefetch on two tiles, then tiles / warps / occupancy
    with the cheapest unpacking, then eviction hints and programmatic dependent launch."""
    out = [
        _gemv(bn, bk, 4, 1, occ, unpack=u, prefetch=p)
        for bn, bk, occ in ((32, 512, 8), (64, 256, 4))
        for u in (0, 1, 2)
        for p in (False, True)
    ]
    out.append(_gemv(32, 512, 4, 3, 8, unpack=0))  # the shipped config before this sweep
    for bn, bk in ((32, 512), (64, 256), (64, 512), (32, 1024), (128, 128), (128, 256), (256, 64)):
        for warps in (4, 8):
            for occ in (4, 8, 16):
                cfg = _gemv(bn, bk, warps, 1, occ, unpack=2, prefetch=True)
                if cfg not in out:
                    out.append(cfg)
    for bn, bk, occ in ((32, 512, 8), (64, 256, 4), (64, 512, 4)):
        for evict, pdl in (("evict_first", False), ("", True), ("evict_first", True)):
            out.append(_gemv(bn, bk, 4, 1, occ, unpack=2, prefetch=True, evict=evict, pdl=pdl))
    return out


def _pipe_candidates():
    """M=1 sweep of the pipelined loaders (cp.async = 1, TMA = 2): tile x stages x occupancy, unpack 2, with
    the shipped config first as the anchor of the same run."""
    out = [dict(int4.TUNED["gemv"])]
    for bn, bk, warps in (
        (64, 256, 4),
        (128, 128, 4),
        (128, 256, 4),
        (256, 128, 8),
        (32, 512, 4),
        (64, 512, 8),
    ):
        for stages, occ in ((3, 4), (5, 2), (4, 2), (3, 8)):
            out.append(_gemv(bn, bk, warps, stages, occ, unpack=2, loader=2))
        out.append(_gemv(bn, bk, warps, 4, 4, unpack=2, loader=1))
    return out


PREVIOUS_GEMV = _gemv(64, 256, 4, 1, 4, unpack=2, prefetch=True, evict="evict_first")  # TUNED of 6f172cd


def _overlap_candidates():
    """M=1 sweep of the fixed-cost cuts on the register-prefetch GEMV: unrolled split-K epilogue, PDL with the
    trigger after the wait; the config of 6f172cd first. (Run 2 of 2026-11-24 also had a bulk L2 prefetch of
    each program's weight range, commit 46ff13c: slower everywhere, removed.)"""
    out = [dict(PREVIOUS_GEMV)]
    for bn, bk, warps, occ in ((64, 256, 4, 4), (32, 512, 4, 8), (64, 256, 4, 2), (128, 128, 4, 4)):
        base = dict(unpack=2, prefetch=True, evict="evict_first")
        for extra in (dict(reduce_unrolled=True), dict(pdl=1), dict(pdl=2, reduce_unrolled=True)):
            cfg = _gemv(bn, bk, warps, 1, occ, **base, **extra)
            if (bn, bk, occ) != (64, 256, 4) and extra.get("pdl") == 1 or cfg in out:
                continue
            out.append(cfg)
        if (bn, bk, occ) != (64, 256, 4):
            out.append(_gemv(bn, bk, warps, 1, occ, **base))
    return out


def _cap_candidates():
    """The shipped config, the same with occupancy 4 as a floor (the config of 85c472d), and K splits capped at
    occupancy (programs per SM) 4, 4.5, 5."""
    out = [dict(int4.TUNED["gemv"]), dict(int4.TUNED["gemv"], occupancy=4, split_cap=False)]
    for occ in (4, 4.5, 5):
        out.append(dict(int4.TUNED["gemv"], occupancy=occ, split_cap=True))
    return out


def _final_candidates():
    """The shipped config, the one before it, and split-K sizes (occupancy) around the shipped one."""
    out = [dict(int4.TUNED["gemv"]), dict(PREVIOUS_GEMV)]
    base = dict(unpack=2, prefetch=True, evict="evict_first", reduce_unrolled=True)
    for bn, bk, warps, occ in (
        (64, 256, 4, 2),
        (64, 256, 4, 3),
        (64, 256, 4, 5),
        (64, 256, 4, 6),
        (64, 256, 8, 3),
        (32, 512, 4, 4),
        (32, 512, 4, 6),
        (128, 128, 4, 3),
    ):
        out.append(_gemv(bn, bk, warps, 1, occ, **base))
    return out


CANDIDATES = {
    1: _gemv_candidates(),
    16: [_gemm(16, bn, bk, w, 3, occ, nibble_dots=True)
         for bn, bk, w, occ in ((128, 128, 4, 2), (256, 128, 8, 2), (128, 128, 4, 4), (64, 128, 4, 4),
                                (128, 256, 8, 2), (256, 128, 8, 4), (256, 256, 8, 2), (128, 128, 8, 2),
                                (64, 256, 4, 4), (128, 128, 4, 8))],
}  # fmt: skip
TUNE_ROWS = [1, 16]  # the tl.dot tile kernels (64 rows and up) did not change since the last sweep


def graph_us(fn, calls: int = CALLS, replays: int = 10) -> float:
    """Median per-call microseconds of ``calls`` invocations captured into one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return statistics.median(times)


def rotating(items):
    state = {"i": 0}

    def next_item():
        state["i"] += 1
        return items[state["i"] % len(items)]

    return next_item


def packed(lead, size_k, size_n, copies):
    out = []
    for _ in range(copies):
        qweight = torch.randint(
            -(2**31), 2**31 - 1, (*lead, size_k // 8, size_n), dtype=torch.int32, device="cuda"
        )
        scales = (torch.rand(*lead, size_k // GROUP, size_n, device="cuda") * 0.002 + 0.001).to(
            torch.bfloat16
        )
        out.append((qweight, scales, None))
    return out


def copies_for(nbytes: int) -> int:
    return max(2, min(8, -(-200_000_000 // nbytes)))  # >= 200 MB in rotation: 4x the L2


def section_tune(rows_out, warm=None, adopt=False):
    """Times every candidate at both Scout shapes. ``warm=(i, n)``: only run the i-th of n shards of the
    candidates once (fills Triton's compile cache from parallel processes; nothing is timed). ``adopt``: the
    config with the least summed time over the two shapes replaces TUNED's entry in this process, so later
    sections measure it."""
    if warm is not None:
        shard, n_shards = warm
        for size_n, size_k in LINEAR_SHAPES:
            weight = packed((), size_k, size_n, 1)[0]
            for m_rows in TUNE_ROWS:
                x = torch.randn(m_rows, size_k, device="cuda", dtype=torch.bfloat16)
                for i, cfg in enumerate(CANDIDATES[m_rows]):
                    if i % n_shards == shard:
                        try:
                            int4.int4_linear(x, *weight, GROUP, config=cfg)
                        except Exception as e:
                            print(f"warm {_cfg_str(cfg)}: {type(e).__name__}: {e}", flush=True)
        torch.cuda.synchronize()
        return
    rows_out += ["", "## Config sweep (ours, forced configs)", "",
                 "| N x K | M | config | us | Int4 TB/s | TFLOPS |", "|---|---|---|---|---|---|"]  # fmt: skip
    best = {}
    totals = {}
    for size_n, size_k in LINEAR_SHAPES:
        weights = packed((), size_k, size_n, copies_for(size_k * size_n // 2))
        for m_rows in TUNE_ROWS:
            candidates = CANDIDATES[m_rows]
            x = torch.randn(m_rows, size_k, device="cuda", dtype=torch.bfloat16)
            for cfg in candidates:
                pick = rotating(weights)
                try:
                    us = graph_us(
                        lambda x=x, cfg=cfg, pick=pick: int4.int4_linear(x, *pick(), GROUP, config=cfg)
                    )
                except Exception as e:  # a config that does not compile or fit is reported, not fatal
                    rows_out.append(
                        f"| {size_n}x{size_k} | {m_rows} | {_cfg_str(cfg)} | failed: {type(e).__name__} | | |"
                    )
                    print(rows_out[-1], flush=True)
                    continue
                tbs = size_k * size_n / 2 / us / 1e6
                tflops = 2 * m_rows * size_n * size_k / us / 1e6
                rows_out.append(
                    f"| {size_n}x{size_k} | {m_rows} | {_cfg_str(cfg)} | {us:.1f} | {tbs:.2f} | {tflops:.1f} |"
                )
                print(rows_out[-1], flush=True)
                key = (size_n, size_k, m_rows)
                if key not in best or us < best[key][0]:
                    best[key] = (us, _cfg_str(cfg))
                entry = totals.setdefault((m_rows, _cfg_str(cfg)), [0.0, 0, cfg])
                entry[0] += us
                entry[1] += 1
        del weights
        torch.cuda.empty_cache()
    rows_out += ["", "Best per case: " + "; ".join(f"{k}: {v[1]} {v[0]:.1f} us" for k, v in best.items())]
    for m_rows in TUNE_ROWS:
        full = [
            (t, name, cfg)
            for (m, name), (t, n, cfg) in totals.items()
            if m == m_rows and n == len(LINEAR_SHAPES)
        ]
        if not full:
            continue
        # PDL overlaps back-to-back launches of the timed loop itself; adopt the best without it (reported apart)
        plain = [e for e in full if not e[2].get("pdl")]
        t, name, cfg = min(plain or full, key=lambda e: e[0])
        rows_out.append(f"Best summed over both shapes, M={m_rows}: {name} {t:.1f} us")
        if adopt:
            int4.TUNED["gemv" if m_rows == 1 else "gemm_small"] = cfg
            rows_out[-1] += " (adopted for the sections below)"
    print("\n".join(rows_out[-3:]), flush=True)


@triton.jit
def _stream_kernel(qw_ptr, out_ptr, size_n, n_words, words_per_split, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    """Reads a (K/8, N) int32 matrix in the GEMV's tiles and grid (column tile x K split) and XORs the words:
    the memory side of the GEMV with no math."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_R)
    begin = tl.program_id(2) * words_per_split
    end = tl.minimum(begin + words_per_split, n_words)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int32)
    for r0 in range(begin, end, BLOCK_R):
        mask = ((r0 + rows) < end)[:, None] & (offs_n < size_n)[None, :]
        acc ^= tl.load(qw_ptr + (r0 + rows)[:, None] * size_n + offs_n[None, :], mask=mask, other=0,
                       eviction_policy=EVICT)  # fmt: skip
    tl.store(out_ptr + tl.program_id(2) * size_n + offs_n, tl.xor_sum(acc, axis=0), mask=offs_n < size_n)


@triton.jit
def _stream_pipe_kernel(qw_ptr, qw_desc, out_ptr, size_n, n_words, words_per_split, BLOCK_R: tl.constexpr,
                        BLOCK_N: tl.constexpr, LOADER: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """The memory side of the pipelined GEMV loaders (``int4._gemv_columns`` LOADER 1 / 2): the same grid as
    :func:`_stream_kernel`, tiles read in a ``tl.range(num_stages=STAGES)`` loop, by pointer loads (which the
    pipeliner makes ``cp.async``) or through a tensor descriptor (TMA), XOR-ed, no math."""
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_R)
    begin = tl.program_id(2) * words_per_split
    end = tl.minimum(begin + words_per_split, n_words)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.int32)
    for r0 in tl.range(begin, end, BLOCK_R, num_stages=STAGES):
        if LOADER == 2:
            acc ^= qw_desc.load([r0, n0])
        else:
            mask = ((r0 + rows) < end)[:, None] & (offs_n < size_n)[None, :]
            acc ^= tl.load(qw_ptr + (r0 + rows)[:, None] * size_n + offs_n[None, :], mask=mask, other=0)
    tl.store(out_ptr + tl.program_id(2) * size_n + offs_n, tl.xor_sum(acc, axis=0), mask=offs_n < size_n)


# (BLOCK_N, BLOCK_K, warps, occupancy, stages) of the pipelined probe; occupancy 1-2 = one long stream per
# program and SM (a persistent-like grid), 4-8 = the present GEMV's grid
PIPE_TILES = [(32, 512, 4, 8, 3), (64, 256, 4, 4, 3), (64, 256, 4, 4, 5), (64, 256, 4, 2, 5), (128, 128, 4, 4, 4),
              (128, 256, 4, 2, 4), (128, 256, 4, 1, 6), (128, 256, 4, 4, 3), (256, 128, 8, 2, 4),
              (256, 128, 8, 1, 6), (64, 512, 4, 2, 4), (256, 256, 8, 1, 3)]  # fmt: skip

# the register-load stream's best tiles of the 2026-11-24 sweep (bench/results/int4_gemv_h100.md, run 1)
STREAM_TILES = [(32, 512, 4, 8), (64, 256, 4, 4), (64, 256, 4, 16)]


def section_probe(rows_out):
    """What limits the GEMV: torch copy (read + write), and a no-math streaming read in the GEMV's own tiles and
    K-split grid (with and without evict_first), at both Scout shapes."""
    rows_out += ["", "## Probe: memory side of the M=1 GEMV (no math)", "",
                 "| N x K | kernel | tile (BLOCK_N, BLOCK_K, warps, occupancy) | programs | us | TB/s read |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
    for size_n, size_k in LINEAR_SHAPES:
        nbytes = size_k * size_n // 2
        weights = [w[0] for w in packed((), size_k, size_n, copies_for(nbytes))]
        pick = rotating(weights)
        t = graph_us(lambda pick=pick: pick().clone())
        rows_out.append(f"| {size_n}x{size_k} | torch clone (read + write) | - | - | {t:.1f} | "
                        f"{nbytes / t / 1e6:.2f} (x2 with the writes: {2 * nbytes / t / 1e6:.2f}) |")  # fmt: skip
        print(rows_out[-1], flush=True)
        n_groups = size_k // GROUP
        for bn, bk, warps, occ in STREAM_TILES:
            for evict in ("", "evict_first"):
                n_tiles = triton.cdiv(size_n, bn)
                split_k, per_split = int4._split(n_groups, n_tiles, occ, bk, GROUP, torch.device("cuda"))
                out = torch.empty(split_k, size_n, dtype=torch.int32, device="cuda")

                def run(
                    bn=bn,
                    bk=bk,
                    warps=warps,
                    split_k=split_k,
                    per_split=per_split,
                    evict=evict,
                    out=out,
                    pick=pick,
                    n_tiles=n_tiles,
                    size_n=size_n,
                    size_k=size_k,
                ):
                    _stream_kernel[(n_tiles, 1, split_k)](pick(), out, size_n, size_k // 8, per_split * GROUP // 8,
                                                          BLOCK_R=bk // 8, BLOCK_N=bn, EVICT=evict, num_warps=warps)  # fmt: skip

                t = graph_us(run)
                rows_out.append(f"| {size_n}x{size_k} | stream{' evict_first' if evict else ''} | "
                                f"({bn}, {bk}, {warps}, {occ}) | {n_tiles * split_k} | {t:.1f} | {nbytes / t / 1e6:.2f} |")  # fmt: skip
                print(rows_out[-1], flush=True)
        for bn, bk, warps, occ, stages in PIPE_TILES:
            for loader in (1, 2):
                n_tiles = triton.cdiv(size_n, bn)
                split_k, per_split = int4._split(n_groups, n_tiles, occ, bk, GROUP, torch.device("cuda"))
                out = torch.empty(split_k, size_n, dtype=torch.int32, device="cuda")
                descs = rotating(
                    [TensorDescriptor(w, [size_k // 8, size_n], [size_n, 1], [bk // 8, bn]) for w in weights]
                )
                pick_w = rotating(weights)

                def run_pipe(bn=bn, bk=bk, warps=warps, stages=stages, loader=loader, split_k=split_k,
                             per_split=per_split, out=out, pick_w=pick_w, descs=descs, n_tiles=n_tiles, size_n=size_n,
                             size_k=size_k):  # fmt: skip
                    _stream_pipe_kernel[(n_tiles, 1, split_k)](pick_w(), descs(), out, size_n, size_k // 8,
                                                               per_split * GROUP // 8, BLOCK_R=bk // 8, BLOCK_N=bn,
                                                               LOADER=loader, STAGES=stages, num_warps=warps)  # fmt: skip

                try:
                    t = graph_us(run_pipe)
                except Exception as e:
                    rows_out.append(f"| {size_n}x{size_k} | {('cp.async', 'TMA')[loader - 1]} x{stages} | "
                                    f"({bn}, {bk}, {warps}, {occ}) | | failed: {type(e).__name__} | |")  # fmt: skip
                    print(rows_out[-1], e, flush=True)
                    continue
                rows_out.append(f"| {size_n}x{size_k} | {('cp.async', 'TMA')[loader - 1]} x{stages} | "
                                f"({bn}, {bk}, {warps}, {occ}) | {n_tiles * split_k} | {t:.1f} | {nbytes / t / 1e6:.2f} |")  # fmt: skip
                print(rows_out[-1], flush=True)
        del weights
        torch.cuda.empty_cache()


def _select_candidates(which: str) -> None:
    """``--candidates pipe | overlap | final``: the M=1 sweep is that list (:func:`_pipe_candidates`,
    :func:`_overlap_candidates`, :func:`_final_candidates`), M=16 is not swept (its kernel did not change);
    MOE_EXTRA: configs also timed on the decode MoE."""
    global TUNE_ROWS
    makers = {"pipe": _pipe_candidates, "overlap": _overlap_candidates, "final": _final_candidates,
              "cap": _cap_candidates}  # fmt: skip
    if which in makers:
        CANDIDATES[1] = makers[which]()
        TUNE_ROWS = [1]
    if which == "overlap":
        MOE_EXTRA[:] = [c for c in CANDIDATES[1] if c.get("pdl") == 2 or c.get("reduce_unrolled")][:4]
    if which == "cap":
        MOE_EXTRA[:] = CANDIDATES[1][1:]
    if which == "final":
        MOE_EXTRA[:] = [dict(PREVIOUS_GEMV), _gemv(64, 256, 4, 1, 4, unpack=2, prefetch=True, evict="evict_first",
                                                   reduce_unrolled=True, pdl=2)]  # fmt: skip


def _cfg_str(cfg):
    if cfg["kind"] == "dequant":
        return "dequant+cuBLAS"
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "occupancy")
    kind = "gemm-nibble" if cfg.get("nibble_dots") else cfg["kind"]
    flags = ""
    if cfg["kind"] == "gemv":
        flags = f" u{cfg.get('unpack', 1)}" + ("", " cp.async", " TMA")[cfg.get("loader", 0)] + " prefetch" * bool(cfg.get("prefetch")) + (
            f" {cfg['evict']}" if cfg.get("evict") else "") + " pdl" * bool(cfg.get("pdl"))  # fmt: skip
    if cfg["kind"] == "gemv":
        flags += " red-unrolled" * bool(cfg.get("reduce_unrolled")) + " split-cap" * bool(
            cfg.get("split_cap")
        )
        flags = flags.replace(" pdl", f" pdl{int(cfg['pdl'])}") if cfg.get("pdl") else flags
    return kind + "(" + ",".join(str(cfg[k]) for k in keys if k in cfg) + ")" + flags


def tinygemm(size_k, size_n, copies):
    packs = []
    for _ in range(copies):
        w = torch.randint(0, 256, (size_n, size_k // 2), dtype=torch.uint8, device="cuda")
        packed_w = torch._convert_weight_to_int4pack(w, 8)
        sz = (torch.rand(size_k // GROUP, size_n, 2, device="cuda") * 0.01).to(torch.bfloat16)
        packs.append((packed_w, sz))
    return packs


def tinygemm_call(x, pick_t):
    """A call of tinygemm on ``x`` with the next of the rotating (packed weight, scales and zeros) ``pick_t``."""

    def run():
        w, sz = pick_t()
        return torch._weight_int4pack_mm(x, w, GROUP, sz)

    return run


def section_linear(rows_out):
    rows_out += ["", "## Linear layers (group 128, symmetric, bf16)", "",
                 "| N x K | M | bf16 matmul us (TFLOPS) | tinygemm us (TB/s, TFLOPS) | ours us (TB/s, TFLOPS) | ours / tinygemm | ours / bf16 |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
    for size_n, size_k in LINEAR_SHAPES:
        n_int4 = copies_for(size_k * size_n // 2)
        weights = packed((), size_k, size_n, n_int4)
        dense = [torch.randn(size_k, size_n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        try:
            tiny = tinygemm(size_k, size_n, n_int4)
        except Exception as e:
            print(f"tinygemm unavailable: {e}", flush=True)
            tiny = None
        for m_rows in ROWS:
            x = torch.randn(m_rows, size_k, device="cuda", dtype=torch.bfloat16)
            flops = 2 * m_rows * size_n * size_k
            wbytes = size_k * size_n / 2
            pick_d, pick_q = rotating(dense), rotating(weights)
            t_bf16 = graph_us(lambda x=x, p=pick_d: x @ p())
            t_ours = graph_us(lambda x=x, p=pick_q: int4.int4_linear(x, *p(), GROUP))
            if tiny is not None:
                t_tiny = graph_us(tinygemm_call(x, rotating(tiny)))
                tiny_s = f"{t_tiny:.1f} ({wbytes / t_tiny / 1e6:.2f}, {flops / t_tiny / 1e6:.1f})"
                ratio = f"{t_tiny / t_ours:.2f}x"
            else:
                tiny_s, ratio = "n/a", "n/a"
            rows_out.append(
                f"| {size_n}x{size_k} | {m_rows} | {t_bf16:.1f} ({flops / t_bf16 / 1e6:.1f}) | {tiny_s} | "
                f"{t_ours:.1f} ({wbytes / t_ours / 1e6:.2f}, {flops / t_ours / 1e6:.1f}) | {ratio} | "
                f"{t_bf16 / t_ours:.2f}x |"
            )
            print(rows_out[-1], flush=True)
        del weights, dense, tiny
        torch.cuda.empty_cache()


MMA_CANDIDATES = [dict(warps=2, step=1, prefetch=True, occupancy=4.0), dict(warps=2, step=2, prefetch=True, occupancy=4.0),
                  dict(warps=2, step=1, prefetch=False, occupancy=4.0), dict(warps=4, step=1, prefetch=True, occupancy=4.0),
                  dict(warps=4, step=2, prefetch=True, occupancy=4.0), dict(warps=2, step=1, prefetch=True, occupancy=8.0),
                  dict(warps=1, step=1, prefetch=True, occupancy=8.0), dict(warps=2, step=2, prefetch=False, occupancy=8.0)]  # fmt: skip
MMA_ROWS = [1, 2, 4, 8, 16]


def section_mma(rows_out):
    """The tensor-core few-rows kernel (scout_mm.kernels.int4_mma) beside tinygemm, the shipped dispatch
    (int4_linear: int4_mma for 2..16 rows) and the Triton kernels int4_linear ran there before (FMA GEMV for
    M <= 2, nibble-dot tl.dot above), same weights, same run."""
    from scout_mm.kernels import int4_mma

    rows_out += ["", "## Tensor-core few-rows kernel (int4_mma; group 128, symmetric, bf16)", "",
                 "| N x K | M | kernel | us | Int4 TB/s | vs tinygemm | vs int4_linear |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for size_n, size_k in LINEAR_SHAPES:
        copies = copies_for(size_k * size_n // 2)
        pick = rotating(packed((), size_k, size_n, copies))
        pick_t = rotating(tinygemm(size_k, size_n, copies))
        wbytes = size_k * size_n / 2
        best = None
        for m_rows in MMA_ROWS:
            x = torch.randn(m_rows, size_k, device="cuda", dtype=torch.bfloat16)
            t_tiny = graph_us(tinygemm_call(x, pick_t))
            t_ours = graph_us(lambda x=x, pick=pick: int4.int4_linear(x, *pick(), GROUP))
            triton_cfg = int4.pick_config(m_rows)
            t_triton = graph_us(
                lambda x=x, pick=pick, c=triton_cfg: int4.int4_linear(x, *pick(), GROUP, config=c)
            )
            timings = [
                ("tinygemm", t_tiny),
                ("int4_linear (shipped dispatch)", t_ours),
                (f"int4_linear Triton {triton_cfg['kind']} (dispatch before int4_mma)", t_triton),
            ]
            cands = MMA_CANDIDATES if m_rows in (1, 16) or best is None else [best]
            for c in cands:
                cfg = int4_mma.mma_config(**c)
                t = graph_us(
                    lambda x=x, cfg=cfg, pick=pick: int4_mma.int4_linear_mma(x, *pick(), GROUP, config=cfg)
                )
                timings.append(
                    (
                        f"mma(w{c['warps']},s{c['step']},{'pf' if c['prefetch'] else 'nopf'},occ{c['occupancy']:g})",
                        t,
                    )
                )
                if m_rows == 1 and (best is None or t < best[1]):
                    best = (c, t)
            if m_rows == 1:
                best = best[0]
            for name, t in timings:
                rows_out.append(f"| {size_n}x{size_k} | {m_rows} | {name} | {t:.1f} | {wbytes / t / 1e6:.2f} | "
                                f"{t_tiny / t:.2f}x | {t_ours / t:.2f}x |")  # fmt: skip
                print(rows_out[-1], flush=True)
        torch.cuda.empty_cache()


# rows -> {name: change to the shipped config of those rows}; session 9's candidates (its earlier runs also had
# an L1 prefetch of x, '.cg' weight loads and register caps, all slower: bench/results/int4_gemv_h100.md)
MMA_VARIANTS = {
    16: {
        "shipped": None,
        "prefetch_x": dict(prefetch_x=True),
        "step2 prefetch_x": dict(step=2, prefetch_x=True),
        "step2 prefetch_x, 2 splits": dict(step=2, prefetch_x=True, min_splits=2),
        "3 splits": dict(min_splits=3),
    },
    **{
        rows: {
            "shipped": None,
            "session 8 (no prefetch_x, 4 per SM)": dict(prefetch_x=False, occupancy=4.0),
            "prefetch_x, 4 per SM": dict(occupancy=4.0),
        }
        for rows in (8, 4, 2)
    },
}


def section_mma16(rows_out, rounds: int = 2):
    """int4_mma at 2 to 16 rows on the Scout shapes (the MoE's gate_up 16384x5120 and down 5120x8192, q|k|v
    7168x5120, o 5120x5120): the shipped config (``config_for_rows``) against variants of it, tinygemm beside
    them; ``rounds`` interleaved rounds, the median per case. The variants change one knob of the shipped
    config each (or two: ``prefetch_x`` with another)."""
    from scout_mm.kernels import int4_mma

    rows_out += ["", "## int4_mma at 2 to 16 rows: config variants (group 128, symmetric, bf16)", "",
                 "| N x K | M | kernel | us | Int4 TB/s | vs shipped | vs tinygemm |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for size_n, size_k in LINEAR_SHAPES + [(7168, 5120), (5120, 5120)]:
        copies = copies_for(size_k * size_n // 2)
        pick = rotating(packed((), size_k, size_n, copies))
        pick_t = rotating(tinygemm(size_k, size_n, copies))
        wbytes = size_k * size_n / 2
        for m_rows, variants in MMA_VARIANTS.items():
            x = torch.randn(m_rows, size_k, device="cuda", dtype=torch.bfloat16)
            shipped = int4_mma.config_for_rows(m_rows)
            cases = {"tinygemm": tinygemm_call(x, pick_t)}
            for name, change in variants.items():
                cfg = dict(shipped, **(change or {}))
                cases[name] = lambda x=x, cfg=cfg, pick=pick: int4_mma.int4_linear_mma(
                    x, *pick(), GROUP, config=cfg
                )
            times = {name: [] for name in cases}
            for _ in range(rounds):
                for name, fn in cases.items():
                    times[name].append(graph_us(fn))
            med = {name: statistics.median(t) for name, t in times.items()}
            for name, t in med.items():
                rows_out.append(f"| {size_n}x{size_k} | {m_rows} | {name} | {t:.1f} | {wbytes / t / 1e6:.2f} | "
                                f"{med['shipped'] / t:.3f}x | {med['tinygemm'] / t:.2f}x |")  # fmt: skip
                print(rows_out[-1], flush=True)
        torch.cuda.empty_cache()


def section_rows(rows_out):
    """Row-count dispatch questions, same run: (1) the FMA GEMV at 2 rows (where int4_mma is unavailable) as one
    3-D program per 2 rows vs one program per row vs the nibble-dot kernel; (2) the Int4 MoE at 32 tokens top-1
    (2 rows per touched expert: GEMV with 2-row route blocks vs 1-row blocks vs nibble-dot); (3) int4_mma at 16 rows
    with 2 or 4 warps per program on the Scout shapes (q|k|v 7168x5120 and o 5120x5120 too)."""
    from scout_mm.kernels import int4_mma

    rows_out += ["", "## Row-count dispatch (group 128, symmetric, bf16)", "",
                 "| case | kernel | us | Int4 TB/s |", "|---|---|---|---|"]  # fmt: skip
    gemv = dict(int4.TUNED["gemv"])

    def add(case, name, t, nbytes):
        rows_out.append(f"| {case} | {name} | {t:.1f} | {nbytes / t / 1e6:.2f} |")
        print(rows_out[-1], flush=True)

    for size_n, size_k in LINEAR_SHAPES:
        copies = copies_for(size_k * size_n // 2)
        pick = rotating(packed((), size_k, size_n, copies))
        x = torch.randn(2, size_k, device="cuda", dtype=torch.bfloat16)
        nbytes = size_k * size_n / 2
        for name, cfg in (("FMA GEMV, 2 rows per program (3-D)", dict(gemv, rows_per_program=4)),
                          ("FMA GEMV, 1 row per program", dict(gemv, rows_per_program=1)),
                          ("nibble-dot gemm_small", int4.TUNED["gemm_small"]),
                          ("shipped dispatch (int4_mma)", None)):  # fmt: skip
            add(f"M=2 {size_n}x{size_k}", name, graph_us(lambda c=cfg, p=pick, x=x: int4.int4_linear(x, *p(), GROUP, config=c)),
                nbytes)  # fmt: skip
        torch.cuda.empty_cache()
    gate_up = packed((EXPERTS,), HIDDEN, 2 * INTER, 1)[0]
    down = packed((EXPERTS,), INTER, HIDDEN, 1)[0]
    tokens = 32
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(tokens, 1, device="cuda", dtype=torch.bfloat16)
    routes = [torch.randint(0, EXPERTS, (tokens, 1), device="cuda") for _ in range(8)]
    touched = statistics.mean(len(r.unique()) for r in routes)
    pick_r = rotating(routes)
    for name, cfg in (("GEMV, 2-row route blocks (3-D)", dict(gemv, rows_per_program=4)),
                      ("GEMV, 1-row route blocks", dict(gemv, rows_per_program=1)),
                      ("nibble-dot gemm_small", int4.TUNED["gemm_small"]), ("shipped dispatch", None)):  # fmt: skip
        t = graph_us(lambda c=cfg, gu=gate_up, dn=down: int4.int4_moe_experts(x, weights, pick_r(), gu, dn, GROUP,
                                                                             config=c))  # fmt: skip
        add(f"MoE T={tokens} top-1 ({touched:.1f} experts)", name, t, touched * 3 * HIDDEN * INTER / 2)
    del gate_up, down
    torch.cuda.empty_cache()
    for size_n, size_k in LINEAR_SHAPES + [(7168, 5120), (5120, 5120)]:
        copies = copies_for(size_k * size_n // 2)
        pick = rotating(packed((), size_k, size_n, copies))
        x = torch.randn(16, size_k, device="cuda", dtype=torch.bfloat16)
        for warps, occ in ((2, 4.0), (4, 4.0), (2, 8.0), (4, 8.0)):
            cfg = int4_mma.mma_config(warps=warps, occupancy=occ)
            t = graph_us(lambda c=cfg, p=pick, x=x: int4_mma.int4_linear_mma(x, *p(), GROUP, config=c))
            add(f"M=16 {size_n}x{size_k}", f"int4_mma w{warps} occ{occ:g}", t, size_k * size_n / 2)
        add(f"M=16 {size_n}x{size_k}", "shipped dispatch",
            graph_us(lambda p=pick, x=x: int4.int4_linear(x, *p(), GROUP)), size_k * size_n / 2)  # fmt: skip
        torch.cuda.empty_cache()


def section_grid(rows_out):
    """K-split program counts of the decode GEMV (one row) at every Scout decode shape — q|k|v 7168x5120,
    o 5120x5120, the MoE's gate_up 16384x5120 and down 5120x8192 (dense, and inside the decode MoE at T=1 with
    one and two slots) — for several ``occupancy`` ceilings (the most programs per SM the split may make; session
    5 shipped 4.25) and the least-makespan rule (``resident_per_sm``, shipped since session 6), same run. At
    127-128 registers a 4-warp program, an H100 SM holds 4 programs, so more launch some in a second wave."""
    rows_out += ["", "## Decode GEMV: programs per launch (group 128, symmetric, bf16, M=1)", "",
                 "| case | K-split rule | programs | us | Int4 TB/s |", "|---|---|---|---|---|"]  # fmt: skip
    shipped = dict(int4.TUNED["gemv"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ceilings = [(f"ceiling {occ:g}/SM", dict(shipped, occupancy=occ, resident_per_sm=0))
                for occ in (3.0, 3.5, 4.0, 4.25, 4.5, 5.0, 6.0)]  # fmt: skip
    ceilings.append((f"least makespan, {shipped['resident_per_sm']:g}/SM (shipped)", shipped))

    def programs(n_groups, tiles, cfg):  # the ceilings keep the shipped split_cap=True
        return int4._gemv_split(cfg, n_groups, tiles, GROUP, torch.device("cuda"))[0] * tiles

    for size_n, size_k in [(7168, 5120), (5120, 5120), (16384, 5120), (5120, 8192)]:
        pick = rotating(packed((), size_k, size_n, copies_for(size_k * size_n // 2)))
        x = torch.randn(1, size_k, device="cuda", dtype=torch.bfloat16)
        tiles = -(-size_n // shipped["BLOCK_N"])
        for label, cfg in ceilings:
            t = graph_us(lambda c=cfg, p=pick, x=x: int4.int4_linear(x, *p(), GROUP, config=c))
            rows_out.append(f"| {size_n}x{size_k} | {label} | {programs(size_k // GROUP, tiles, cfg)} | {t:.1f} | "
                            f"{size_k * size_n / 2 / t / 1e6:.2f} |")  # fmt: skip
            print(rows_out[-1], flush=True)
        torch.cuda.empty_cache()
    gate_up = packed((EXPERTS,), HIDDEN, 2 * INTER, 1)[0]
    down = packed((EXPERTS,), INTER, HIDDEN, 1)[0]
    for top_k in (1, 2):
        x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        weights = torch.rand(1, top_k, device="cuda", dtype=torch.bfloat16)
        pick = rotating([torch.rand(1, EXPERTS, device="cuda").argsort(dim=1)[:, :top_k] for _ in range(8)])
        for label, cfg in ceilings:
            counts = [str(programs(n_groups, top_k * tiles, cfg))
                      for n_groups, tiles in ((HIDDEN // GROUP, INTER // 64), (INTER // GROUP, HIDDEN // 64))]  # fmt: skip
            t = graph_us(lambda c=cfg, p=pick, x=x, w=weights, gu=gate_up, dn=down: int4.int4_moe_experts(
                x, w, p(), gu, dn, GROUP, config=c))  # fmt: skip
            rows_out.append(f"| MoE T=1, {top_k} slot(s) | {label} | {' + '.join(counts)} | {t:.1f} | "
                            f"{top_k * 3 * HIDDEN * INTER / 2 / t / 1e6:.2f} |")  # fmt: skip
            print(rows_out[-1], flush=True)
    rows_out.append(f"\n({sms} SMs.)")
    del gate_up, down
    torch.cuda.empty_cache()


def section_moe(rows_out):
    from scout_mm.kernels import moe

    rows_out += ["", "## Int4 MoE (Scout experts: E=16, H=5120, I=8192, top-1, bf16)", "",
                 "| tokens | experts touched | bf16 fused MoE us | ours us | Int4 TB/s (touched experts) | ours / bf16 | ours, dequantise + bf16 MoE us |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
    gate_up = packed((EXPERTS,), HIDDEN, 2 * INTER, 1)[0]
    down = packed((EXPERTS,), INTER, HIDDEN, 1)[0]
    dense_gate_up = torch.randn(EXPERTS, HIDDEN, 2 * INTER, device="cuda", dtype=torch.bfloat16) * 0.02
    dense_down = torch.randn(EXPERTS, INTER, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    expert_bytes = 3 * HIDDEN * INTER / 2
    for tokens in TOKENS:
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)
        weights = torch.rand(tokens, 1, device="cuda", dtype=torch.bfloat16)
        routes = [torch.randint(0, EXPERTS, (tokens, 1), device="cuda") for _ in range(8)]
        touched = statistics.mean(len(r.unique()) for r in routes)
        pick_a, pick_b = rotating(routes), rotating(routes)
        t_bf16 = graph_us(
            lambda x=x, w=weights, p=pick_a: moe.moe_experts(x, w, p(), dense_gate_up, dense_down)
        )
        t_ours = graph_us(
            lambda x=x, w=weights, p=pick_b: int4.int4_moe_experts(x, w, p(), gate_up, down, GROUP)
        )
        others = [c for c in [SHIPPED_GEMV] + MOE_EXTRA if c != int4.TUNED["gemv"]]
        for cfg in others if tokens <= int4.TUNED["GEMV_MAX_ROWS"] else []:
            t_old = graph_us(lambda x=x, w=weights, p=pick_b, cfg=cfg: int4.int4_moe_experts(
                x, w, p(), gate_up, down, GROUP, config=cfg))  # fmt: skip
            label = "the shipped " if cfg == SHIPPED_GEMV else ""
            rows_out.append(f"| {tokens} | ({label}{_cfg_str(cfg)}, same run) | | {t_old:.1f} | "
                            f"{touched * expert_bytes / t_old / 1e6:.2f} | dispatch / this: {t_old / t_ours:.2f}x | |")  # fmt: skip
            print(rows_out[-1], flush=True)
        t_deq = "-"
        if tokens >= 512:
            t_deq = graph_us(
                lambda x=x, w=weights, p=pick_b: int4.int4_moe_experts(
                    x, w, p(), gate_up, down, GROUP, config={"kind": "dequant"}
                ),
                calls=4,
            )
            t_deq = f"{t_deq:.1f}"
        rows_out.append(
            f"| {tokens} | {touched:.1f} | {t_bf16:.1f} | {t_ours:.1f} | {touched * expert_bytes / t_ours / 1e6:.2f} | "
            f"{t_bf16 / t_ours:.2f}x | {t_deq} |"
        )
        print(rows_out[-1], flush=True)
    torch.cuda.empty_cache()


def build_scout_int4(fuse: bool = True):
    """The scout-17b-16e preset in Int4 on the GPU, random weights, no float copy of any quantized weight;
    ``fuse``: q|k|v and gate|up fused and the shared expert folded into the routed experts, as
    ``load_quantized`` does by default."""
    from scout_mm import ScoutConfig, ScoutForConditionalGeneration
    from scout_mm.quant import QuantConfig
    from scout_mm.quant.quantize import replace_with_empty_int4

    config = ScoutConfig.from_preset("scout-17b-16e")
    with torch.device("meta"):
        model = ScoutForConditionalGeneration(config).to(torch.bfloat16)
    replace_with_empty_int4(model, QuantConfig())
    model = model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            _fill_packed(name, b)
    model.quant_config = QuantConfig()
    if fuse:
        from scout_mm.fusion import fuse_projections, fuse_shared_expert

        fuse_shared_expert(fuse_projections(model))
    return config, model.eval()


def _fill_packed(name, buffer):
    if name.endswith("qweight"):
        buffer.random_(-(2**31), 2**31 - 1)
    else:  # scales: codes - 8 have std ~4.6, so this gives weights of std ~0.02
        buffer.fill_(0.02 / 4.6)


def int4_lm_head(model):
    """Swap the bf16 LM head for an Int4 one with random codes (what ``--quantize-lm-head`` makes)."""
    from scout_mm.quant import Int4Linear, QuantConfig

    head = model.language_model.lm_head
    new = Int4Linear(head.in_features, head.out_features, QuantConfig(), device="cuda", name="lm_head")
    for name, b in new.named_buffers():
        _fill_packed(name, b)
    model.language_model.lm_head = new
    del head


def _sizes(size):
    gb = size["total"] / 1e9
    return (f"{gb:.2f} GB = {size['total'] / 2**30:.2f} GiB on the GPU ({size['int4_weights'] / 1e9:.2f} GB packed "
            f"Int4 + {size['scales_zeros'] / 1e9:.2f} GB scales + {size['float'] / 1e9:.2f} GB bf16"
            + (f"; {size['host'] / 1e9:.2f} GB embedding table in pinned host memory" if size["host"] else "")
            + ")")  # fmt: skip


def _kernel_table(prof, steps):
    """{kernel name: (launches, device us)} per step, from a torch.profiler run over ``steps`` steps."""
    table = {}
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            us = getattr(e, "self_device_time_total", None)
            if us is None:
                us = e.self_cuda_time_total
            if us > 0:
                table[e.key] = (e.count / steps, us / steps)
    return table


FUSED_KERNELS = ("_rms_norm_kernel", "_rope_qk_norm_kernel", "_router_kernel", "_silu_mul_kernel",
                 "_write_kv_kernel")  # fmt: skip


def _category(name):
    n = name.lower()
    if any(k in n for k in FUSED_KERNELS):
        return "fused norms, RoPE, router, SwiGLU, KV writes (ours)"
    if "_gemv_kernel" in n or "_gemm_kernel" in n or "_sum_rows" in n or "_swiglu" in n or "_route" in n:
        return "Int4 matmuls + MoE routing (ours)"
    if "decode" in n or "merge" in n:
        return "decode attention (Triton)"
    if any(k in n for k in ("gemm", "gemv", "cutlass", "nvjet", "xmma", "splitk")):
        return "cuBLAS (LM head, router)"
    if "gather_rows" in n:
        return "embedding gather"
    return "other (elementwise, norms, RoPE, copies, top-k, index)"


def _random_prompt(config, length):
    """Random ordinary token ids: below the special tokens, so never an image placeholder (Scout's specials
    start at 200000)."""
    ordinary = min(config.text.vocab_size, 200000)
    return torch.randint(0, ordinary, (1, length), device="cuda")


def decode_step_profile(model, config, rows_out, label, prompt_len=8192, reserve=None):
    """Prefill ``prompt_len`` random tokens, then time the decode step eager and CUDA-graphed, and profile the
    graphed step's kernels (torch.profiler: name, launches, device time per step). ``reserve``: the KV cache's
    reservation in tokens (default ``prompt_len + 64``)."""
    from scout_mm.cache import KVCache
    from scout_mm.generation import GraphedDecode, decode_one_token, prefill

    text = config.text
    cache = KVCache(text, 1, "cuda", torch.bfloat16)
    cache.reserve(0, reserve or prompt_len + 64)
    prompt = _random_prompt(config, prompt_len)
    with torch.no_grad():
        embeds, _ = model.embed_inputs(prompt, validate=False)
        prefill(model, cache, 0, embeds, 8192)
        tokens = torch.randint(0, text.vocab_size, (1, 1), device="cuda")
        positions = torch.full((1, 1), prompt_len, device="cuda")

        def timed(fn, n):
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / n

        eager_ms = timed(lambda: decode_one_token(model, tokens, positions, cache, check_reserved=False), 5)
        graphed = GraphedDecode(model, cache, tokens, positions)  # raises if the step cannot be captured
        graph_ms = timed(lambda: graphed(tokens, positions), 30)
        steps = 5
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                graphed(tokens, positions)
            torch.cuda.synchronize()
        eager_logits = decode_one_token(model, tokens, positions, cache)[0].float()
        graph_logits = graphed(tokens, positions)[0].float()
    graphed = None  # frees the graph
    table = _kernel_table(prof, steps)
    launches = sum(c for c, _ in table.values())
    busy = sum(t for _, t in table.values()) / 1000
    rows_out += ["", f"### Decode step at {prompt_len} tokens of context: {label}", "",
                 f"eager {eager_ms:.2f} ms/step; CUDA-graphed {graph_ms:.2f} ms/step = {1000 / graph_ms:.1f} tok/s "
                 f"(graph vs eager logits max |diff| {float((eager_logits - graph_logits).abs().max()):.3g}); "
                 f"profiled graph replay: {launches:.0f} kernels/step, {busy:.2f} ms of kernel time/step "
                 f"({100 * busy / graph_ms:.0f}% of the step; {_busy_note(busy, graph_ms)}).", "",
                 "| category | kernels/step | ms/step |", "|---|---|---|"]  # fmt: skip
    cats = {}
    for name, (count, us) in table.items():
        c = cats.setdefault(_category(name), [0.0, 0.0])
        c[0] += count
        c[1] += us
    for cat, (count, us) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        rows_out.append(f"| {cat} | {count:.0f} | {us / 1000:.3f} |")
    rows_out += ["", "| kernel (top 25 by time) | launches/step | us/step | us/launch |", "|---|---|---|---|"]
    for name, (count, us) in sorted(table.items(), key=lambda kv: -kv[1][1])[:25]:
        short = name.replace("|", "/")[:90]
        rows_out.append(f"| `{short}` | {count:.0f} | {us:.0f} | {us / max(count, 1e-9):.1f} |")
    print("\n".join(rows_out[-(len(cats) + 33) :]), flush=True)
    cache = None  # frees the KV cache
    torch.cuda.empty_cache()
    return {"ms": graph_ms, "kernels": launches, "busy_ms": busy, "logits": graph_logits.clone()}


def _generate(model, config, rows_out, label):
    """End to end through ``generate_ids``: a call's decode time includes the capture of the decode step (one eager
    warm-up step + the capture) unless the graph kept from the previous call fits (64 tokens after the 2-token
    call; not 512, whose cache is larger)."""
    from scout_mm.generation import generate_ids

    prompt = _random_prompt(config, 8192)
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a decode step that falls back to eager must not pass silently
        generate_ids(model, prompt, max_new_tokens=2, eos_token_id=[])  # compile every kernel of these shapes
        short = generate_ids(model, prompt, max_new_tokens=64, eos_token_id=[])
        long = generate_ids(model, prompt, max_new_tokens=512, eos_token_id=[])
    peak = torch.cuda.max_memory_allocated()
    rows_out.append(f"- {label}: 8K-token prompt: prefill {long.prefill_tokens_per_second:,.0f} tok/s; batch-1 decode "
                    f"(`generate_ids`: greedy sampling and stop checks included; 64 tokens: decode graph and KV cache "
                    f"kept from the 2-token call before, no capture; 512 tokens: a larger cache, so a fresh cache and "
                    f"capture) {short.decode_tokens_per_second:.1f} tok/s over 64 new tokens, "
                    f"{long.decode_tokens_per_second:.1f} tok/s over 512. Peak GPU memory {peak / 1e9:.1f} GB = "
                    f"{peak / 2**30:.1f} GiB.")  # fmt: skip
    print(rows_out[-1], flush=True)


def _busy_note(busy_ms: float, step_ms: float) -> str:
    if busy_ms <= step_ms:
        return "the rest is gaps between kernels"
    # With PDL a grid starts while the one before it runs and waits for it in griddepcontrol.wait: the profiler
    # counts that wait as the waiting kernel's time, so kernel times overlap and the categories below are upper
    # bounds, not a split of the step.
    return "kernels overlap under PDL: a kernel's time includes its wait for the one before"


def section_scout(rows_out, profile=True):
    from scout_mm.quant import offload_embeddings, quantized_bytes

    config, model = build_scout_int4()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # as load_quantized does: the unfused stacks replaced by the fold go back
    free, total = torch.cuda.mem_get_info()
    rows_out += ["", "## Scout-size (scout-17b-16e, 108.6B params) in Int4 on one GPU, random weights", "",
                 f"- default skip list (bf16 embeddings, LM head, vision tower, routers, norms): "
                 f"{_sizes(quantized_bytes(model))}. GPU memory free after building: {free / 1e9:.1f} of "
                 f"{total / 1e9:.1f} GB."]  # fmt: skip
    print(rows_out[-1], flush=True)
    _generate(model, config, rows_out, "default")
    if profile:
        decode_step_profile(model, config, rows_out, "default build")
    offload_embeddings(model)
    torch.cuda.empty_cache()
    rows_out.append(f"- + embedding table in pinned host memory (`load_quantized(..., host_embeddings=True)`): "
                    f"{_sizes(quantized_bytes(model))}")  # fmt: skip
    _generate(model, config, rows_out, "host embeddings")
    int4_lm_head(model)
    torch.cuda.empty_cache()
    rows_out.append(
        f"- + Int4 LM head (`scripts/quantize.py --quantize-lm-head`): {_sizes(quantized_bytes(model))}"
    )
    _generate(model, config, rows_out, "host embeddings + Int4 LM head")
    if profile:
        decode_step_profile(model, config, rows_out, "host embeddings + Int4 LM head")
    return config, model


LONG_PROMPTS = (32768, 131072, 262144)


def _long_table(rows_out, title: str, intro: str, first_column: str) -> None:
    """The heading, note and column header of a table of :func:`_long_prompt` rows."""
    rows_out += ["", f"## {title}", "", intro, "",
                 f"| {first_column} | prompt tokens | prefill tok/s (s) | decode tok/s (64 new) | KV cache GB (ring + "
                 "global) | peak GPU GB | GPU GB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(rows_out[-6:]), flush=True)


def _long_prompt(model, config, rows_out, label, length, kv_cache_dtype=None, warm=True):
    """One row of ``section_longctx``: a ``length``-token prompt through ``generate_ids`` twice (2 new tokens:
    compile + capture; then 64 new tokens on the kept graph and KV cache; ``warm=False``: the second call only, its
    decode time then includes the capture), prefill and decode tokens/s, KV cache and peak GPU memory. Returns the
    generated tokens, or None when the prompt does not fit in GPU memory."""
    from scout_mm.generation import _STATE_ATTR, generate_ids, release_decode_state

    release_decode_state(model)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    prompt = _random_prompt(config, length)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a decode step that falls back to eager must not pass silently
            if warm:
                generate_ids(model, prompt, max_new_tokens=2, eos_token_id=[], kv_cache_dtype=kv_cache_dtype)
            out = generate_ids(
                model, prompt, max_new_tokens=64, eos_token_id=[], kv_cache_dtype=kv_cache_dtype
            )
    except torch.OutOfMemoryError as e:
        release_decode_state(model)
        del prompt
        torch.cuda.empty_cache()
        rows_out.append(
            f"| {label} | {length:,} | out of GPU memory: {str(e).splitlines()[0][:160]} | | | | |"
        )
        print(rows_out[-1], flush=True)
        return None
    cache = model.__dict__[_STATE_ATTR].cache.memory_bytes()
    peak = torch.cuda.max_memory_allocated()
    rows_out.append(f"| {label} | {length:,} | {out.prefill_tokens_per_second:,.0f} ({out.prefill_seconds:.1f} s) | "
                    f"{out.decode_tokens_per_second:.1f} | {cache['ring'] / 1e9:.2f} + {cache['global'] / 1e9:.2f} | "
                    f"{peak / 1e9:.1f} | {torch.cuda.get_device_properties(0).total_memory / 1e9:.1f} |")  # fmt: skip
    print(rows_out[-1], flush=True)
    release_decode_state(model)
    return out.sequences[0, length:].cpu()


def section_longctx(rows_out):
    """Scout-size Int4 on one GPU with long prompts (``LONG_PROMPTS``, ``--prompts``): the default build, then the
    lean one (embedding table in pinned host memory, Int4 LM head) for the lengths the default could not hold."""
    from scout_mm.quant import offload_embeddings, quantized_bytes

    config, model = build_scout_int4()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    _long_table(rows_out, "Scout-size Int4 with long prompts (random weights, batch 1)",
                f"Default build: {_sizes(quantized_bytes(model))}. Each prompt goes through `generate_ids` twice: "
                "2 new tokens (compile, capture), then 64 new tokens on the kept decode graph and KV cache (greedy, "
                "stop checks included, no capture); the row is the second call. KV cache: ring buffers of the "
                "chunked RoPE layers (one 8K chunk each) + block pools of the global NoPE layers.", "build")  # fmt: skip
    left = []
    for length in LONG_PROMPTS:
        if _long_prompt(model, config, rows_out, "default", length) is None:
            left = [n for n in LONG_PROMPTS if n >= length]
            break
    if left:
        offload_embeddings(model)
        int4_lm_head(model)
        torch.cuda.empty_cache()
        rows_out.append(f"| lean: {_sizes(quantized_bytes(model))} | | | | | | |")
        for length in left:
            if _long_prompt(model, config, rows_out, "lean (host embeddings, Int4 LM head)", length) is None:
                break


FIT_PROMPTS = (393216, 524288)


def section_longkv(rows_out):
    """The global layers' KV cache in the model's dtype (bf16) vs FP8 (``kv_cache_dtype="fp8"``), the default build:
    the same prompts (``LONG_PROMPTS``) both ways, interleaved, then longer prompts (``FIT_PROMPTS``) with FP8 only,
    one call each (its decode time includes the capture), up to the first that does not fit."""
    from scout_mm.quant import quantized_bytes

    config, model = build_scout_int4()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    _long_table(rows_out, "Scout-size Int4, long prompts: bf16 vs FP8 KV cache of the global layers (random weights, "
                "batch 1)", f"Default build: {_sizes(quantized_bytes(model))}. Rows as in the long-prompt table (the "
                "second of two `generate_ids` calls, 64 new tokens, greedy).", "KV cache")  # fmt: skip
    agree = []
    for length in LONG_PROMPTS:
        tokens = [_long_prompt(model, config, rows_out, kv or "bf16", length, kv) for kv in (None, "fp8")]
        if all(t is not None for t in tokens):
            same = int((tokens[0] == tokens[1]).int().cumprod(0).sum())
            agree.append(f"{length:,}: the first {same} of 64 greedy tokens identical")
    for length in FIT_PROMPTS:
        if _long_prompt(model, config, rows_out, "fp8 (one call)", length, "fp8", warm=False) is None:
            break
    rows_out += ["", "Greedy tokens, FP8 vs bf16 KV cache (random weights: near-uniform logits, so this only shows the "
                 "caches hold the same sequence; the model-level checks are in `tests/test_kv_fp8.py`): "
                 + "; ".join(agree) + "."]  # fmt: skip
    print(rows_out[-1], flush=True)


def section_fp8wide(rows_out):
    """Decode after the longest ``FIT_PROMPTS`` prompt with the FP8 cache, its paged decode launch at 4 and at 8
    programs per SM (``flash_decode._PROGRAMS_PER_SM_FP8``; 8 is shipped from ``FP8_WIDE_FROM`` keys), one
    ``generate_ids`` call each (a second would not fit beside the kept cache; the decode time includes the graph
    capture), interleaved twice."""
    from scout_mm.kernels import flash_decode

    config, model = build_scout_int4()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    _long_table(rows_out, "Scout-size Int4, FP8 KV cache: the decode launch's programs per SM", "Default build, "
                "rows as in the long-prompt table (one `generate_ids` call each, 64 new tokens, greedy; the decode "
                "time includes the graph capture).",
                "FP8 decode launch")  # fmt: skip
    shipped = dict(flash_decode._PROGRAMS_PER_SM_FP8)
    try:
        for per_sm in (8, 4, 8, 4):
            flash_decode._PROGRAMS_PER_SM_FP8["paged"] = per_sm
            _long_prompt(
                model, config, rows_out, f"{per_sm} programs per SM", max(FIT_PROMPTS), "fp8", warm=False
            )
    finally:
        flash_decode._PROGRAMS_PER_SM_FP8.update(shipped)


def section_dequantpasses(rows_out):
    """The prefill MoE's dequantised experts in one pass vs passes of ``int4.MOE_DEQUANT_MAX_BYTES`` and twice
    that (the default build, same process, interleaved): prefill speed and peak memory of long prompts."""
    config, model = build_scout_int4()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    budget = int4.MOE_DEQUANT_MAX_BYTES
    rows_out += ["", "## Prefill MoE: experts dequantised in one pass vs in passes (Scout-size Int4, default build)",
                 "", "| build | prompt tokens | prefill tok/s (s) | decode tok/s (64 new) | KV cache GB (ring + global) "
                 "| peak GPU GB | GPU GB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    try:
        for length in (32768, 131072):
            for limit in (1 << 62, budget, 2 * budget) * 2:
                label = "one pass" if limit == 1 << 62 else f"passes of {limit / 2**30:g} GiB"
                int4.MOE_DEQUANT_MAX_BYTES = limit
                _long_prompt(model, config, rows_out, label, length)
    finally:
        int4.MOE_DEQUANT_MAX_BYTES = budget


def _step_variants(model, config, rows_out, variants, use, restore, prompt_len=8192, reserve=None):
    """``decode_step_profile`` of each (label, setting) of ``variants`` in order, ``use(setting)`` applied before
    each (same prompt and token: ``torch.manual_seed(0)``) and ``use(restore)`` after all of them, even on error.
    Returns {label: result}."""
    runs = {}
    try:
        for label, setting in variants:
            use(setting)
            torch.manual_seed(0)
            runs[label] = decode_step_profile(model, config, rows_out, label, prompt_len, reserve)
    finally:
        use(restore)
    return runs


def _in_rounds(variants, rounds):
    """``variants`` repeated ``rounds`` times, round-major (interleaved), labels suffixed ", again" (round 2) and
    ", round N" (later rounds)."""
    suffixes = [""] + [", again" if r == 1 else f", round {r + 1}" for r in range(1, rounds)]
    return [(f"{label}{suffix}", setting) for suffix in suffixes for label, setting in variants]


def _step_summary(rows_out, runs, base_label, logit_scale=False):
    """The summary table of decode-step variants (``decode_step_profile`` results): time, speed-up and logits
    against the ``base_label`` run (``logit_scale``: also the base's largest |logit|, for scale)."""
    base = runs[base_label]
    rows_out += ["", "### Summary (same process, weights, prompt and token)", "",
                 f"| variant | graphed ms/step | tok/s | kernels/step | kernel ms/step | speed-up | logits vs {base_label}: "
                 "max abs diff, argmax |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    scale = f" (logit scale {float(base['logits'].abs().max()):.3g})" if logit_scale else ""
    for label, r in runs.items():
        diff = float((r["logits"] - base["logits"]).abs().max())
        same = bool((r["logits"].argmax(-1) == base["logits"].argmax(-1)).all())
        rows_out.append(f"| {label} | {r['ms']:.2f} | {1000 / r['ms']:.1f} | {r['kernels']:.0f} | {r['busy_ms']:.2f} | "
                        f"{base['ms'] / r['ms']:.3f}x | {diff:.3g}{scale}, {'same' if same else 'DIFFERENT'} |")  # fmt: skip


def section_profile(rows_out):
    """The default build's decode step (8K context), profiled three times on the same weights, prompt and
    token: inference fusions off (``SCOUT_MM_FUSED=off``, separate q/k/v and gate/up projections), the fused
    kernels on, the fused kernels + fused projections, and those + the shared expert folded into the routed
    Int4 experts (``fuse_shared_expert``; what ``load_quantized`` gives)."""
    import os

    from scout_mm.fusion import fuse_projections, fuse_shared_expert

    start = time.perf_counter()
    config, model = build_scout_int4(fuse=False)
    torch.cuda.synchronize()
    rows_out += ["", "## Scout-size decode step profile (default build)", "",
                 f"Built in {time.perf_counter() - start:.0f} s."]  # fmt: skip
    runs = {}
    variants = (("fusions off", "off", 0), ("fused kernels", "auto", 0),
                ("fused kernels + fused projections", "auto", 1),
                ("fused kernels + fused projections + shared expert folded", "auto", 2))  # fmt: skip
    try:
        for label, env, fuse in variants:
            os.environ["SCOUT_MM_FUSED"] = env
            if fuse >= 1:
                fuse_projections(model)
            if (
                fuse >= 2
            ):  # the stacks grow by one expert, a layer at a time: free the earlier variants' caches
                import gc

                gc.collect()
                torch.cuda.empty_cache()
                print(
                    f"before the fold: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True
                )
                fuse_shared_expert(model)
                torch.cuda.empty_cache()
            torch.manual_seed(0)  # the same prompt and token for every variant
            runs[label] = decode_step_profile(model, config, rows_out, label)
    finally:
        os.environ.pop("SCOUT_MM_FUSED", None)
    _step_summary(rows_out, runs, "fusions off", logit_scale=True)
    prev = runs["fused kernels + fused projections"]
    folded = runs["fused kernels + fused projections + shared expert folded"]
    rows_out += ["", f"Shared expert folded vs not (fused kernels + projections both): {folded['ms']:.2f} vs "
                 f"{prev['ms']:.2f} ms/step ({prev['ms'] / folded['ms']:.3f}x), logits max abs diff "
                 f"{float((folded['logits'] - prev['logits']).abs().max()):.3g}, argmax "
                 f"{'same' if bool((folded['logits'].argmax(-1) == prev['logits'].argmax(-1)).all()) else 'DIFFERENT'}."]  # fmt: skip
    print("\n".join(rows_out[-(len(runs) + 6) :]), flush=True)


def _short_prefill_ab(model, config, rows_out, lengths=(8, 12, 14, 16, 24, 32, 64)):
    """Prefill time of short prompts (a fresh cache each), session 5's Int4 dispatch vs session 4's (the FMA
    GEMV's multi-row form, which the MoE took up to ~2 rows per touched expert), same process and prompts."""
    from scout_mm.cache import KVCache
    from scout_mm.generation import prefill

    shipped_gemv, shipped_moe = dict(int4.TUNED["gemv"]), int4.TUNED["MOE_GEMV_MAX_ROWS_PER_EXPERT"]
    dispatches = (("session 4 dispatch", dict(shipped_gemv, rows_per_program=4), 2.0),
                  ("session 5 dispatch", shipped_gemv, shipped_moe))  # fmt: skip
    results = {}
    try:
        for length in lengths:
            prompt = _random_prompt(config, length)
            for label, gemv, moe_rows in dispatches:
                int4.TUNED["gemv"], int4.TUNED["MOE_GEMV_MAX_ROWS_PER_EXPERT"] = gemv, moe_rows
                times = []
                with torch.no_grad():
                    embeds, _ = model.embed_inputs(prompt, validate=False)
                    for _ in range(6):
                        cache = KVCache(config.text, 1, "cuda", torch.bfloat16)
                        cache.reserve(0, length + 1)
                        start, end = (
                            torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True),
                        )
                        start.record()
                        prefill(model, cache, 0, embeds, 8192)
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end))
                results[(length, label)] = statistics.median(times[1:])
    finally:
        int4.TUNED["gemv"], int4.TUNED["MOE_GEMV_MAX_ROWS_PER_EXPERT"] = shipped_gemv, shipped_moe
    rows_out += ["", "### Short-prompt prefill (eager, fresh cache; median of 5 after one warm-up)", "",
                 "| prompt tokens | session 4 dispatch ms | session 5 dispatch ms | speed-up |", "|---|---|---|---|"]  # fmt: skip
    for length in lengths:
        old, new = results[(length, dispatches[0][0])], results[(length, dispatches[1][0])]
        rows_out.append(f"| {length} | {old:.2f} | {new:.2f} | {old / new:.2f}x |")
    print("\n".join(rows_out[-(len(lengths) + 4) :]), flush=True)


def section_step(rows_out):
    """A/B of decode-step variants in ONE process, on the default build (what load_quantized returns), same
    weights, prompt and token (``torch.manual_seed(0)`` before each). Session 5: the post-attention residual add +
    RMSNorm as its own kernel before the router vs inside the router kernel (``scout_mm.moe.layer.FUSED_NORM_ROUTER``);
    session 4's A/B (PDL, routing-free MoE, merge in the split kernel) is in bench/results/int4_decode_step_h100.md.
    Then ``generate_ids`` over 64 tokens: fresh (``keep_graph=False``) vs the graph and KV cache kept from the
    previous call."""
    from scout_mm.generation import generate_ids, release_decode_state
    from scout_mm.moe import layer as moe_layer

    start = time.perf_counter()
    config, model = build_scout_int4()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    rows_out += ["", "## Scout-size decode step: post-attention norm inside the router kernel (default build)", "",
                 f"Built in {time.perf_counter() - start:.0f} s. GPU memory after building: {free / 1e9:.1f} of "
                 f"{total / 1e9:.1f} GB free (driver), PyTorch {torch.cuda.memory_allocated() / 1e9:.2f} GB allocated, "
                 f"{torch.cuda.memory_reserved() / 1e9:.2f} GB reserved."]  # fmt: skip
    variants = (("norm kernel + router kernel (session 4)", False), ("norm inside the router kernel", True),
                ("norm kernel + router kernel (session 4), again", False),
                ("norm inside the router kernel, again", True))  # fmt: skip

    def use(fused):
        moe_layer.FUSED_NORM_ROUTER = fused

    runs = _step_variants(model, config, rows_out, variants, use, restore=True)
    _short_prefill_ab(model, config, rows_out)
    _step_summary(rows_out, runs, variants[0][0])
    print("\n".join(rows_out[-(len(runs) + 4) :]), flush=True)
    prompt = _random_prompt(config, 8192)
    generate_ids(model, prompt, max_new_tokens=2, eos_token_id=[], keep_graph=False)  # compile every kernel
    calls = []
    for label, keep in (("fresh (keep_graph=False)", False), ("kept: 1st call (captures)", True),
                        ("kept: 2nd call (reuses)", True), ("kept: 3rd call (reuses)", True)):  # fmt: skip
        out = generate_ids(model, prompt, max_new_tokens=64, eos_token_id=[], keep_graph=keep)
        calls.append((label, out.decode_tokens_per_second, out.decode_seconds, out.sequences))
    same = all(torch.equal(c[3], calls[0][3]) for c in calls)
    rows_out += ["", "### generate_ids over 64 new tokens after an 8K prompt (decode time: capture included)", "",
                 "| call | decode tok/s | decode s |", "|---|---|---|"]  # fmt: skip
    rows_out += [f"| {label} | {tps:.1f} | {sec:.3f} |" for label, tps, sec, _ in calls]
    rows_out.append(f"\nTokens of all four calls identical: {same}.")
    print("\n".join(rows_out[-8:]), flush=True)
    release_decode_state(model)


def section_splitstep(rows_out):
    """Scout decode step (default build): the decode GEMV's K splits by session 5's ceiling of 4.25 programs per
    SM vs the least-makespan rule (``TUNED["gemv"]["resident_per_sm"]``), interleaved twice, same weights, prompt
    and token; then the shipped step after an 8191-token prompt, where the chunked-attention layers also read
    ~8K cached tokens (after an 8192-token prompt the decode token opens a new 8K chunk, and those 36 of the 48
    layers read only the new tokens; the 12 global layers read all of them either way)."""
    shipped = dict(int4.TUNED["gemv"])
    variants = (("ceiling 4.25/SM (session 5)", dict(shipped, resident_per_sm=0)), ("least makespan", shipped),
                ("ceiling 4.25/SM (session 5), again", dict(shipped, resident_per_sm=0)),
                ("least makespan, again", shipped))  # fmt: skip
    _step_ab(rows_out, "decode GEMV K splits", variants, lambda cfg: int4.TUNED.update(gemv=cfg), shipped)


def _step_ab(rows_out, title, variants, use, restore):
    """Build the default Scout, profile its decode step under each of ``variants`` (:func:`_step_variants`),
    summarise against the first, then profile the restored build mid-chunk (8191-token prompt)."""
    start = time.perf_counter()
    config, model = build_scout_int4()
    torch.cuda.synchronize()
    rows_out += ["", f"## Scout-size decode step: {title} (default build)", "",
                 f"Built in {time.perf_counter() - start:.0f} s."]  # fmt: skip
    runs = _step_variants(model, config, rows_out, variants, use, restore)
    _step_summary(rows_out, runs, variants[0][0])
    print("\n".join(rows_out[-(len(runs) + 4) :]), flush=True)
    torch.manual_seed(0)
    decode_step_profile(model, config, rows_out, "shipped, chunked layers mid-chunk", prompt_len=8191)


def section_shapes(rows_out):
    """One-row dense GEMVs at the Scout decode shapes: the config recorded per shape (``TUNED["gemv_by_shape"]``:
    8 warps, no K split) against the GEMV rule of session 6, interleaved over two rounds, with tinygemm in the same
    run; then the Scout decode step (default build) with the table emptied and in place, interleaved twice, and
    the shipped step mid-chunk (8191-token prompt)."""
    recorded = dict(int4.TUNED["gemv_by_shape"])
    rule = dict(int4.TUNED["gemv"])
    rows_out += ["", "## One-row dense GEMV: recorded per-shape configs vs the rule (group 128, symmetric, bf16)", "",
                 "| N x K | config | K splits x column tiles | round 1 us | round 2 us | Int4 TB/s (best) | vs rule | vs tinygemm |",
                 "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for size_n, size_k in [(7168, 5120), (5120, 5120), (16384, 5120), (5120, 8192)]:
        copies = copies_for(size_k * size_n // 2)
        pick = rotating(packed((), size_k, size_n, copies))
        tiny = rotating(tinygemm(size_k, size_n, copies))
        x = torch.randn(1, size_k, device="cuda", dtype=torch.bfloat16)
        configs = [("rule (session 6)", rule)]
        if (size_n, size_k) in recorded:
            cfg = dict(rule, **recorded[(size_n, size_k)])
            configs.append((f"recorded: {cfg['BLOCK_N']}x{cfg['BLOCK_K']} tiles, {cfg['num_warps']} warps, "
                            f"{cfg['split_k']} split", cfg))  # fmt: skip
        times = {label: [] for label, _ in configs}
        times["tinygemm"] = []
        for _ in range(2):
            for label, cfg in configs:
                times[label].append(
                    graph_us(lambda c=cfg, p=pick, x=x: int4.int4_linear(x, *p(), GROUP, config=c))
                )
            times["tinygemm"].append(graph_us(tinygemm_call(x, tiny)))
        base = min(times[configs[0][0]])
        t_tiny = min(times["tinygemm"])
        for label, cfg in [*configs, ("tinygemm", None)]:
            t = min(times[label])
            if cfg is None:
                grid = "-"
            else:
                tiles = -(-size_n // cfg["BLOCK_N"])
                split = int4._gemv_split(cfg, size_k // GROUP, tiles, GROUP, torch.device("cuda"))[0]
                grid = f"{split} x {tiles}"
            rows_out.append(f"| {size_n}x{size_k} | {label} | {grid} | {times[label][0]:.1f} | {times[label][1]:.1f} | "
                            f"{size_k * size_n / 2 / t / 1e6:.2f} | {base / t:.3f}x | {t_tiny / t:.2f}x |")  # fmt: skip
            print(rows_out[-1], flush=True)
        del pick, tiny
        torch.cuda.empty_cache()

    variants = (("rule only (session 6)", {}), ("recorded shapes", recorded), ("rule only, again", {}),
                ("recorded shapes, again", recorded))  # fmt: skip
    _step_ab(rows_out, "per-shape one-row GEMV configs", variants,
             lambda table: int4.TUNED.update(gemv_by_shape=table), recorded)  # fmt: skip


def _over(bn, bk, warps, split=0):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps} | ({"split_k": split} if split else {})


# Candidates of the decode MoE's per-launch sweep (section moeshapes): (label, overrides of TUNED["gemv"]).
# gate_up: BLOCK_N counts SwiGLU columns (a program reads BLOCK_N gate + BLOCK_N up weight columns), streamed in one
# loop as one tile of 2 BLOCK_N columns ("dual"; by default where that keeps <= 16 packed words a thread, so not at
# the rule's 64x256 / 4 warps) or in two loops, gate then up ("2 loops").
MOE_GATE_UP_CANDIDATES = [("rule", {}), ("rule, dual", {"dual": True})] + [
    (f"{bn}x{bk} w{w}" + (f" s{sp}" if sp else "") + ("" if dual else ", 2 loops"), _over(bn, bk, w, sp) | {"dual": dual})
    for bn, bk, w, sp, dual in ((32, 1024, 8, 1, False), (64, 512, 8, 1, False), (32, 512, 8, 1, True),
                                (32, 512, 8, 0, True), (32, 256, 4, 1, True), (32, 256, 4, 0, True), (16, 512, 4, 1, True),
                                (16, 512, 8, 1, True), (32, 256, 8, 1, True), (64, 256, 8, 1, True))
]  # fmt: skip
MOE_DOWN_CANDIDATES = [("rule", {})] + [
    (f"{bn}x{bk} w{w}" + (f" s{sp}" if sp else ""), _over(bn, bk, w, sp))
    for bn, bk, w, sp in ((32, 512, 4, 0), (32, 512, 4, 3), (32, 256, 4, 4), (32, 256, 4, 6), (64, 256, 4, 8),
                          (64, 256, 4, 4), (16, 512, 4, 2), (32, 512, 8, 2), (32, 1024, 8, 2), (64, 128, 4, 8))
]  # fmt: skip


def section_moeshapes(rows_out):
    """The decode MoE's two one-row launches (gate_up with SwiGLU, down with the slot sum; DirectRoute, T=1) timed
    one by one over candidate configs at one slot (top-1) and two (top-1 + the folded shared expert), interleaved
    over two rounds (best of the two rounds' medians); every candidate's output checked against the rule's. The
    best candidate of each launch (when it beats the rule by 2% or more) goes into a ``moe_gemv_by_shape`` table;
    then the whole MoE with the rule and with that table, and the Scout decode step with and without it."""
    rule = dict(int4.TUNED["gemv"])
    shipped = dict(int4.TUNED["moe_gemv_by_shape"])
    gate_up = packed((EXPERTS + 1,), HIDDEN, 2 * INTER, 1)[0]
    down = packed((EXPERTS + 1,), INTER, HIDDEN, 1)[0]
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    expert_bytes = {1: 2 * HIDDEN * INTER / 2, 2: HIDDEN * INTER / 2}  # by MODE
    rows_out += ["", "## Decode MoE launches (T=1): per-launch configs (bf16, group 128, symmetric)", "",
                 "| launch | slots | config | K splits x programs | round 1 us | round 2 us | Int4 TB/s (best) | "
                 "vs rule |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    table = {}
    device = torch.device("cuda")
    for slots in (1, 2):
        routes = [int4.DirectRoute(torch.tensor([[e, EXPERTS][:slots]], device="cuda"), EXPERTS + 1)
                  for e in range(EXPERTS)]  # fmt: skip
        weights = torch.rand(1, slots, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(slots, INTER, device="cuda", dtype=torch.bfloat16)
        for mode, weight, inp, candidates in ((1, gate_up, x, MOE_GATE_UP_CANDIDATES),
                                              (2, down, h, MOE_DOWN_CANDIDATES)):  # fmt: skip
            name = "gate_up + SwiGLU" if mode == 1 else "down + slot sum"

            def run(cfg, route, mode=mode, weight=weight, inp=inp, slots=slots, weights=weights):
                extra = (weights,) if mode == 1 else ()
                return int4._launch_gemv(inp, weight, GROUP, mode, slots, route, cfg, *extra)

            ref = run(rule, routes[3]).float()
            configs = {label: dict(rule, **over) for label, over in candidates}
            times = {label: [] for label in configs}
            for _ in range(2):
                for label, cfg in configs.items():
                    pick = rotating(routes)
                    times[label].append(graph_us(lambda c=cfg, p=pick, r=run: r(c, p())))
            for label, cfg in configs.items():
                err = float((run(cfg, routes[3]).float() - ref).abs().max() / ref.abs().max())
                if err > 1e-2:
                    raise AssertionError(f"{name} {slots} slots {label}: rel diff {err:.3g} vs the rule")
            base = min(times["rule"])
            for label, cfg in configs.items():
                n_cols = weight[0].shape[-1] // (2 if mode == 1 else 1)
                tiles = -(-n_cols // cfg["BLOCK_N"]) * slots
                split = int4._gemv_split(cfg, weight[1].shape[-2], tiles, GROUP, device)[0]
                t = min(times[label])
                rows_out.append(f"| {name} | {slots} | {label} | {split} x {split * tiles} | {times[label][0]:.1f} | "
                                f"{times[label][1]:.1f} | {slots * expert_bytes[mode] / t / 1e6:.2f} | {base / t:.3f}x |")  # fmt: skip
                print(rows_out[-1], flush=True)
            best = min(candidates, key=lambda c: min(times[c[0]]))
            if best[1] and min(times[best[0]]) <= 0.98 * base:
                table[(weight[0].shape[-1], weight[0].shape[-2] * 8, slots)] = best[1]
    rows_out += ["", f"Table of the best candidates: `{table}`", "",
                 "| slots | MoE config | round 1 us | round 2 us | Int4 TB/s (best) | vs rule |", "|---|---|---|---|---|---|"]  # fmt: skip
    for slots in (1, 2):
        routes = [torch.tensor([[e, EXPERTS][:slots]], device="cuda") for e in range(EXPERTS)]
        weights = torch.rand(1, slots, device="cuda", dtype=torch.bfloat16)
        times = {"rule": [], "table": []}
        try:
            for _ in range(2):
                for label, tab in (("rule", {}), ("table", table)):
                    int4.TUNED["moe_gemv_by_shape"] = tab
                    pick = rotating(routes)
                    times[label].append(graph_us(lambda p=pick, w=weights, gu=gate_up, dn=down: int4.int4_moe_experts(
                        x, w, p(), gu, dn, GROUP)))  # fmt: skip
        finally:
            int4.TUNED["moe_gemv_by_shape"] = shipped
        for label in times:
            t = min(times[label])
            rows_out.append(f"| {slots} | {label} | {times[label][0]:.1f} | {times[label][1]:.1f} | "
                            f"{slots * 3 * HIDDEN * INTER / 2 / t / 1e6:.2f} | {min(times['rule']) / t:.3f}x |")  # fmt: skip
            print(rows_out[-1], flush=True)
    del gate_up, down
    torch.cuda.empty_cache()
    variants = (("rule", {}), ("table", table), ("rule, again", {}), ("table, again", table))
    _step_ab(rows_out, "decode MoE per-launch configs", variants,
             lambda tab: int4.TUNED.update(moe_gemv_by_shape=tab), shipped)  # fmt: skip


def section_tailsplit(rows_out, rounds: int = 2):
    """One-row dense GEMVs with the column tiles past one whole tile a SM K-split (``tail_split`` of the GEMV config,
    ``TAIL`` in ``int4._gemv_kernel``) against the config recorded per shape, at the Scout decode shapes; outputs
    checked against it. Then the Scout decode step (default build) with the fastest tail config per shape added to
    ``TUNED["gemv_by_shape"]``, interleaved."""
    recorded = dict(int4.TUNED["gemv_by_shape"])
    rule = dict(int4.TUNED["gemv"])
    device = torch.device("cuda")
    rows_out += ["", "## One-row dense GEMV: the tiles past one wave K-split (group 128, symmetric, bf16)", "",
                 "| N x K | config | programs | round 1 us | round 2 us | Int4 TB/s (best) | vs recorded |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
    table = dict(recorded)
    for size_n, size_k in [(5120, 5120), (7168, 5120), (16384, 5120), (5120, 8192)]:
        base_cfg = dict(rule, **recorded.get((size_n, size_k), {}))
        configs = {"recorded" if (size_n, size_k) in recorded else "rule": base_cfg}
        for over in ({}, {"BLOCK_N": 32, "BLOCK_K": 1024, "num_warps": 8, "split_k": 1}):
            for split in (2, 3, 4, 5):
                cfg = dict(base_cfg, **over, tail_split=split)
                label = f"{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']}, tail split {split}"
                configs.setdefault(label, cfg)
        copies = copies_for(size_k * size_n // 2)
        pick = rotating(packed((), size_k, size_n, copies))
        x = torch.randn(1, size_k, device="cuda", dtype=torch.bfloat16)
        w0 = pick()
        ref = int4.int4_linear(x, *w0, GROUP, config=base_cfg).float()
        for label, cfg in configs.items():
            err = float(
                (int4.int4_linear(x, *w0, GROUP, config=cfg).float() - ref).abs().max() / ref.abs().max()
            )
            if err > 1e-2:
                raise AssertionError(f"{size_n}x{size_k} {label}: rel diff {err:.3g} vs the recorded config")
        times = {label: [] for label in configs}
        for _ in range(rounds):
            for label, cfg in configs.items():
                times[label].append(
                    graph_us(lambda c=cfg, p=pick, x=x: int4.int4_linear(x, *p(), GROUP, config=c))
                )
        first = next(iter(configs))
        base = min(times[first])
        for label, cfg in configs.items():
            tiles = -(-size_n // cfg["BLOCK_N"])
            split, _ = int4._gemv_split(cfg, size_k // GROUP, tiles, GROUP, device)
            full = min(tiles, int4._n_sms(device))
            progs = (
                f"{full} + {tiles - full} x {cfg['tail_split']}"
                if "tail_split" in cfg and full < tiles
                else f"{tiles} x {split}"
            )
            t = min(times[label])
            rows_out.append(f"| {size_n}x{size_k} | {label} | {progs} | " + " | ".join(f"{v:.1f}" for v in times[label][:2]) +
                            f" | {size_k * size_n / 2 / t / 1e6:.2f} | {base / t:.3f}x |")  # fmt: skip
            print(rows_out[-1], flush=True)
        best = min(configs, key=lambda c: min(times[c]))
        if best != first and min(times[best]) <= 0.98 * base:
            table[(size_n, size_k)] = {k: configs[best][k] for k in ("BLOCK_N", "BLOCK_K", "num_warps", "split_k",
                                                                     "tail_split") if k in configs[best]}  # fmt: skip
        del pick, w0
        torch.cuda.empty_cache()
    rows_out += ["", f"Table: `{table}`"]
    print(rows_out[-1], flush=True)
    variants = (("recorded", recorded), ("with tail splits", table), ("recorded, again", recorded),
                ("with tail splits, again", table))  # fmt: skip
    _step_ab(rows_out, "one-row GEMV tail splits", variants,
             lambda tab: int4.TUNED.update(gemv_by_shape=tab), recorded)  # fmt: skip


def section_earlyids(rows_out):
    """The Scout decode step with the MoE down launch reading its routing ids and first weight tile before its PDL
    wait (``int4.EARLY_DOWN_IDS``, shipped) and after it, interleaved twice."""
    shipped = int4.EARLY_DOWN_IDS
    variants = (("ids after the wait", False), ("ids before the wait", True), ("ids after the wait, again", False),
                ("ids before the wait, again", True))  # fmt: skip
    _step_ab(rows_out, "MoE down launch: routing ids before the PDL wait", variants,
             lambda early: setattr(int4, "EARLY_DOWN_IDS", early), shipped)  # fmt: skip


def section_ropewrite(rows_out):
    """The Scout decode step with the RoPE layers' rotation and KV cache write in one kernel
    (``cache.ROPE_WRITES_KV``, shipped) and as two launches, interleaved twice."""
    from scout_mm import cache

    shipped = cache.ROPE_WRITES_KV
    variants = (("RoPE, then the KV write", False), ("RoPE + KV write, one kernel", True),
                ("RoPE, then the KV write, again", False), ("RoPE + KV write, one kernel, again", True))  # fmt: skip
    _step_ab(rows_out, "RoPE layers: rotation and KV write in one kernel", variants,
             lambda fused: setattr(cache, "ROPE_WRITES_KV", fused), shipped)  # fmt: skip


def section_decodesplits(rows_out, rounds: int = 2):
    """Decode attention's split-K in the Scout decode step (default build): the splits over the live keys with
    ``flash_decode.MIN_SPLIT_KEYS_BY_LAYOUT`` (contiguous = the chunked layers' rings, paged = the global layers)
    set per variant (``DECODE_SPLIT_MINS="c/p,c/p,..."``, default ``512/512,256/256,128/128,64/64``; an item
    ``c/p/BLOCK_N.warps.stages`` also sets the paged launch config), at three cache states (a new 8K chunk,
    mid-chunk, 8K live keys in a 64K reservation), interleaved ``rounds`` times.
    ``BASELINE_FLASH_DECODE=path``: also the decode attention of that file (e.g. ``git show
    01c1633:scout_mm/kernels/flash_decode.py``, the splits over the reserved capacity) as the first variant."""
    import importlib.util
    import os

    from scout_mm.kernels import flash_decode

    shipped_fn, shipped_min = flash_decode.decode_attention, dict(flash_decode.MIN_SPLIT_KEYS_BY_LAYOUT)
    shipped_cfg = dict(flash_decode._CUDA_CONFIG)
    baseline = os.environ.get("BASELINE_FLASH_DECODE")
    mins = os.environ.get("DECODE_SPLIT_MINS", "512/512,256/256,128/128,64/64").split(",")
    variants = []
    for item in mins:  # "contiguous/paged" minimums, optionally "/BLOCK_N.warps.stages" of the paged launch
        contiguous, paged, *paged_cfg = item.split("/")
        cfg = (
            dict(shipped_cfg, paged=tuple(int(v) for v in paged_cfg[0].split(".")))
            if paged_cfg
            else shipped_cfg
        )
        label = f"live-key splits, min keys contiguous {contiguous} / paged {paged}" + (
            f", paged (BLOCK_N, warps, stages) {cfg['paged']}" if paged_cfg else "")  # fmt: skip
        variants.append((label, (shipped_fn, {"contiguous": int(contiguous), "paged": int(paged)}, cfg)))
    if baseline:
        spec = importlib.util.spec_from_file_location("_baseline_flash_decode", baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        variants.insert(0, ("baseline: splits over the capacity, 512 keys min",
                            (module.decode_attention, shipped_min, shipped_cfg)))  # fmt: skip

    def use(setting):
        fn, flash_decode.MIN_SPLIT_KEYS_BY_LAYOUT, flash_decode._CUDA_CONFIG = setting
        flash_decode.decode_attention = fn

    _three_cache_states(rows_out, "Decode attention splits", variants, use, (shipped_fn, shipped_min, shipped_cfg),
                        rounds)  # fmt: skip


def _three_cache_states(rows_out, title, variants, use, restore, rounds):
    """The Scout decode step (default build) under each of ``variants`` at three cache states (a new 8K chunk,
    mid-chunk, 8K live keys in a 64K reservation), interleaved ``rounds`` times, ``use(restore)`` at the end."""
    config, model = build_scout_int4()
    for prompt_len, reserve, what in ((8192, None, "a new 8K chunk (position 8192)"),
                                      (8191, None, "mid-chunk (position 8191)"),
                                      (8192, 65536, "8K live keys, cache reserved for 64K")):  # fmt: skip
        rows_out += ["", f"## {title} in the Scout decode step: {what}"]
        runs = _step_variants(model, config, rows_out, _in_rounds(variants, rounds), use, restore, prompt_len,
                              reserve)  # fmt: skip
        _step_summary(rows_out, runs, variants[0][0])
        print("\n".join(rows_out[-(len(runs) + 4) :]), flush=True)


def section_fusedmerge(rows_out, rounds: int = 2):
    """Decode attention's split merge inside the split kernel (the last split to arrive merges; up to 16 splits
    unrolled) vs the separate merge kernel, per layout (``flash_decode.FUSED_MERGE_BY_LAYOUT``: contiguous = the
    chunked layers' 8K rings, 8 splits a head; paged = the global layers, 64), at the three cache states of
    ``decodesplits``."""
    from scout_mm.kernels import flash_decode

    shipped = dict(flash_decode.FUSED_MERGE_BY_LAYOUT)
    variants = [(f"merge in the split kernel: contiguous {c}, paged {p}", {"contiguous": c, "paged": p})
                for c, p in ((False, False), (True, False), (False, True), (True, True))]  # fmt: skip

    def use(setting):
        flash_decode.FUSED_MERGE_BY_LAYOUT = setting

    _three_cache_states(rows_out, "Decode attention merge", variants, use, shipped, rounds)


def section_baselineab(rows_out, rounds: int = 3):
    """The Scout decode step (default build, 8K context) with some kernels of a module swapped for those of an
    older copy of it, interleaved ``rounds`` times with the working tree's. ``BASELINE_AB=module:path:name,name``,
    e.g. ``scout_mm.kernels.fused:/tmp/fused_old.py:_router_kernel,_rms_norm_kernel`` with ``/tmp/fused_old.py``
    from ``git show REV:scout_mm/kernels/fused.py``: the named globals of the module are the baseline's while the
    baseline runs (their launch wrappers stay the working tree's, so the kernels' signatures must match)."""
    import importlib
    import importlib.util
    import os

    module_name, path, names = os.environ["BASELINE_AB"].split(":")
    module = importlib.import_module(module_name)
    spec = importlib.util.spec_from_file_location("_baseline_copy", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    names = names.split(",")
    current = {n: getattr(module, n) for n in names}
    baseline = {n: getattr(old, n) for n in names}

    def use(kernels):
        for name, value in kernels.items():
            setattr(module, name, value)

    label = f"{module_name}: {', '.join(names)}"
    variants = _in_rounds(
        [(f"baseline ({os.path.basename(path)})", baseline), ("working tree", current)], rounds
    )
    config, model = build_scout_int4()
    rows_out += ["", f"## Decode step A/B: {label}"]
    runs = _step_variants(model, config, rows_out, variants, use, restore=current)
    _step_summary(rows_out, runs, variants[0][0])
    print("\n".join(rows_out[-(len(runs) + 4) :]), flush=True)


def _set_entry(table: dict, key, over) -> None:
    """``table[key] = over``, or no entry for ``key`` where ``over`` is empty or None (the rule applies)."""
    if over:
        table[key] = over
    else:
        table.pop(key, None)


# In-step candidates of the dense one-row GEMVs (section instep): overrides of TUNED["gemv"]; {} = the rule.
DENSE_STEP_CANDIDATES = [("rule", {})] + [
    (f"{bn}x{bk} w{w}" + (f" s{sp}" if sp else ""), _over(bn, bk, w, sp))
    for bn, bk, w, sp in ((32, 1024, 8, 1), (32, 512, 8, 1), (64, 512, 8, 1), (32, 1024, 4, 1), (16, 1024, 4, 1),
                          (32, 512, 4, 2), (64, 1024, 8, 1), (32, 2048, 8, 1))
]  # fmt: skip


def section_instep(rows_out, rounds: int = 2, lean: bool = False):
    """The decode GEMVs' per-shape configs chosen inside the Scout decode step rather than alone: for each of the
    four launches of a layer (q|k|v, o, the MoE gate_up and down at 2 slots), the graphed step (default build, 8K
    context, one prefill, mean of 30 replays) with each candidate config of that launch, the others as shipped,
    interleaved ``rounds`` times. Prints a table per launch; adopts nothing. ``lean``: the lean build (host
    embeddings + Int4 LM head) and its Int4 LM head's launch only."""
    from scout_mm.cache import KVCache
    from scout_mm.generation import GraphedDecode, prefill
    from scout_mm.quant import offload_embeddings

    config, model = build_scout_int4()
    text = config.text
    if lean:
        offload_embeddings(model)
        int4_lm_head(model)
        torch.cuda.empty_cache()
    cache = KVCache(text, 1, "cuda", torch.bfloat16)
    cache.reserve(0, 8192 + 64)
    torch.manual_seed(0)
    prompt = _random_prompt(config, 8192)
    launches = (("q|k|v 7168x5120", "gemv_by_shape", (7168, 5120), DENSE_STEP_CANDIDATES),
                ("o 5120x5120", "gemv_by_shape", (5120, 5120), DENSE_STEP_CANDIDATES),
                ("MoE gate_up, 2 slots", "moe_gemv_by_shape", (16384, 5120, 2), MOE_GATE_UP_CANDIDATES),
                ("MoE down, 2 slots", "moe_gemv_by_shape", (5120, 8192, 2), MOE_DOWN_CANDIDATES))  # fmt: skip
    if lean:
        head = (text.vocab_size, text.hidden_size)
        launches = ((f"Int4 LM head {head[0]}x{head[1]}", "gemv_by_shape", head,
                     DENSE_STEP_CANDIDATES + [("64x256 w8 s1", _over(64, 256, 8, 1))]),)  # fmt: skip
    with torch.no_grad():
        embeds, _ = model.embed_inputs(prompt, validate=False)
        prefill(model, cache, 0, embeds, 8192)
        tokens = torch.randint(0, text.vocab_size, (1, 1), device="cuda")
        positions = torch.full((1, 1), 8192, device="cuda")

        def step_ms():
            graphed = GraphedDecode(model, cache, tokens, positions)
            for _ in range(3):
                graphed(tokens, positions)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(30):
                logits = graphed(tokens, positions)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 30, logits[0].float().clone()

        for name, table_name, key, candidates in launches:
            table = int4.TUNED[table_name]
            shipped = table.get(key)
            candidates = [("shipped", shipped or {}), *candidates]
            times = {label: [] for label, _ in candidates}
            first = None
            try:
                for _ in range(rounds):
                    for label, over in candidates:
                        _set_entry(table, key, over)
                        ms, logits = step_ms()
                        times[label].append(ms)
                        first = logits if first is None else first
                        diff = float((logits - first).abs().max() / first.abs().max())
                        if diff > 2e-2:  # a config may change the fp32 summation order, not the result
                            raise AssertionError(f"{name} {label}: logits differ by {diff:.3g} (relative)")
            finally:
                _set_entry(table, key, shipped)
            base = min(times["shipped"])
            rows_out += ["", f"## Decode step with the {name} launch's config swept (shipped: {shipped})", "",
                         "| config | step ms per round | best | vs shipped |", "|---|---|---|---|"]  # fmt: skip
            for label, _ in candidates:
                best = min(times[label])
                rows_out.append(f"| {label} | "
                                f"{' / '.join(f'{t:.3f}' for t in times[label])} | {best:.3f} | {base / best:.3f}x |")  # fmt: skip
            print("\n".join(rows_out[-(len(candidates) + 4) :]), flush=True)


def section_downtable(rows_out, rounds: int = 3):
    """The decode MoE's down launch at 2 slots with session 8's recorded config (32x256 tiles, 6 K splits: the
    fastest alone) vs the GEMV rule (what ``instep`` found faster inside the step), at the three cache states of
    ``decodesplits``, interleaved ``rounds`` times."""
    key, session8 = (5120, 8192, 2), {"BLOCK_N": 32, "BLOCK_K": 256, "split_k": 6}
    table = int4.TUNED["moe_gemv_by_shape"]
    shipped = table.get(key)
    variants = [
        ("down at 2 slots: session 8's 32x256, 6 splits", session8),
        ("down at 2 slots: the rule", None),
    ]

    _three_cache_states(rows_out, "MoE down config", variants, lambda over: _set_entry(table, key, over), shipped,
                        rounds)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", default="tune,linear,moe")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--warm", default=None, help="i/n: compile the i-th of n shards of the tune candidates, time nothing"
    )
    parser.add_argument(
        "--adopt-tuned",
        action="store_true",
        help="the tune section's winners replace TUNED in this process for the later sections",
    )
    parser.add_argument(
        "--candidates", default="all", help="all | pipe | overlap | final | cap: the M=1 tune sweep"
    )
    parser.add_argument(
        "--rows", default=None, help="linear section: comma-separated M (default 1,16,64,4096)"
    )
    parser.add_argument(
        "--tokens", default=None, help="moe section: comma-separated T (default 1,16,64,512,4096)"
    )
    parser.add_argument(
        "--prompts",
        default=None,
        help="longctx section: comma-separated prompt lengths (default 32K,128K,256K)",
    )
    parser.add_argument(
        "--fit-prompts",
        default=None,
        help="longkv section: longer prompts tried with FP8 only (default 384K,512K)",
    )
    args = parser.parse_args()
    _select_candidates(args.candidates)
    global ROWS, TOKENS, LONG_PROMPTS, FIT_PROMPTS
    if args.prompts:
        LONG_PROMPTS = tuple(int(v) for v in args.prompts.split(","))
    if args.fit_prompts:
        FIT_PROMPTS = tuple(int(v) for v in args.fit_prompts.split(",") if v)
    if args.rows:
        ROWS = [int(v) for v in args.rows.split(",")]
    if args.tokens:
        TOKENS = [int(v) for v in args.tokens.split(",")]
    if args.warm:
        shard, n_shards = (int(v) for v in args.warm.split("/"))
        section_tune([], warm=(shard, n_shards))
        return
    rows = [f"# Int4 W4A16 kernels on {torch.cuda.get_device_name()}", "",
            f"Date {datetime.date.today()}, torch {torch.__version__}, triton "
            f"{__import__('triton').__version__}. Command: `PYTHONPATH=. python bench/bench_int4.py "
            f"{' '.join(sys.argv[1:])}`"]  # fmt: skip
    sections = {"tune": lambda rows: section_tune(rows, adopt=args.adopt_tuned), "probe": section_probe,
                "linear": section_linear, "moe": section_moe, "mma": section_mma, "mma16": section_mma16, "scout": section_scout,
                "profile": section_profile, "step": section_step, "rows": section_rows,
                "grid": section_grid, "splitstep": section_splitstep,
                "shapes": section_shapes, "moeshapes": section_moeshapes,
                "earlyids": section_earlyids, "longctx": section_longctx, "longkv": section_longkv,
                "dequantpasses": section_dequantpasses, "decodesplits": section_decodesplits,
                "baselineab": section_baselineab, "fusedmerge": section_fusedmerge,
                "instep": section_instep, "downtable": section_downtable,
                "instephead": lambda rows: section_instep(rows, lean=True), "tailsplit": section_tailsplit,
                "ropewrite": section_ropewrite, "fp8wide": section_fp8wide}  # fmt: skip
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            sections[name](rows)
        except Exception:
            rows += ["", f"section {name} failed:", "```", traceback.format_exc()[-3000:], "```"]
            print("\n".join(rows[-3:]), flush=True)
        print(f"[section {name}: {time.perf_counter() - start:.0f} s]", flush=True)
        torch.cuda.empty_cache()
        if args.out:
            write_text_atomically(args.out, "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
