"""Does a persistent kernel with grid barriers beat a PDL chain of separate GEMV launches at batch-1 decode?

The question behind the 250 tok/s goal (bench/results/int4_decode_step_h100.md): a decode step is ~10 launches a
layer, and each launch pays a ramp-up and a drain. A persistent "megakernel" pays a grid barrier instead. This probe
times the matmul skeleton of Scout's 48 layers both ways, with the same one-row GEMV math
(``scout_mm.kernels.int4._gemv_columns``, 32 x 1024 tiles, 8 warps, one tile ahead in registers):

- **chain**: per layer q|k|v 7168x5120, o 5120x5120, gate_up of two slots 32768x5120 and down of two slots
  5120x16384, each an ``int4_linear`` launch with its shipped config, PDL on, one CUDA graph (the decode step's
  launch structure for its matmuls; the MoE's own launches are these shapes' expert-indexed versions);
- **persistent**: the same 192 matmuls in ONE launch of ``P`` programs (all resident). Each matmul's work, (column
  tile, 1024-row K tile) units, is cut into P even contiguous ranges (stream-K: every program the same bytes); a
  program adds each column tile's partial into an fp32 output with atomics, then all programs meet at a grid
  barrier (one counter: a release add, a spin on a volatile load, an acquire) before the next matmul reads that
  output. The outputs are zeroed by one memset in the same graph.

Each matmul's input is the first K entries of the previous one's output: the dependency chain of a decode step
without its attention, norms and router. Weights: 48 layers' worth (7.6 GB), so nothing stays in the L2.

    PYTHONPATH=$PWD python bench/probe_persistent_chain.py [--layers 48] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl
from bench_int4 import graph_us

from scout_mm.config import write_text_atomically
from scout_mm.kernels import int4
from scout_mm.kernels.int4 import _gemv_columns

SHAPES = [(7168, 5120), (5120, 5120), (32768, 5120), (5120, 16384)]  # (N, K) of one layer's matmuls
G = 128
TILES = [(32, 512, 8), (64, 256, 4), (32, 1024, 8)]  # (BLOCK_N, BLOCK_K, warps) of the persistent kernel


@triton.jit
def _chain_kernel(io_ptr, qw_tab, s_tab, n_tab, k_tab, in_tab, out_tab, counter_ptr, n_phases,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    for phase in range(n_phases):
        # alignment hints (every size and offset is a multiple of 64): vectorised loads, as with kernel arguments
        size_n = tl.multiple_of(tl.load(n_tab + phase), 64)
        size_k = tl.multiple_of(tl.load(k_tab + phase), 64)
        qw = tl.multiple_of(tl.load(qw_tab + phase).to(tl.pointer_type(tl.int32)), 16)
        sp = tl.multiple_of(tl.load(s_tab + phase).to(tl.pointer_type(tl.bfloat16)), 16)
        x = tl.multiple_of(io_ptr + tl.load(in_tab + phase), 16)
        out = tl.multiple_of(io_ptr + tl.load(out_tab + phase), 16)
        k_tiles = tl.cdiv(size_k, BLOCK_K)
        units = tl.cdiv(size_n, BLOCK_N) * k_tiles
        u0 = pid * units // n_prog
        u1 = (pid + 1) * units // n_prog
        if u1 > u0:
            for c in range(u0 // k_tiles, (u1 - 1) // k_tiles + 1):
                k_begin = (tl.maximum(u0, c * k_tiles) - c * k_tiles) * BLOCK_K
                k_end = tl.minimum((tl.minimum(u1, (c + 1) * k_tiles) - c * k_tiles) * BLOCK_K, size_k)
                offs_n = c * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = offs_n < size_n
                rows = tl.zeros([1], dtype=tl.int64)
                acc = _gemv_columns(x, qw, sp, sp, offs_n, n_ok, rows, k_begin, k_end, size_n, 0, G, True, 1,
                                    BLOCK_N, BLOCK_K, 2, True, "evict_first", qw, 0, 0, 0, 1)  # fmt: skip
                tl.atomic_add(out + offs_n[None, :], acc, mask=n_ok[None, :], sem="relaxed")
        # grid barrier: every program's atomics are done before its (release) arrival; spin; acquire
        tl.debug_barrier()
        target = (phase + 1) * n_prog
        seen = tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu") + 1
        while seen < target:
            seen = tl.load(counter_ptr, volatile=True)
        tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


def _weights(layers: int):
    out = []
    for _ in range(layers):
        for size_n, size_k in SHAPES:
            qweight = torch.randint(
                -(2**31), 2**31 - 1, (size_k // 8, size_n), dtype=torch.int32, device="cuda"
            )
            scales = (torch.rand(size_k // G, size_n, device="cuda") * 2e-3 + 1e-3).to(torch.bfloat16)
            out.append((qweight, scales))
    return out


def chain(weights, x):
    """The PDL chain: one int4_linear launch per matmul, each input the previous output's first K entries."""
    for qweight, scales in weights:
        x = int4.int4_linear(x[:, : qweight.shape[0] * 8], qweight, scales, None, G)
    return x


class Persistent:
    def __init__(self, weights, programs: int, block_n: int = 32, block_k: int = 512, warps: int = 8):
        dev = "cuda"
        self.weights, self.programs, self.block_n, self.block_k = weights, programs, block_n, block_k
        self.warps = warps
        self.n_tab = torch.tensor([q.shape[1] for q, _ in weights], dtype=torch.int32, device=dev)
        self.k_tab = torch.tensor([q.shape[0] * 8 for q, _ in weights], dtype=torch.int32, device=dev)
        self.qw_tab = torch.tensor([q.data_ptr() for q, _ in weights], dtype=torch.int64, device=dev)
        self.s_tab = torch.tensor([s.data_ptr() for _, s in weights], dtype=torch.int64, device=dev)
        # io: [x0 (K of the first matmul)] [out of matmul 0] [out of matmul 1] ...
        sizes = [weights[0][0].shape[0] * 8] + [q.shape[1] for q, _ in weights]
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + -(-size // 64) * 64)
        self.in_tab = torch.tensor(offsets[:-1], dtype=torch.int64, device=dev)
        self.out_tab = torch.tensor(offsets[1:], dtype=torch.int64, device=dev)
        self.io = torch.zeros(offsets[-1] + sizes[-1], dtype=torch.float32, device=dev)
        self.first = sizes[0]
        self.counter = torch.zeros(1, dtype=torch.int32, device=dev)

    def __call__(self, x, n_phases=None):
        n_phases = n_phases or len(self.weights)
        self.io[self.first :].zero_()
        self.counter.zero_()
        self.io[: self.first].copy_(x[0, : self.first])
        return _chain_kernel[(self.programs,)](
            self.io, self.qw_tab, self.s_tab, self.n_tab, self.k_tab, self.in_tab, self.out_tab, self.counter,
            n_phases, BLOCK_N=self.block_n, BLOCK_K=self.block_k, G=G, num_warps=self.warps,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
        "",
    ]
    weights = _weights(args.layers)
    x = torch.randn(1, SHAPES[0][1], device="cuda", dtype=torch.bfloat16) * 0.1
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = {"chain (PDL, shipped configs)": lambda: chain(weights, x)}
    for block_n, block_k, warps in TILES:
        # Correctness of the persistent form: its first two matmuls against int4_linear.
        probe = Persistent(weights, sms, block_n, block_k, warps)
        compiled = probe(x, n_phases=2)
        torch.cuda.synchronize()
        y0 = int4.int4_linear(x, *weights[0], None, G).float()
        got0 = probe.io[probe.out_tab[0] : probe.out_tab[0] + y0.shape[1]]
        y1 = int4.int4_linear(y0.to(torch.bfloat16)[:, : SHAPES[1][1]], *weights[1], None, G).float()
        got1 = probe.io[probe.out_tab[1] : probe.out_tab[1] + y1.shape[1]]
        err0 = float((got0 - y0[0]).norm() / y0.norm())
        err1 = float((got1 - y1[0]).norm() / y1.norm())
        # Every program must be resident at once (the barrier waits for all of them)
        per_sm_max = min(
            65536 // (compiled.n_regs * 32 * warps), 228 * 1024 // max(compiled.metadata.shared, 1), 3
        )
        rows.append(f"tile {block_n}x{block_k}, {warps} warps: {compiled.n_regs} registers, {per_sm_max} programs a "
                    f"SM fit; vs int4_linear, relative error: matmul 0 {err0:.2e}, matmul 1 {err1:.2e}")  # fmt: skip
        print(rows[-1], flush=True)
        assert err0 < 1e-2 and err1 < 2e-2
        for per_sm in range(1, per_sm_max + 1):
            p = Persistent(weights, per_sm * sms, block_n, block_k, warps)
            cases[f"persistent {block_n}x{block_k} w{warps}, {per_sm} a SM"] = lambda p=p: p(x)
    wbytes = sum(q.numel() * 4 + s.numel() * 2 for q, s in weights)
    rows += ["", f"{args.layers} layers, {len(weights)} matmuls, {wbytes / 1e9:.2f} GB of weights + scales", "",
             "| variant | us per step | TB/s | vs chain |", "|---|---|---|---|"]  # fmt: skip
    times = {name: [] for name in cases}
    for _ in range(3):
        for name, fn in cases.items():
            times[name].append(graph_us(fn, calls=2, replays=10))
    base = statistics.median(times["chain (PDL, shipped configs)"])
    for name, t in times.items():
        med = statistics.median(t)
        rows.append(f"| {name} | {med:.0f} | {wbytes / med / 1e6:.2f} | {base / med:.3f}x |")
        print(rows[-1], flush=True)
    if args.out:
        write_text_atomically(args.out, "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
