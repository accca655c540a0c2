"""How fast the decode GEMVs' weight loads can stream with no math, and whether PTX load hints help.

A Gluon kernel streams the packed Int4 words of one weight in the one-row GEMV's access pattern: a thread loads 4
adjacent columns (16 bytes), each program walks its column tile down its K split with the next tile loaded one
step ahead in registers, programs side by side over N. The words are XOR-folded into a per-column result, so
nothing is optimised away, and every load form must give the plain load's result (checked). Load forms: ``gl.load``
and inline ``ld.global`` with an L2 prefetch-size hint (``.L2::128B`` / ``.L2::256B``), with ``.nc``, and with
``.L1::no_allocate``. Beside them, a ``copy_`` of the same bytes (read + write) as the copy anchor. Weights rotate
over >= 256 MB; medians of CUDA-graph replays (``bench_int4.graph_us``), 2 interleaved rounds, best round kept.

    PYTHONPATH=$PWD python bench/probe_int4_stream.py

Results: bench/results/int4_gemv_h100.md, session 16.
"""

from __future__ import annotations

import torch
from bench_int4 import graph_us, rotating
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

_LD = "ld.global{}.v4.b32 {{$0,$1,$2,$3}}, [$4];"
LOADS = {  # name -> PTX of one 16-byte load ("" = gl.load)
    "gl.load": "",
    "ld.global": _LD.format(""),
    "L2::128B": _LD.format(".L2::128B"),
    "L2::256B": _LD.format(".L2::256B"),
    "nc L1::no_allocate L2::256B": _LD.format(".nc.L1::no_allocate.L2::256B"),
    "nc L2::256B": _LD.format(".nc.L2::256B"),
}
# (word rows a tile, columns a tile, warps, K splits)
CONFIGS = [(32, 32, 4, 4), (16, 32, 8, 4), (32, 32, 8, 2), (32, 64, 4, 4), (32, 64, 8, 4), (64, 64, 8, 2),
           (16, 128, 4, 4), (32, 128, 8, 2)]  # fmt: skip
SHAPES = [(16384, 5120), (5120, 8192), (7168, 5120), (5120, 5120)]  # (N, K)


@gluon.jit
def _load(ptrs, ASM: gl.constexpr):
    if ASM == "":
        return gl.load(ptrs)
    # pack=4: the 4 adjacent columns of a thread (its layout's contiguous registers) in one 16-byte load
    return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,l,l,l,l", [ptrs], dtype=gl.int32, is_pure=True, pack=4)


@gluon.jit
def _stream_kernel(w_ptr, out_ptr, size_n, rows_per_split, BLOCK_R: gl.constexpr, BLOCK_N: gl.constexpr,
                   ASM: gl.constexpr, WARPS: gl.constexpr):  # fmt: skip
    TN: gl.constexpr = BLOCK_N // 4 if BLOCK_N // 4 < 32 else 32  # threads across the columns
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TN, TN], [WARPS, 1], [1, 0])
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    rows = pid_k * rows_per_split + gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, layout))
    ptrs = w_ptr + gl.expand_dims(rows.to(gl.int64) * size_n, 1) + gl.expand_dims(cols, 0)
    acc = gl.zeros([BLOCK_R, BLOCK_N], gl.int32, layout=layout)
    nxt = _load(ptrs, ASM)
    for step in range(1, rows_per_split // BLOCK_R):
        cur = nxt
        nxt = _load(ptrs + step * BLOCK_R * size_n, ASM)
        acc ^= cur * 3 + (cur >> 7)
    acc ^= nxt
    gl.store(out_ptr + pid_k * size_n + cols, gl.sum(acc, axis=0))


def _time_config(weights, pick, size_n, rows, config) -> list[str] | None:
    """The table cells of one config: each load form's best-round us and ratio to ``gl.load`` (None: the
    config's tiles do not divide the shape)."""
    block_r, block_n, warps, splits = config
    per_split = rows // splits
    if per_split % block_r or size_n % block_n:
        return None
    grid = (size_n // block_n, splits)
    out = torch.empty(splits, size_n, dtype=torch.int32, device="cuda")

    def run(asm, w):
        _stream_kernel[grid](w, out, size_n, per_split, BLOCK_R=block_r, BLOCK_N=block_n, ASM=asm, WARPS=warps,
                             num_warps=warps)  # fmt: skip

    run("", weights[0])
    want = out.clone()
    for name, asm in LOADS.items():
        run(asm, weights[0])
        if not torch.equal(out, want):
            raise AssertionError(f"{size_n}x{rows * 8} {config} {name}: not the plain load's result")
    times = {name: [] for name in LOADS}
    for _ in range(2):
        for name, asm in LOADS.items():
            times[name].append(graph_us(lambda asm=asm: run(asm, pick())))
    base = min(times["gl.load"])
    return [str(grid[0] * grid[1])] + [f"{min(t):.1f} ({base / min(t):.3f}x)" for t in times.values()]


def _shape(size_n: int, size_k: int) -> None:
    rows = size_k // 8
    nbytes = rows * size_n * 4
    copies = max(2, (256 << 20) // nbytes + 1)
    weights = [torch.randint(-(2**31), 2**31 - 1, (rows, size_n), dtype=torch.int32, device="cuda")
               for _ in range(copies)]  # fmt: skip
    pick = rotating(weights)
    dst = torch.empty_like(weights[0])
    t_copy = graph_us(lambda: dst.copy_(pick()))
    print(f"| {size_n}x{size_k} | copy_ (read + write) | | {t_copy:.1f} us = {2 * nbytes / t_copy / 1e6:.2f} "
          "TB/s moved |" + " |" * (len(LOADS) - 1))  # fmt: skip
    for config in CONFIGS:
        cells = _time_config(weights, pick, size_n, rows, config)
        if cells is not None:
            print(
                f"| {size_n}x{size_k} | {', '.join(map(str, config))} | " + " | ".join(cells) + " |",
                flush=True,
            )


def main() -> None:
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    print(f"# Bare weight stream, {props.name}, torch {torch.__version__}\n")
    print("| N x K | config (word rows, columns, warps, K splits) | programs | " + " | ".join(LOADS) + " |")
    print("|---|---|---|" + "---|" * len(LOADS))
    for size_n, size_k in SHAPES:
        _shape(size_n, size_k)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
