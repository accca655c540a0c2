r"""Answer an image+text prompt with a scout_mm / HF Llama 4 checkpoint and report tokens/s.

    python scripts/generate.py --model PATH --image a.png [--image b.png] --prompt "..." \
        [--max-new-tokens N] [--truncate] [--temperature T] [--stream] [--device cuda] [--dtype bfloat16]
        [--int4] [--kv-cache-dtype fp8]
    python scripts/generate.py --demo     # the shipped trained tiny model on the built-in example image

--int4: the model is an Int4 checkpoint (scripts/quantize.py; one is recognised from its config.json without the
flag); with --demo, the tiny model quantized (RTN). --kv-cache-dtype fp8: the global (NoPE) layers' KV cache in
e4m3 with per-row scales, about half the memory and decode traffic of a long prompt (scout_mm.cache).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.resources import files

import torch

import scout_mm
from scout_mm import Processor, ScoutConfig, ScoutForConditionalGeneration
from scout_mm.checkpoint import DTYPE_NAMES, is_int4_checkpoint
from scout_mm.fusion import fuse_projections, fuse_shared_expert
from scout_mm.generation import GenerateOutput
from scout_mm.quant import load_quantized, quantize_model, quantized_bytes

EXAMPLE_IMAGE = str(files("scout_mm") / "assets" / "example.png")
# The tiny preset trained on the synthetic image-text tasks (configs/tiny.yaml, bench/results/train_tiny_h100.md).
TRAINED_TINY = files("scout_mm") / "assets" / "tiny"


def main(description: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    parser.add_argument(
        "--demo", action="store_true", help="the shipped trained tiny model + the example image"
    )
    parser.add_argument("--image", action="append", default=[], help="image path; repeat for several images")
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--truncate", action="store_true",
        help="generate at most what fits the model's context when prompt + --max-new-tokens exceeds it",
    )  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="default: bfloat16 on GPU")
    parser.add_argument(
        "--int4", action="store_true",
        help="Int4 checkpoint (found from config.json when not given; with --demo: quantize it, RTN)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
        help="global layers' KV cache: auto = the model's dtype, fp8 = e4m3 with per-row scales (half the memory)",
    )  # fmt: skip
    args = parser.parse_args()
    if not args.demo and not args.model:
        parser.error("pass --model PATH, or --demo for the built-in tiny model")
    if not args.temperature >= 0:  # NaN too: it would pass `< 0` and decode greedily
        parser.error(f"--temperature {args.temperature}: expected >= 0 (0 = greedy)")
    if args.top_p is not None and args.temperature == 0:
        parser.error("--top-p samples: pass --temperature > 0 with it (--temperature 0 is greedy)")
    dtype = (
        DTYPE_NAMES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )

    if args.demo:
        if TRAINED_TINY.joinpath("config.json").is_file():
            path = str(TRAINED_TINY)
            model = ScoutForConditionalGeneration.from_pretrained(
                path, dtype=dtype, device=args.device
            ).eval()
            processor = Processor.from_config(model.config, tokenizer_path=path)
        else:
            torch.manual_seed(args.seed)
            config = ScoutConfig.from_preset("tiny")
            model = ScoutForConditionalGeneration(config).to(device=args.device, dtype=dtype).eval()
            processor = Processor.from_config(config)
            print(
                f"demo: no trained model at {TRAINED_TINY}: tiny preset with RANDOM weights, the answer is noise",
                file=sys.stderr,
            )
        if args.int4:
            model = quantize_model(model)
        images = args.image or [EXAMPLE_IMAGE]
        prompt = "What shapes are in the image?" if args.prompt is None else args.prompt
    else:
        if not args.int4 and is_int4_checkpoint(args.model):
            print(f"{args.model}: Int4 checkpoint (quantization_config in config.json): loading it as Int4",
                  file=sys.stderr)  # fmt: skip
            args.int4 = True
        load = load_quantized if args.int4 else ScoutForConditionalGeneration.from_pretrained
        model = load(args.model, dtype=dtype, device=args.device)
        processor = Processor.from_config(model.config, tokenizer_path=args.model)
        images = args.image
        if args.prompt is None:
            parser.error("--prompt is required with --model (it may be '' to ask about the images alone)")
        prompt = args.prompt

    # q|k|v and gate|up as one matmul each, and (Int4) the shared expert as one more routed-expert slot: the
    # CLI never saves the model; load_quantized already did both, and a second call changes nothing.
    fuse_shared_expert(fuse_projections(model))
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        truncate=args.truncate,
        seed=args.seed,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    if args.temperature > 0:
        sampling.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    stats = _run(model, processor, prompt, images, args.stream, sampling)
    print(
        f"\n[prefill {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_second:.0f} tok/s, "
        f"decode {stats.new_tokens} tokens at {stats.decode_tokens_per_second:.1f} tok/s, {args.device} {dtype}, "
        f"KV cache {args.kv_cache_dtype}]",
        file=sys.stderr,
    )
    if args.int4:
        size = quantized_bytes(model)
        if args.device.startswith("cuda"):
            peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB"
        else:  # the whole process (Python, torch, the model, activations): what a CPU run costs
            peak = f"peak process memory {_peak_host_bytes() / 1e9:.2f} GB"
        print(
            f"[Int4 model: {size['total'] / 1e9:.3f} GB of weights ({size['int4_weights'] / 1e9:.3f} GB Int4, "
            f"{size['scales_zeros'] / 1e9:.3f} GB scales/zeros, {size['float'] / 1e9:.3f} GB float), {peak}]",
            file=sys.stderr,
        )


def _peak_host_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _run(model, processor, prompt, images, stream: bool, sampling: dict) -> GenerateOutput:
    """Print the answer (streamed or whole) and return the counts and timings of that run."""
    stats = GenerateOutput(sequences=torch.empty(0))
    if stream:
        for piece in scout_mm.generate(
            model, processor, prompt, images=images, stream=True, stats=stats, **sampling
        ):
            print(piece, end="", flush=True)
        print()
    else:
        print(scout_mm.generate(model, processor, prompt, images=images, stats=stats, **sampling))
    return stats


def cli(description: str | None = None) -> None:
    """:func:`main`, with a missing or bad checkpoint, image or option reported in one line (no traceback);
    ``description``: the help text's (scripts/int4_generate.py passes its own)."""
    try:
        main(description)
    except (OSError, ValueError) as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")


if __name__ == "__main__":
    cli()
