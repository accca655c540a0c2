"""Fused Triton MoE vs its anchors at Scout shapes, in one process, on one GPU.

    PYTHONPATH=. python bench/bench_moe.py                      # markdown tables to stdout
    PYTHONPATH=. python bench/bench_moe.py --tune --out r.md    # sweep kernel configs first, bench the winners

Anchors: the ``torch._grouped_mm`` pipeline (``scout_mm.kernels.reference.moe_experts`` on CUDA: sort,
gather, grouped_mm, SwiGLU, grouped_mm, un-permute, slot sum), a per-expert loop, and HF ``Llama4TextMoe``
(dense: every expert on every token, plus its router and shared expert). Times are medians of CUDA-event
timings after warm-up (``triton.testing.do_bench``) on random data. TFLOPS count routed FLOPs only
(2 * tokens * top_k * hidden * 3 * inter forward, 3x that forward+backward); GB/s count the expert weight
bytes the routed tokens touch.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from scout_mm.config import write_text_atomically
from scout_mm.kernels import moe, moe_configs, reference


def routed_problem(tokens, top_k, hidden_size, n_experts, dtype, generator):
    x = torch.randn(tokens, hidden_size, device="cuda", dtype=dtype, generator=generator)
    logits = torch.randn(tokens, n_experts, device="cuda", generator=generator)
    top_logits, ids = logits.topk(top_k, dim=1)
    return x, torch.sigmoid(top_logits).to(dtype), ids


def loop_moe(x, weights, ids, gate_up, down):
    """Per-expert loop anchor: sort rows, one pair of matmuls per expert (host sync for the counts)."""
    top_k = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // top_k
    rows = x[token] * weights.reshape(-1)[order, None]
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=gate_up.shape[0]).tolist()):
        if n:
            gate, up = (rows[start : start + n] @ gate_up[e]).chunk(2, dim=-1)
            out.index_add_(0, token[start : start + n], (F.silu(gate) * up) @ down[e])
        start += n
    return out


def hf_moe(hidden_size, inter_size, n_experts, top_k, dtype):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = Llama4TextConfig(
        hidden_size=hidden_size,
        intermediate_size=inter_size,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        hidden_act="silu",
    )
    with torch.device("cuda"):
        module = Llama4TextMoe(cfg).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def median_ms(fn, rep=100):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_ms(fn, reps=50):
    """Median of CUDA-graph replays of ``fn`` (decode: launch gaps gone)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=reps, return_mode="median")


# ----------------------------------------------------------------------------------------------------------
# Config sweep
# ----------------------------------------------------------------------------------------------------------

C = moe_configs._cfg
W = moe_configs._wgrad
# bucket bound (rows per expert), representative tokens at top-2 / 16 experts, route block, candidates
SWEEP = [
    (
        8,
        1,
        16,
        {
            "gate_up": [
                C(16, n, k, 4, s, 1) for n, k, s in [(128, 128, 4), (64, 128, 4), (64, 256, 3), (128, 64, 6)]
            ],
            "down": [
                C(16, n, k, 4, s, 1)
                for n, k, s in [(128, 128, 4), (128, 128, 6), (256, 64, 6), (128, 256, 3)]
            ],
        },
    ),
    (
        96,
        512,
        64,
        {
            "gate_up": [C(64, 128, 64, 4, 4), C(64, 128, 64, 8, 3), C(64, 128, 64, 4, 5)],
            "down": [C(64, 256, 64, 8, 3), C(64, 128, 128, 4, 3), C(64, 256, 64, 8, 4)],
            "down_bwd": [C(64, 64, 64, 4, 4), C(64, 128, 64, 4, 4)],
            "dx": [C(64, 256, 64, 8, 3), C(64, 256, 64, 8, 4)],
            "wgrad": [W(128, 128, 32, 4, 4), W(128, 128, 64, 4, 4)],
        },
    ),
    (
        768,
        4096,
        128,
        {
            "gate_up": [C(128, 128, 64, 8, 4), C(128, 128, 64, 8, 3), C(128, 128, 64, 8, 4, 16)],
            "down": [
                C(128, 128, 64, 8, 4),
                C(128, 256, 64, 8, 3),
                C(128, 256, 64, 8, 4),
                C(128, 128, 64, 8, 5),
            ],
            "down_bwd": [C(128, 128, 64, 8, 4), C(128, 128, 64, 8, 5), C(128, 64, 64, 4, 5)],
            "dx": [C(128, 256, 64, 8, 3), C(128, 256, 64, 8, 4), C(128, 128, 64, 8, 5)],
            "wgrad": [
                W(128, 128, 64, 4, 4),
                W(128, 128, 64, 4, 5),
                W(128, 128, 64, 8, 4),
                W(64, 128, 64, 4, 5),
            ],
        },
    ),
    (None, 16384, 128, None),  # same candidates as the bucket before
]


def sweep(gate_up, down, generator, log):
    """Time each kernel alone over its candidates; returns the TUNED list and per-kernel best times."""
    tuned, report = [], []
    candidates = None
    for bound, tokens, route_block, cands in SWEEP:
        candidates = cands or candidates
        best = _sweep_bucket(gate_up, down, tokens, route_block, candidates, generator, log, report)
        tuned.append((bound, best))
    return tuned, report


def _sweep_bucket(gate_up, down, tokens, route_block, candidates, generator, log, report):
    n_experts, hidden_size, two_inter = gate_up.shape
    inter_size = two_inter // 2
    dtype = gate_up.dtype
    x, weights, ids = routed_problem(tokens, 2, hidden_size, n_experts, dtype, generator)
    route = moe.Routing(ids, n_experts, route_block)
    base = dict(moe_configs.pick(tokens * 2 / n_experts))
    best = {"route_block": route_block}
    grad_out = torch.randn_like(x)
    h, preact = moe._gate_up(x, weights, route, gate_up, base["gate_up"], True)
    grad_preact, _ = moe._down_bwd(grad_out, weights, route, down, preact, base["down_bwd"])
    grad_down, grad_gate_up = torch.empty_like(down), torch.empty_like(gate_up)
    stride_e, stride_h, stride_j = gate_up.stride()
    runs = {
        "gate_up": lambda c: moe._gate_up(x, weights, route, gate_up, c, False),
        "down": lambda c: moe._scatter_rows_and_sum(
            h, route, down, down.stride(), tokens, hidden_size, dtype, c
        ),
        "down_bwd": lambda c: moe._down_bwd(grad_out, weights, route, down, preact, c),
        "dx": lambda c: moe._scatter_rows_and_sum(
            grad_preact, route, gate_up, (stride_e, stride_j, stride_h), tokens, hidden_size, dtype, c
        ),
        "wgrad": lambda c: (
            moe._expert_grad(h, False, grad_out, True, route, grad_down, c),
            moe._expert_grad(x, True, grad_preact, False, route, grad_gate_up, c),
        ),
    }
    rows = tokens * 2
    flops = {
        "gate_up": 2 * rows * hidden_size * two_inter,
        "down": 2 * rows * inter_size * hidden_size,
        "down_bwd": 2 * rows * inter_size * hidden_size,
        "dx": 2 * rows * hidden_size * two_inter,
        "wgrad": 2 * rows * 3 * hidden_size * inter_size,
    }
    route_ms = median_ms(lambda: moe.Routing(ids, n_experts, route_block), rep=40)
    report.append((tokens, "route", route_ms, float("nan"), {"route_block": route_block}))
    for kernel, run in runs.items():
        options = candidates.get(kernel)
        if not options:
            best[kernel] = base[kernel]
            continue
        timings = []
        for cfg in options:
            try:
                t0 = time.time()
                run(cfg)
                torch.cuda.synchronize()
                ms = median_ms(functools.partial(run, cfg), rep=40)
                timings.append((ms, cfg))
                log(f"tune T={tokens} {kernel} {json.dumps(cfg)} {ms:.4f} ms (first {time.time() - t0:.1f}s)")
            except Exception as error:  # a config past the shared-memory / register limits
                log(
                    f"tune T={tokens} {kernel} {json.dumps(cfg)} failed: {type(error).__name__}: {str(error)[:200]}"
                )
        if not timings:
            best[kernel] = base[kernel]
            continue
        ms, cfg = min(timings, key=lambda item: item[0])
        best[kernel] = cfg
        report.append((tokens, kernel, ms, flops[kernel] / ms / 1e9, cfg))
    return best


def tuned_source(tuned) -> str:
    """The sweep's winners as source for ``moe_configs.TUNED``."""
    lines = ["TUNED = ["]
    for bound, cfgs in tuned:
        lines.append(f"    ({bound}, {{")
        for name, cfg in cfgs.items():
            if name == "route_block":
                lines.append(f'        "route_block": {cfg},')
                continue
            maker = "_wgrad" if name == "wgrad" else "_cfg"
            blocks = [v for k, v in cfg.items() if k.startswith("BLOCK_")]
            extra = [cfg["num_warps"], cfg["num_stages"], cfg["GROUP_M"]]
            lines.append(f'        "{name}": {maker}({", ".join(map(str, blocks + extra))}),')
        lines.append("    }),")
    lines.append("]")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Main benchmark
# ----------------------------------------------------------------------------------------------------------


def bench_tokens(tokens, top_k, gate_up, down, generator, hf, backward, log):
    n_experts, hidden_size, two_inter = gate_up.shape
    x, weights, ids = routed_problem(tokens, top_k, hidden_size, n_experts, gate_up.dtype, generator)
    row = dict(
        flops=2 * tokens * top_k * hidden_size * 3 * (two_inter // 2),
        touched=int(torch.unique(ids).numel()) * 3 * hidden_size * (two_inter // 2) * gate_up.element_size(),
        fused=median_ms(lambda: moe.moe_experts(x, weights, ids, gate_up, down)),
        grouped=median_ms(lambda: reference.moe_experts(x, weights, ids, gate_up, down)),
        loop=median_ms(lambda: loop_moe(x, weights, ids, gate_up, down)),
        hf=float("nan"),
        fused_fb=float("nan"),
        grouped_fb=float("nan"),
    )
    if hf is not None:
        try:
            with torch.no_grad():
                row["hf"] = median_ms(lambda: hf(x[None]), rep=50)
        except torch.OutOfMemoryError:
            log(f"HF dense out of memory at T={tokens}")
        torch.cuda.empty_cache()
    if tokens == 1:
        row["fused_graph"] = graph_ms(lambda: moe.moe_experts(x, weights, ids, gate_up, down))
    if backward:
        leaves = [t.detach().requires_grad_() for t in (x, weights, gate_up, down)]
        grad_out = torch.randn_like(x)

        def fwd_bwd(fn):
            out = fn(leaves[0], leaves[1], ids, leaves[2], leaves[3])
            return torch.autograd.grad(out, leaves, grad_out)

        row["fused_fb"] = median_ms(lambda: fwd_bwd(moe.moe_experts))
        try:
            row["grouped_fb"] = median_ms(lambda: fwd_bwd(reference.moe_experts))
        except RuntimeError as error:  # no grouped_mm backward in this torch
            log(f"grouped_mm fwd+bwd failed at T={tokens}: {str(error)[:200]}")
    return row


def ceilings():
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    copy_ms = median_ms(functools.partial(torch.empty_like(src).copy_, src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b)
    return 2 * 2 * 1024**3 / copy_ms / 1e6, 2 * 8192**3 / mm_ms / 1e9  # GB/s (read + write), TFLOPS


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096, 16384])
    parser.add_argument("--top-k", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--inter", type=int, default=8192)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument(
        "--tune", action="store_true", help="sweep kernel configs first and bench the winners"
    )
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--hf-max-tokens", type=int, default=16384)
    parser.add_argument("--out", help="also write the markdown report here")
    parser.add_argument("--tuned-out", help="write the tuned TUNED source here")
    args = parser.parse_args()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    dtype = torch.bfloat16
    generator = torch.Generator(device="cuda").manual_seed(int(time.time()))
    hidden_size, inter_size, n_experts = args.hidden, args.inter, args.experts
    gate_up = torch.randn(n_experts, hidden_size, 2 * inter_size, device="cuda", generator=generator)
    gate_up = (gate_up / hidden_size**0.5).to(dtype)
    down = (
        torch.randn(n_experts, inter_size, hidden_size, device="cuda", generator=generator) / inter_size**0.5
    ).to(dtype)

    report_lines = []

    def emit(line=""):
        report_lines.append(line)
        print(line, flush=True)
        if args.out:
            write_text_atomically(args.out, "\n".join(report_lines) + "\n")

    copy_gbs, mm_tflops = ceilings()
    props = torch.cuda.get_device_properties(0)
    emit(f"# Fused MoE on {props.name}")
    emit()
    emit(
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}, triton {triton.__version__}"
    )
    emit(f"- command: `python {' '.join(sys.argv)}`")
    emit(
        f"- shapes: hidden {hidden_size}, inter {inter_size}, {n_experts} experts, bf16, router = top-k of random logits, sigmoid weights"
    )
    emit(
        f"- ceilings measured here: copy {copy_gbs:.0f} GB/s (read + write), 8192^3 bf16 matmul {mm_tflops:.0f} TFLOPS"
    )

    if args.tune:
        t0 = time.time()
        tuned, kernel_report = sweep(gate_up, down, generator, log)
        moe_configs.TUNED = tuned
        source = tuned_source(tuned)
        log(source)
        if args.tuned_out:
            write_text_atomically(args.tuned_out, source + "\n")
        emit(f"- configs: swept in this run ({time.time() - t0:.0f} s), best per kernel below")
        emit()
        emit("| tokens (top-2) | kernel | ms | TFLOPS | config |")
        emit("|---|---|---|---|---|")
        for tokens, kernel, ms, tflops, cfg in kernel_report:
            rate = "-" if kernel == "route" else f"{tflops:.0f}"
            emit(f"| {tokens} | {kernel} | {ms:.3f} | {rate} | `{json.dumps(cfg)}` |")
    else:
        emit("- configs: recorded in scout_mm/kernels/moe_configs.py")
    emit()

    results = {}
    for top_k in args.top_k:
        hf = None
        emit(
            f"## top-{top_k}"
            + (" (routed part of top-1 + shared; HF row includes its shared expert)" if top_k == 1 else "")
        )
        emit()
        emit(
            "| tokens | fused ms | fused TFLOPS | fused GB/s | grouped_mm ms | loop ms | HF dense ms | "
            "vs grouped_mm | fused fwd+bwd ms | fwd+bwd TFLOPS | grouped_mm fwd+bwd ms | fwd+bwd vs grouped_mm |"
        )
        emit("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for tokens in args.tokens:
            if hf is None and tokens <= args.hf_max_tokens:
                hf = hf_moe(hidden_size, inter_size, n_experts, top_k, dtype)
            row = bench_tokens(
                tokens,
                top_k,
                gate_up,
                down,
                generator,
                hf if tokens <= args.hf_max_tokens else None,
                not args.no_backward,
                log,
            )
            fused, grouped, loop, hf_ms, fb, gfb = (
                row[k] for k in ("fused", "grouped", "loop", "hf", "fused_fb", "grouped_fb")
            )
            flops, touched = row["flops"], row["touched"]
            results[(top_k, tokens)] = row
            emit(
                f"| {tokens} | {fused:.3f} | {flops / fused / 1e9:.1f} | {touched / fused / 1e6:.0f} | {grouped:.3f} | "
                f"{loop:.3f} | {hf_ms:.3f} | {grouped / fused:.2f}x | {fb:.3f} | {3 * flops / fb / 1e9:.1f} | "
                f"{gfb:.3f} | {gfb / fb:.2f}x |"
            )
            torch.cuda.empty_cache()
        del hf
        torch.cuda.empty_cache()
        emit()

    emit("## Goals")
    emit()
    for top_k, tokens in itertools.product([2], args.tokens):
        row = results.get((top_k, tokens))
        if row is None:
            continue
        tflops = row["flops"] / row["fused"] / 1e9
        if tokens == 16384:
            emit(
                f"- T=16384 forward: {tflops:.0f} TFLOPS (goal 600: {'met' if tflops >= 600 else f'missed by {600 - tflops:.0f}'}), "
                f"{row['grouped'] / row['fused']:.2f}x grouped_mm (goal 1.15x)"
            )
            fb = 3 * row["flops"] / row["fused_fb"] / 1e9
            emit(
                f"- T=16384 forward+backward: {fb:.0f} TFLOPS (goal 420: {'met' if fb >= 420 else f'missed by {420 - fb:.0f}'}), "
                f"{row['grouped_fb'] / row['fused_fb']:.2f}x grouped_mm autograd"
            )
        if 512 <= tokens <= 4096:
            ratio = row["grouped"] / row["fused"]
            emit(
                f"- T={tokens} forward: {ratio:.2f}x grouped_mm (goal 1.2x: {'met' if ratio >= 1.2 else 'missed'})"
            )
        if tokens == 1:
            eager = row["touched"] / row["fused"] / 1e6
            graph = row["touched"] / row["fused_graph"] / 1e6
            emit(
                f"- T=1 decode: {eager:.0f} GB/s eager ({row['fused'] * 1e3:.0f} us), {graph:.0f} GB/s as a CUDA graph "
                f"({row['fused_graph'] * 1e3:.0f} us) (goal 2400 GB/s: {'met' if max(eager, graph) >= 2400 else 'missed'})"
            )


if __name__ == "__main__":
    main()
