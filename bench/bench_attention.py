"""Attention benchmark: the Triton kernels beside PyTorch SDPA (flash, cuDNN) and FlexAttention.

Scout heads (40 q / 8 kv, head_dim 128), bf16, batch 1, random inputs; CUDA-event medians after warm-up.

    python bench/bench_attention.py                      # the table; writes bench/results/attention_h100.md
    python bench/bench_attention.py --tune               # sweep the kernels' launch configs instead
    python bench/bench_attention.py --skip-flex          # without FlexAttention (saves its compile time)
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from scout_mm.kernels import attention as dispatch_attention
from scout_mm.kernels.flash_attention import _SDPA_BACKEND, _backward, _forward, attention, prefer_sdpa
from scout_mm.kernels.flash_decode import decode_attention, decode_sdpa

_decode_module = sys.modules["scout_mm.kernels.flash_decode"]

N_HEADS, N_KV_HEADS, HEAD_DIM = 40, 8, 128
SCALE = HEAD_DIM**-0.5
DEV = "cuda"


def time_ms(fn, budget_s: float = 0.4, min_reps: int = 5, max_reps: int = 50) -> float:
    """Median of CUDA-event timings after warm-up (the first calls also compile)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = int(min(max_reps, max(min_reps, budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rand(*shape):
    return torch.randn(*shape, device=DEV, dtype=torch.bfloat16)


def prefill_flops(seq: int, chunk: int | None) -> float:
    """Forward matmul FLOPs over visible (query, key) pairs: 4 * head_dim per pair per head."""
    c = chunk or seq
    full, rest = divmod(seq, c)
    pairs = full * c * (c + 1) // 2 + rest * (rest + 1) // 2
    return 4.0 * N_HEADS * HEAD_DIM * pairs


# ---------------------------------------------------------------------------------------- backends


def sdpa(backend: SDPBackend, chunk: int | None):
    """SDPA on one backend; chunked attention as causal attention over chunks folded into the batch."""

    def run(q, k, v):
        seq = q.shape[2]
        if chunk is not None and chunk < seq:
            # Chunks folded into the batch and the output unfolded again (the copies are part of the cost).
            assert seq % chunk == 0
            n_chunks = seq // chunk
            fold = lambda x: x.view(1, x.shape[1], n_chunks, chunk, HEAD_DIM).transpose(1, 2).flatten(0, 1)
            out = run_sdpa(fold(q), fold(k), fold(v))
            return (
                out.view(1, n_chunks, N_HEADS, chunk, HEAD_DIM)
                .transpose(1, 2)
                .reshape(1, N_HEADS, seq, HEAD_DIM)
            )
        return run_sdpa(q, k, v)

    def run_sdpa(q, k, v):
        with sdpa_kernel([backend]):
            try:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
                run.note = ""
            except RuntimeError:
                # This backend takes no GQA: time it on repeated K/V (what a caller would have to do).
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
                run.note = "K/V repeated (no GQA support)"
        return out

    run.note = ""
    return run


def flex(chunk: int | None, seq: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if chunk is None:
        mask_mod = lambda b, h, q, kv: q >= kv
    else:
        mask_mod = lambda b, h, q, kv: (q >= kv) & (q // chunk == kv // chunk)
    compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = []

    def run(q, k, v):
        if not block_mask:  # built on first use, so that a failure here is reported as this backend's
            # _compile: build the block mask without a dense (seq x seq) mask (128 GiB at 128K).
            block_mask.append(create_block_mask(mask_mod, None, None, seq, seq, device=DEV, _compile=True))
        return compiled(q, k, v, block_mask=block_mask[0], scale=SCALE, enable_gqa=True)

    run.note = "compiled, block mask"
    return run


def ours(chunk):
    def run(q, k, v):
        return attention(q, k, v, scale=SCALE, chunk_size=chunk)

    run.note = ""
    return run


def dispatched(chunk):
    def run(q, k, v):
        return dispatch_attention(q, k, v, scale=SCALE, chunk_size=chunk)

    run.note = ""
    return run


# ------------------------------------------------------------------------------------------- cases


def prefill_case(rows, seq, chunk, backward, backends):
    q, k, v = (
        rand(1, N_HEADS, seq, HEAD_DIM),
        rand(1, N_KV_HEADS, seq, HEAD_DIM),
        rand(1, N_KV_HEADS, seq, HEAD_DIM),
    )
    flops = prefill_flops(seq, chunk) * (3.5 if backward else 1.0)  # backward = 2.5x forward (5 matmuls vs 2)
    kind = "chunked" if chunk and chunk < seq else "causal"
    name = (
        f"{kind}{f' {chunk}' if kind == 'chunked' else ''} {'fwd+bwd' if backward else 'fwd'} {seq // 1024}K"
    )
    if backward:
        for x in (q, k, v):
            x.requires_grad_(True)
        dout = rand(1, N_HEADS, seq, HEAD_DIM)
    reference_out = None
    for label, fn in backends:
        try:
            if backward:

                def step(fn=fn):
                    q.grad = k.grad = v.grad = None
                    fn(q, k, v).backward(dout)

                ms = time_ms(step)
            else:
                with torch.no_grad():
                    ms = time_ms(lambda fn=fn: fn(q, k, v))
            with torch.no_grad():
                out = fn(q, k, v)
            if reference_out is None:
                reference_out, err = out.float(), 0.0
            else:
                err = ((out.float() - reference_out).norm() / reference_out.norm()).item()
            rows.append(dict(case=name, backend=label, ms=ms, rate=flops / ms / 1e9, unit="TFLOPS",
                             note=fn.note, err=err))  # fmt: skip
        except Exception as exc:  # a backend that cannot run this case is reported, not fatal
            rows.append(dict(case=name, backend=label, ms=float("nan"), rate=float("nan"), unit="TFLOPS",
                             note=f"failed: {type(exc).__name__}: {str(exc)[:80]}", err=float("nan")))  # fmt: skip
        print(rows[-1], flush=True)
    # Dispatch: the fastest of the kernel and the SDPA backends that take GQA natively, for this case.
    timed = {r["backend"]: r for r in rows if r["case"] == name and r["ms"] == r["ms"] and not r["note"]}
    sdpa_names = {"SDPA cuDNN": "cudnn", "SDPA flash (FA2)": "flash"}
    best = min((b for b in timed if b == "triton (ours)" or b in sdpa_names), key=lambda b: timed[b]["ms"])
    key = ("chunked" if chunk and chunk < seq else "causal", "fwd+bwd" if backward else "fwd")
    _SDPA_BACKEND[key] = sdpa_names.get(best)
    print(f"DISPATCH {key} -> {_SDPA_BACKEND[key]} (fastest: {best})", flush=True)
    fn = dispatched(chunk)
    if backward:

        def step():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(dout)

        ms = time_ms(step)
    else:
        with torch.no_grad():
            ms = time_ms(lambda: fn(q, k, v))
    rows.append(dict(case=name, backend="dispatch auto", ms=ms, rate=flops / ms / 1e9, unit="TFLOPS",
                     note=f"runs {_SDPA_BACKEND[key] or 'triton'}", err=float("nan")))  # fmt: skip
    print(rows[-1], flush=True)
    # The fastest backend timed once more, after everything else: the spread shows the timing noise.
    label, fn = next((lb, f) for lb, f in backends if lb == best)
    if backward:

        def step_again():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(dout)

        ms = time_ms(step_again)
    else:
        with torch.no_grad():
            ms = time_ms(lambda: fn(q, k, v))
    rows.append(dict(case=name, backend=f"{label} (again)", ms=ms, rate=flops / ms / 1e9, unit="TFLOPS",
                     note="repeat: timing spread", err=float("nan")))  # fmt: skip
    print(rows[-1], flush=True)
    return name


def decode_case(rows, n_keys, paged_block, backends_flex):
    q = rand(1, N_HEADS, 1, HEAD_DIM)
    kv_bytes = 2 * n_keys * N_KV_HEADS * HEAD_DIM * 2
    lens = torch.tensor([n_keys], device=DEV, dtype=torch.int32)
    name = f"decode 1 tok {'paged' if paged_block else 'contiguous'} {n_keys // 1024}K"
    if paged_block:
        n_blocks = n_keys // paged_block
        k, v = (
            rand(n_blocks, paged_block, N_KV_HEADS, HEAD_DIM),
            rand(n_blocks, paged_block, N_KV_HEADS, HEAD_DIM),
        )
        table = torch.randperm(n_blocks, device=DEV, dtype=torch.int32).view(1, n_blocks)
        backends = [(f"triton split-K (block {paged_block})",
                     lambda: decode_attention(q, k, v, scale=SCALE, kv_lens=lens, block_table=table)[0])]  # fmt: skip
    else:
        k, v = rand(1, N_KV_HEADS, n_keys, HEAD_DIM), rand(1, N_KV_HEADS, n_keys, HEAD_DIM)
        backends = [
            ("triton split-K", lambda: decode_attention(q, k, v, scale=SCALE, kv_lens=lens)[0]),
            ("SDPA default (GQA folded)", lambda: decode_sdpa(q, k, v, scale=SCALE)),
        ]
        for label, backend in (
            ("SDPA flash", SDPBackend.FLASH_ATTENTION),
            ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
        ):

            def run(backend=backend):
                with sdpa_kernel([backend]):
                    return decode_sdpa(q, k, v, scale=SCALE)

            backends.append((f"{label} (GQA folded)", run))
        if backends_flex:
            from torch.nn.attention.flex_attention import flex_attention

            compiled = torch.compile(flex_attention, dynamic=False)
            backends.append(("FlexAttention", lambda: compiled(q, k, v, scale=SCALE, enable_gqa=True)))
    first = None
    for label, fn in backends:
        try:
            with torch.no_grad():
                ms = time_ms(fn)
                out = fn().float()
            first = out if first is None else first
            err = ((out - first).norm() / first.norm()).item()
            rows.append(dict(case=name, backend=label, ms=ms, rate=kv_bytes / ms / 1e9, unit="TB/s", note="",
                             err=err))  # fmt: skip
        except Exception as exc:
            rows.append(dict(case=name, backend=label, ms=float("nan"), rate=float("nan"), unit="TB/s",
                             note=f"failed: {type(exc).__name__}: {str(exc)[:80]}", err=float("nan")))  # fmt: skip
        print(rows[-1], flush=True)
    return name


def _sweep(label, configs, make_fn, work, unit):
    """Time each config; print each and the best; return the configs fastest first."""
    timed = []
    for cfg in configs:
        try:
            ms = time_ms(make_fn(cfg), budget_s=0.15, min_reps=3)
        except Exception as exc:
            print(f"TUNE {label} {cfg}: failed {type(exc).__name__} {str(exc)[:100]}", flush=True)
            continue
        print(f"TUNE {label} {cfg}: {ms:.3f} ms {work / ms / 1e9:.2f} {unit}", flush=True)
        timed.append((ms, cfg))
    timed.sort()
    print(f"BEST {label}: {timed[0][1]} {work / timed[0][0] / 1e9:.2f} {unit}", flush=True)
    return [cfg for _, cfg in timed]


def tune():
    """Sweep launch configs of each kernel on representative shapes; print each time and the best."""
    seq = 16384
    q, k, v = (
        rand(1, N_HEADS, seq, HEAD_DIM),
        rand(1, N_KV_HEADS, seq, HEAD_DIM),
        rand(1, N_KV_HEADS, seq, HEAD_DIM),
    )
    fwd_configs = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 64, 4, 3),
                   (64, 64, 4, 3)]  # fmt: skip
    ranked = _sweep("fwd causal", fwd_configs,
                    lambda cfg: lambda: _forward(q, k, v, SCALE, None, 0, None, None, config=cfg),
                    prefill_flops(seq, None), "TFLOPS")  # fmt: skip
    _sweep("fwd chunk=4096", ranked[:4],
           lambda cfg: lambda: _forward(q, k, v, SCALE, 4096, 0, None, None, config=cfg),
           prefill_flops(seq, 4096), "TFLOPS")  # fmt: skip
    seq = 8192
    q, k, v = (
        rand(1, N_HEADS, seq, HEAD_DIM),
        rand(1, N_KV_HEADS, seq, HEAD_DIM),
        rand(1, N_KV_HEADS, seq, HEAD_DIM),
    )
    out, lse = _forward(q, k, v, SCALE, None, 0, None, None)
    dout = rand(1, N_HEADS, seq, HEAD_DIM)
    bwd_flops = prefill_flops(seq, None) * 2.5
    dq_default = (64, 64, 4, 3)
    dkdv = _sweep("bwd dkdv (dq fixed)",
                  [(64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 128, 4, 2), (16, 128, 4, 4),
                   (32, 128, 8, 3)],
                  lambda cfg: lambda: _backward(dout, q, k, v, out, lse, SCALE, None, 0, None, None,
                                                {"dkdv": cfg, "dq": dq_default}),
                  bwd_flops, "TFLOPS")  # fmt: skip
    _sweep("bwd dq (dkdv best)",
           [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (128, 64, 8, 2), (64, 64, 4, 4)],
           lambda cfg: lambda: _backward(dout, q, k, v, out, lse, SCALE, None, 0, None, None,
                                         {"dkdv": dkdv[0], "dq": cfg}),
           bwd_flops, "TFLOPS")  # fmt: skip
    _tune_decode()


def _tune_decode():
    n_keys = 1 << 20
    qd = rand(1, N_HEADS, 1, HEAD_DIM)
    kc, vc = rand(1, N_KV_HEADS, n_keys, HEAD_DIM), rand(1, N_KV_HEADS, n_keys, HEAD_DIM)
    lens = torch.tensor([n_keys], device=DEV, dtype=torch.int32)
    kv_bytes = 2 * kc.numel() * 2
    decode_configs = [(64, 4, 4), (64, 4, 3), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 4, 6), (128, 4, 4)]
    for per_sm in (2, 4, 8):
        _decode_module._PROGRAMS_PER_SM_BY_LAYOUT["contiguous"] = per_sm
        _sweep(f"decode contiguous programs/SM={per_sm}", decode_configs,
               lambda cfg: lambda: decode_attention(qd, kc, vc, scale=SCALE, kv_lens=lens, config=cfg),
               kv_bytes, "TB/s")  # fmt: skip
    kc = vc = None
    torch.cuda.empty_cache()
    for block in (16, 64):
        _tune_paged(qd, lens, n_keys, block, kv_bytes)
        torch.cuda.empty_cache()
    _probe_gqa()


def _tune_paged(qd, lens, n_keys, block, kv_bytes):
    kp = rand(n_keys // block, block, N_KV_HEADS, HEAD_DIM)
    vp = rand(n_keys // block, block, N_KV_HEADS, HEAD_DIM)
    table = torch.randperm(n_keys // block, device=DEV, dtype=torch.int32).view(1, -1)
    _sweep(f"decode paged block={block}", [(64, 4, 4), (128, 4, 3), (32, 4, 4), (64, 8, 4), (64, 4, 6)],
           lambda cfg: lambda: decode_attention(qd, kp, vp, scale=SCALE, kv_lens=lens, block_table=table,
                                                config=cfg),
           kv_bytes, "TB/s")  # fmt: skip


def _probe_gqa():  # What SDPA backends take GQA natively here (decides which can be a dispatch target).
    q, k = rand(1, N_HEADS, 1024, HEAD_DIM), rand(1, N_KV_HEADS, 1024, HEAD_DIM)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
            print(f"GQA {name}: ok", flush=True)
        except RuntimeError as exc:
            print(f"GQA {name}: no ({str(exc)[:200]})", flush=True)


def tune_decode_and_apply():
    """Pick the decode launch config with the best worst-case bandwidth over 128K and 1M keys, per layout,
    and apply it to this process (the printed APPLIED line is what decode_attention.py hardcodes)."""
    qd = rand(1, N_HEADS, 1, HEAD_DIM)
    configs = [(32, 4, 4), (64, 4, 4), (128, 4, 3), (32, 4, 3), (64, 4, 2)]
    for layout in ("contiguous", "paged"):
        scores = {}
        for n_keys in (1 << 17, 1 << 20):
            lens = torch.tensor([n_keys], device=DEV, dtype=torch.int32)
            if layout == "paged":
                k = rand(n_keys // 64, 64, N_KV_HEADS, HEAD_DIM)
                v = rand(n_keys // 64, 64, N_KV_HEADS, HEAD_DIM)
                table = torch.randperm(n_keys // 64, device=DEV, dtype=torch.int32).view(1, -1)
            else:
                k, v = rand(1, N_KV_HEADS, n_keys, HEAD_DIM), rand(1, N_KV_HEADS, n_keys, HEAD_DIM)
                table = None
            kv_bytes = 2 * k.numel() * 2
            for per_sm in (4, 8, 16):
                _decode_module._PROGRAMS_PER_SM_BY_LAYOUT[layout] = per_sm
                for cfg in configs:
                    ms = time_ms(
                        lambda cfg=cfg, k=k, v=v, lens=lens, table=table: decode_attention(
                            qd, k, v, scale=SCALE, kv_lens=lens, block_table=table, config=cfg
                        ),
                        budget_s=0.1,
                    )
                    rate = kv_bytes / ms / 1e9
                    print(
                        f"TUNE decode {layout} {n_keys // 1024}K {cfg} programs/SM={per_sm}: {rate:.2f} TB/s"
                    )
                    scores[(per_sm, cfg)] = min(scores.get((per_sm, cfg), float("inf")), rate)
            k = v = None
            torch.cuda.empty_cache()
        (per_sm, cfg), worst = max(scores.items(), key=lambda item: item[1])
        _decode_module._CUDA_CONFIG[layout] = cfg
        _decode_module._PROGRAMS_PER_SM_BY_LAYOUT[layout] = per_sm
        print(
            f"APPLIED decode {layout}: config {cfg} programs/SM {per_sm} (worst of 128K/1M: {worst:.2f} TB/s)"
        )


def write_markdown(path, rows, cases, command, elapsed):
    props = torch.cuda.get_device_properties(0)
    lines = [
        "# Attention kernels on H100",
        "",
        f"- device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
        f"triton {triton.__version__}",
        f"- date: {datetime.date.today().isoformat()}; command: `{command}` ({elapsed:.0f} s)",
        "- Scout heads: 40 q / 8 kv, head_dim 128, bf16, batch 1, random inputs. CUDA-event median after warm-up.",
        "- TFLOPS count matmul FLOPs over visible (query, key) pairs only (causal: half the square; chunked: half"
        " of each chunk's square); fwd+bwd counts 3.5x the forward. TB/s counts K and V bytes read once.",
        "- `err` is the relative L2 difference of the output to the first backend of the case.",
        "",
        "| case | backend | ms | rate | ours / this | err | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for case in cases:
        case_rows = [r for r in rows if r["case"] == case]
        mine = case_rows[0]["rate"]
        for r in case_rows:
            ratio = mine / r["rate"] if r["rate"] == r["rate"] and r["rate"] > 0 else float("nan")
            err = "—" if r["err"] != r["err"] else f"{r['err']:.1e}"  # nan: not compared
            lines.append(
                f"| {case} | {r['backend']} | {r['ms']:.3f} | {r['rate']:.1f} {r['unit']} | {ratio:.2f} | "
                f"{err} | {r['note']} |"
            )
    lines += ["", "## What dispatch (`SCOUT_MM_KERNELS=auto`) runs per case", ""]
    for case in cases:
        lines.append(f"- {case}: {dispatch_choice(case)}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def dispatch_choice(case: str) -> str:
    if case.startswith("decode"):
        return "Triton split-K (`scout_mm.kernels.flash_decode`)"
    chunk = int(case.split()[1]) if case.startswith("chunked") else None
    seq = 1024 * int(case.split()[-1][:-1])
    q = torch.empty(1, N_HEADS, seq, HEAD_DIM, device="meta", requires_grad="bwd" in case)
    backend = prefer_sdpa(q, q, chunk, 0, None)
    return f"PyTorch SDPA ({backend})" if backend else "Triton flash attention"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--skip-flex", action="store_true")
    parser.add_argument(
        "--tune-decode", action="store_true", help="sweep decode configs first and apply the best"
    )
    parser.add_argument("--out", default="bench/results/attention_h100.md")
    args = parser.parse_args()
    if args.tune:
        tune()
        return
    start = time.time()
    if args.tune_decode:
        tune_decode_and_apply()
    rows, cases = [], []
    for seq, chunk, backward in [(32768, None, False), (32768, None, True), (131072, 8192, False),
                                 (32768, 8192, True)]:  # fmt: skip
        torch.cuda.empty_cache()
        backends = [("triton (ours)", ours(chunk)), ("SDPA cuDNN", sdpa(SDPBackend.CUDNN_ATTENTION, chunk)),
                    ("SDPA flash (FA2)", sdpa(SDPBackend.FLASH_ATTENTION, chunk))]  # fmt: skip
        if not backward and not args.skip_flex:
            backends.append(("FlexAttention", flex(chunk, seq)))
        cases.append(prefill_case(rows, seq, chunk, backward, backends))
    for n_keys in (1 << 17, 1 << 20):
        cases.append(decode_case(rows, n_keys, None, backends_flex=not args.skip_flex and n_keys == 1 << 20))
        cases.append(decode_case(rows, n_keys, 64, False))
    write_markdown(args.out, rows, cases, "python " + " ".join(sys.argv), time.time() - start)


if __name__ == "__main__":
    main()
