"""int4_mma with a warp-specialised TMA producer (``scout_mm.kernels.int4_mma_ws``) against the shipped int4_mma.

First a correctness pass on fresh random inputs (ragged N, groups 32/64/128, 1-16 rows, bf16/fp16, symmetric and
asymmetric): the error of both kernels against the fp64 product of the dequantised weight, and their difference.
Then timings at the Scout shapes (weights rotating over >= 200 MB, medians of CUDA-graph replays, interleaved
rounds) of the shipped config for the row count and of the producer configs in ``CONFIGS``.

    PYTHONPATH=$PWD python bench/probe_int4_ws.py [--out FILE] [--rounds 2] [--rows 16 8 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from bench_int4 import copies_for, graph_us, packed, rotating

from scout_mm.config import write_text_atomically
from scout_mm.kernels import int4_mma
from scout_mm.kernels.int4_mma_ws import int4_linear_mma_ws, ws_config
from scout_mm.kernels.int4_reference import dequantize

SHAPES = [(16384, 5120), (5120, 8192), (7168, 5120), (5120, 5120)]  # (N, K)
CONFIGS = {
    "w4 s4 occ2 r128": ws_config(4, 128, 4, 2.0, maxnreg=128),
    "w4 s6 occ2 r128": ws_config(4, 128, 6, 2.0, maxnreg=128),
    "w4 s4 occ4 r128": ws_config(4, 128, 4, 4.0, maxnreg=128),
    "w4 s4 occ3 r80": ws_config(4, 128, 4, 3.0, maxnreg=80),
    "w4 s3 k256 occ2 r128": ws_config(4, 256, 3, 2.0, maxnreg=128),
    "w8 s4 occ1 r160": ws_config(8, 128, 4, 1.0, maxnreg=160),
    "w8 s6 occ2 r80": ws_config(8, 128, 6, 2.0, maxnreg=80),
}


def check(rows_out) -> bool:
    rows_out += ["## Correctness: error against the fp64 product", "",
                 "| N x K | G | M | dtype | sym | shipped err | ws err | max abs(ws - shipped) | ok |",
                 "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(0)
    ok_all = True
    cases = [
        (100, 256, 32),
        (1000, 512, 64),
        (516, 1024, 128),
        (4096, 640, 128),
        (260, 384, 128),
        (2052, 5120, 128),
    ]
    for (size_n, size_k, g), m_rows, dtype, sym in [
        (c, m, d, s) for c in cases for m in (1, 5, 8, 13, 16) for d in (torch.bfloat16, torch.float16)
        for s in (True, False)
    ]:  # fmt: skip
        qweight = torch.randint(-(2**31), 2**31 - 1, (size_k // 8, size_n), dtype=torch.int32, device="cuda",
                                generator=gen)  # fmt: skip
        scales = (torch.rand(size_k // g, size_n, device="cuda", generator=gen) * 0.02 + 0.001).to(dtype)
        zeros = (
            None
            if sym
            else torch.randint(0, 16, (size_k // g, size_n), device="cuda", generator=gen).to(dtype)
        )
        x = torch.randn(m_rows, size_k, device="cuda", dtype=dtype, generator=gen)
        w = dequantize(qweight, scales, zeros, g).double()  # (K, N)
        exact = x.double() @ w
        ref = int4_mma.int4_linear_mma(x, qweight, scales, zeros, g, config=int4_mma.config_for_rows(m_rows))
        got = int4_linear_mma_ws(x, qweight, scales, zeros, g)
        scale = exact.abs().max().item()
        e_ref = (ref.double() - exact).abs().max().item() / scale
        e_ws = (got.double() - exact).abs().max().item() / scale
        diff = (got.double() - ref.double()).abs().max().item()
        ok = e_ws <= 1.5 * e_ref + 1e-3 and torch.isfinite(got).all().item()
        ok_all &= ok
        if not ok or m_rows == 16:
            rows_out.append(f"| {size_n}x{size_k} | {g} | {m_rows} | {str(dtype)[6:]} | {sym} | {e_ref:.2e} | "
                            f"{e_ws:.2e} | {diff:.2e} | {'yes' if ok else 'NO'} |")  # fmt: skip
            print(rows_out[-1], flush=True)
    rows_out += ["", f"All cases ok: {ok_all}", ""]
    print(rows_out[-2], flush=True)
    return ok_all


def timings(rows_out, rounds: int, row_counts) -> None:
    rows_out += ["## Timings (group 128, symmetric, bf16)", "",
                 "| N x K | M | kernel | us | Int4 TB/s | vs shipped |", "|---|---|---|---|---|---|"]  # fmt: skip
    for size_n, size_k in SHAPES:
        pick = rotating(packed((), size_k, size_n, copies_for(size_k * size_n // 2)))
        wbytes = size_k * size_n / 2
        for m_rows in row_counts:
            x = torch.randn(m_rows, size_k, device="cuda", dtype=torch.bfloat16)
            shipped = int4_mma.config_for_rows(m_rows)
            cases = {
                "shipped int4_mma": lambda x=x, c=shipped, pick=pick: int4_mma.int4_linear_mma(
                    x, *pick(), 128, config=c
                )
            }
            for name, cfg in CONFIGS.items():
                cases[name] = lambda x=x, c=cfg, pick=pick: int4_linear_mma_ws(x, *pick(), 128, config=c)
            times = {name: [] for name in cases}
            for _ in range(rounds):
                for name, fn in cases.items():
                    try:
                        times[name].append(graph_us(fn))
                    except Exception as exc:  # a config that does not compile or launch: reported, not fatal
                        print(f"{name}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr, flush=True)
                        times[name].append(float("nan"))
            med = {name: statistics.median(t) for name, t in times.items()}
            for name, t in med.items():
                rows_out.append(f"| {size_n}x{size_k} | {m_rows} | {name} | {t:.1f} | {wbytes / t / 1e6:.2f} | "
                                f"{med['shipped int4_mma'] / t:.3f}x |")  # fmt: skip
                print(rows_out[-1], flush=True)
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 8, 1])
    args = parser.parse_args()
    rows_out = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    try:
        if check(rows_out):
            timings(rows_out, args.rounds, args.rows)
    finally:
        if args.out:
            write_text_atomically(args.out, "\n".join(rows_out) + "\n")


if __name__ == "__main__":
    main()
