"""EXPERIMENT (session 19): int4_wgmma (async wgmma, register A) vs the shipped int4_mma: correctness on ragged shapes,
then timings at the Scout shapes. Run from the repository root: PYTHONPATH=$PWD python bench/probe_int4_wgmma.py"""

import statistics
import sys

import torch

sys.path.insert(0, "bench")  # bench_int4 helpers
from bench_int4 import GROUP, copies_for, graph_us, packed, rotating

from scout_mm.kernels import int4_mma, int4_wgmma
from scout_mm.kernels import int4_reference as reference
from scout_mm.quant.format import pack_int4


def weight(size_k, size_n, group, symmetric, dtype):
    codes = torch.randint(0, 16, (size_k, size_n), device="cuda")
    scales = (torch.rand(size_k // group, size_n, device="cuda") * 0.1 + 0.01) / size_k**0.5
    zeros = None if symmetric else torch.randint(0, 16, scales.shape, device="cuda").to(dtype)
    return pack_int4(codes), scales.to(dtype), zeros


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


print("## correctness", flush=True)
bad = 0
for m, k, n, g in [
    (1, 1024, 200, 128),
    (3, 96, 136, 32),
    (8, 640, 72, 64),
    (9, 4096, 96, 128),
    (16, 512, 264, 32),
    (16, 256, 1000, 64),
    (16, 5120, 16384, 128),
    (13, 8192, 5120, 128),
    (16, 8192, 5120, 32),
    (2, 5120, 7168, 64),
]:
    for dtype in (torch.bfloat16, torch.float16):
        for sym in (True, False):
            for warps, pipe in ((4, 0), (4, 1), (8, 1)):
                w = weight(k, n, g, sym, dtype)
                x = torch.randn(m, k, device="cuda").to(dtype)
                out = int4_wgmma.launch(x, *w, g, int4_wgmma.wgmma_config(warps=warps, pipe=pipe))
                exact = x.double() @ reference.dequantize(*w, g, torch.float64)
                ref = reference.int4_linear(x, *w, g)
                mma = int4_mma.int4_linear_mma(x, *w, g)
                e1, e2, e3 = rel(out, exact), rel(out, ref), rel(mma, exact)
                tol = 3e-3 if dtype == torch.float16 else 2e-2
                ok = torch.isfinite(out).all().item() and e1 < tol / 2 and e2 < tol
                bad += not ok
                if not ok or (m, k) == (16, 5120):
                    print(
                        f"{'OK ' if ok else 'BAD'} m{m} k{k} n{n} g{g} {dtype} sym={sym} w{warps} p{pipe}: vs exact {e1:.2e} (mma {e3:.2e}) vs ref {e2:.2e}",
                        flush=True,
                    )
print("bad:", bad, flush=True)

print("## timing", flush=True)
CANDS = {
    f"wg w{w} occ{o} p{p}": dict(warps=w, occupancy=o, pipe=p)
    for w, o, p in ((4, 2, 0), (4, 3, 0), (4, 4, 0), (4, 2, 1), (4, 3, 1), (4, 4, 1), (8, 2, 1))
}
for size_n, size_k in [(16384, 5120), (5120, 8192), (7168, 5120), (5120, 5120)]:
    copies = copies_for(size_k * size_n // 2)
    pick = rotating(packed((), size_k, size_n, copies))
    wbytes = size_k * size_n / 2
    for m in (16, 8, 1):
        x = torch.randn(m, size_k, device="cuda", dtype=torch.bfloat16)
        cases = {
            "shipped mma": lambda x=x: int4_mma.int4_linear_mma(
                x, *pick(), GROUP, config=int4_mma.config_for_rows(x.shape[0])
            )
        }
        for name, kw in CANDS.items():
            cfg = int4_wgmma.wgmma_config(**kw)
            cases[name] = lambda x=x, cfg=cfg: int4_wgmma.launch(x, *pick(), GROUP, cfg)
        times = {c: [] for c in cases}
        for _ in range(3):
            for c, fn in cases.items():
                times[c].append(graph_us(fn))
        med = {c: statistics.median(t) for c, t in times.items()}
        for c, t in med.items():
            print(
                f"| {size_n}x{size_k} | {m} | {c} | {t:.1f} | {wbytes / t / 1e6:.2f} | {med['shipped mma'] / t:.3f}x |",
                flush=True,
            )
    torch.cuda.empty_cache()
