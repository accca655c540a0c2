"""Decode attention over the global layers' KV cache: bf16 vs FP8 (e4m3 + per-row scales), on one GPU.

    PYTHONPATH=$PWD python bench/bench_kv_fp8.py [--lengths 8192,131072,262144,524288] [--rounds 2] [--out F.md]

Scout's global-layer shape (40 query heads over 8 kv heads, head_dim 128, batch 1, one new token), a paged pool of
256-key blocks per layer, 12 layers (Scout's global layers) called in turn inside one CUDA graph, so every call
reads its cache from HBM (12 caches never fit in the L2). Per variant: us per layer call (median of graph replays,
split kernel + merge), the cache bytes read per second, and the ratio to the bf16 cache in the same round. The FP8
variants: ``KV_FP8_FORM`` 1 (tiles dequantised as loaded) at the bf16 paged launch config, 2 (scales folded into
scores / probabilities) at the FP8 one, and 3 (form 2 over int32 words of four codes, converted by bit arithmetic)
at several ``(BLOCK_N, warps, stages)``; then form 3 with the scales laid out (block, head, slot) in memory instead
of the cache's (block, slot, head) (same logical shape: the kernel reads strides), whose per-head reads are contiguous. Each FP8 result is checked against the bf16
kernel over the dequantised cache before it is timed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import time_graph_ms  # noqa: E402

from scout_mm.config import write_text_atomically  # noqa: E402
from scout_mm.kernels import flash_decode  # noqa: E402
from scout_mm.kernels.reference import dequantize_kv, quantize_kv_fp8  # noqa: E402

N_HEADS, N_KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 40, 8, 128, 256, 12
FP8_CONFIGS = [(32, 4, 3), (64, 4, 3), (128, 4, 3), (128, 4, 2), (64, 4, 2), (256, 4, 2), (256, 8, 2), (128, 8, 2),
               (128, 4, 1)]  # fmt: skip


HEAD_MAJOR_CONFIGS = [(128, 4, 2), (128, 4, 3), (64, 4, 2)]


def _caches(length: int):
    """12 layers' paged caches of ``length`` keys (random, shuffled blocks): bf16, and FP8 with its scales."""
    n_blocks = -(-length // BLOCK)
    table = torch.randperm(n_blocks, device="cuda").int()[None]
    layers = []
    for _ in range(LAYERS):
        pair = []
        for size in (4.0, 1.0):  # keys larger than values, each row its own size
            x = torch.randn(n_blocks, BLOCK, N_KV_HEADS, HEAD_DIM, device="cuda")
            x *= torch.rand(n_blocks, BLOCK, N_KV_HEADS, 1, device="cuda") * size
            values, scale = quantize_kv_fp8(x)
            # the scales also laid out (block, head, slot) in memory (same logical shape: the kernels take strides)
            head_major = scale.permute(0, 2, 1).contiguous().permute(0, 2, 1)
            pair.append((dequantize_kv(values, scale, torch.bfloat16), values, scale, head_major))
            del x
        layers.append(pair)
    return table, layers


def _call(q, layers, table, lens, fp8, config, n_splits=None):
    """``fp8``: False (the bf16 cache), True (FP8, scales (block, slot, head) in memory as the model's cache keeps
    them) or "head_major" (FP8, scales (block, head, slot) in memory); ``n_splits``: None = the kernel's rule."""

    def run():
        out = None
        for (k_full, k8, ks, ks_hm), (v_full, v8, vs, vs_hm) in layers:
            if fp8 == "head_major":
                ks, vs = ks_hm, vs_hm
            if fp8:
                out, _ = flash_decode.decode_attention(q, k8, v8, k_scale=ks, v_scale=vs, scale=HEAD_DIM**-0.5,
                                                       kv_lens=lens, block_table=table, config=config,
                                                       n_splits=n_splits)  # fmt: skip
            else:
                out, _ = flash_decode.decode_attention(q, k_full, v_full, scale=HEAD_DIM**-0.5, kv_lens=lens,
                                                       block_table=table, config=config)  # fmt: skip
        return out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="8192,131072,262144,524288")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--splits", default="", help="also the shipped FP8 form and config at these split counts"
    )
    args = parser.parse_args()
    shipped, shipped_form = flash_decode._CUDA_CONFIG["paged"], flash_decode.KV_FP8_FORM
    shipped_fp8 = flash_decode._CUDA_CONFIG_FP8["paged"]
    rows = [f"# Decode attention, bf16 vs FP8 KV cache, on {torch.cuda.get_device_name()}", "",
            f"Date {datetime.date.today()}, torch {torch.__version__}, triton {__import__('triton').__version__}. "
            f"Command: `PYTHONPATH=$PWD python bench/bench_kv_fp8.py {' '.join(sys.argv[1:])}`. Shipped paged config "
            f"{shipped} (bf16), {shipped_fp8} (FP8), shipped FP8 form {shipped_form}.", "",
            "| keys | round | variant | us / layer | cache GB/s read | vs bf16 |", "|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(rows), flush=True)
    for length in (int(v) for v in args.lengths.split(",")):
        table, layers = _caches(length)
        q = torch.randn(1, N_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        lens = torch.tensor([length], device="cuda", dtype=torch.int32)
        bytes_bf16 = 2 * length * N_KV_HEADS * HEAD_DIM * 2
        bytes_fp8 = 2 * length * N_KV_HEADS * (HEAD_DIM + 4)
        variants = [("bf16", False, 1, shipped)]
        variants += [(f"fp8 form 1 {shipped}", True, 1, shipped)]
        variants += [(f"fp8 form 2 {shipped_fp8}", True, 2, shipped_fp8)]
        variants += [(f"fp8 form 3 {c}", True, 3, c) for c in FP8_CONFIGS]
        variants += [(f"fp8 form 3 {c}, head-major scales", "head_major", 3, c) for c in HEAD_MAJOR_CONFIGS]
        variants += [(f"fp8 form {shipped_form} {shipped_fp8}, {s} splits", True, shipped_form, (shipped_fp8, int(s)))
                     for s in args.splits.split(",") if s]  # fmt: skip
        reference = _call(q, layers[-1:], table, lens, False, shipped)().float()
        for round_ in range(args.rounds):
            base = None
            for label, fp8, form, config in variants:
                flash_decode.KV_FP8_FORM = form
                config, splits = config if isinstance(config[0], tuple) else (config, None)
                fn = _call(q, layers, table, lens, fp8, config, splits)
                if round_ == 0:
                    got = _call(q, layers[-1:], table, lens, fp8, config, splits)().float()
                    err = float((got - reference).norm() / reference.norm())
                    assert err < 1e-2, (
                        f"{label}: relative error {err:.2e} vs the bf16 kernel on the dequantised cache"
                    )
                us = time_graph_ms(fn, calls=10) * 1000 / LAYERS
                base = base or us
                gbs = (bytes_fp8 if fp8 else bytes_bf16) / us / 1e3
                rows.append(
                    f"| {length:,} | {round_ + 1} | {label} | {us:.1f} | {gbs:,.0f} | {base / us:.2f}x |"
                )
                print(rows[-1], flush=True)
        flash_decode.KV_FP8_FORM = shipped_form
        del layers
        torch.cuda.empty_cache()
    if args.out:
        write_text_atomically(args.out, "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
