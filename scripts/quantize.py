r"""Quantize a scout_mm / HF Llama 4 checkpoint to Int4, one decoder layer at a time.

    python scripts/quantize.py --model PATH --out PATH [--method rtn|gptq] [--group-size 128] \
        [--asymmetric] [--scale-dtype bfloat16|float16] [--skip PATTERN ...] [--quantize-lm-head] \
        [--calibration-samples 16] \
        [--device cuda] [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]

--out must be a new (or empty) folder; --overwrite replaces the checkpoint in an existing one.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from scout_mm.checkpoint import DTYPE_NAMES, exit_cleanly_on_sigterm
from scout_mm.config import ScoutConfig
from scout_mm.quant import QuantConfig, calibration_set, quantize_checkpoint
from scout_mm.quant.format import DEFAULT_SKIP, default_skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="float checkpoint folder")
    parser.add_argument("--out", required=True, help="Int4 checkpoint folder to write")
    parser.add_argument("--method", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128])
    parser.add_argument("--asymmetric", action="store_true", help="store per-group zero points")
    parser.add_argument("--scale-dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--skip", nargs="*", default=None,
                        help=f"module-name substrings kept in float (default: {' '.join(DEFAULT_SKIP)})")  # fmt: skip
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="Int4 LM head: drop lm_head from the (default or given) skip list")  # fmt: skip
    parser.add_argument("--calibration-samples", type=int, default=16, help="GPTQ: processor-made samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default=None, help="compute dtype (default: stored)"
    )
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the checkpoint in an existing --out folder"
    )
    args = parser.parse_args()
    exit_cleanly_on_sigterm()  # a kill removes the half-written output folder, as Ctrl-C does
    if args.method == "gptq" and args.calibration_samples < 1:
        parser.error(f"--calibration-samples {args.calibration_samples}: GPTQ needs at least 1")
    try:
        run(args)
    except (OSError, ValueError) as e:  # bad paths, options or checkpoints (CheckpointError is a ValueError)
        parser.exit(1, f"{parser.prog}: error: {e}\n")


def run(args: argparse.Namespace) -> None:
    skip = tuple(args.skip) if args.skip is not None else default_skip()
    if args.quantize_lm_head:
        skip = tuple(s for s in skip if s != "lm_head")
    cfg = QuantConfig(group_size=args.group_size, symmetric=not args.asymmetric, scale_dtype=args.scale_dtype,
                      method=args.method, skip=skip)  # fmt: skip
    calibration = None
    if args.method == "gptq":
        from scout_mm import Processor

        tokenizer, config = _tokenizer(args.model), ScoutConfig.from_hf(args.model)
        try:
            processor = Processor.from_config(config, tokenizer_path=tokenizer)
        except ValueError as e:
            if tokenizer != "builtin":
                raise
            raise ValueError(
                f"GPTQ calibration tokenizes prompts: {args.model} has no tokenizer.json and the built-in tokenizer "
                f"does not fit its config.json ({e}); put the model's tokenizer.json there, or use --method rtn"
            ) from e
        # image prompts only for a model with a vision tower (a text-only one has nothing to embed them with)
        calibration = calibration_set(
            processor, args.calibration_samples, with_images=config.vision is not None
        )
    start = time.perf_counter()
    quantize_checkpoint(args.model, args.out, cfg, calibration, device=args.device,
                        dtype=DTYPE_NAMES[args.dtype] if args.dtype else None, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite)  # fmt: skip
    print(f"{args.model} ({_size(args.model) / 1e9:.2f} GB) -> {args.out} ({_size(args.out) / 1e9:.2f} GB), "
          f"{args.method}, group {args.group_size}, {time.perf_counter() - start:.1f} s")  # fmt: skip


def _tokenizer(path: str) -> str:
    return path if os.path.exists(os.path.join(path, "tokenizer.json")) else "builtin"


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


if __name__ == "__main__":
    main()
