r"""Quantize a scout_mm / HF Llama 4 checkpoint to Int4, one decoder layer at a time.

    python scripts/quantize.py --model PATH --out PATH [--method rtn|gptq] [--group-size 128] \
        [--asymmetric] [--scale-dtype bfloat16|float16] [--skip PATTERN ...] [--quantize-lm-head] \
        [--calibration-data PATH.jsonl] [--calibration-samples N] [--calibration-tokens 131072] \
        [--calibration-seq-len 2048] [--gptq-min-rows-ratio 0.0625] [--gptq-natural-order] \
        [--device cuda] [--dtype bfloat16] [--max-shard-size 5GB] [--overwrite]

--out must be a new (or empty) folder; --overwrite replaces the checkpoint in an existing one.

GPTQ calibrates on --calibration-data (a jsonl file in the training formats: {"text": ...} documents or
{"messages": [...], "images": [...]} conversations) when given, else on a small built-in set of 16 prompts, too
few tokens for the routed experts of a large MoE: those with fewer than --gptq-min-rows-ratio x K calibration
rows are rounded to nearest, and the summary line says how many.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from scout_mm.checkpoint import DTYPE_NAMES, exit_cleanly_on_sigterm
from scout_mm.config import ScoutConfig
from scout_mm.quant import (
    CalibrationWarning,
    QuantConfig,
    calibration_from_jsonl,
    calibration_set,
    quantize_checkpoint,
)
from scout_mm.quant.calibration import BUILTIN_SAMPLES, CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS
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
    parser.add_argument("--calibration-data", default=None, metavar="PATH.jsonl",
                        help="GPTQ: calibrate on this jsonl file (training formats), not the built-in set")  # fmt: skip
    parser.add_argument("--calibration-samples", type=int, default=None, metavar="N",
                        help=f"GPTQ: number of samples (documents); default {BUILTIN_SAMPLES} built-in prompts, "
                             "or as many records of --calibration-data as --calibration-tokens allows")  # fmt: skip
    parser.add_argument("--calibration-tokens", type=int, default=None, metavar="N",
                        help=f"GPTQ, --calibration-data: token budget (default {CALIBRATION_TOKENS}); the hidden "
                             "states of every calibration token are kept during quantization")  # fmt: skip
    parser.add_argument("--calibration-seq-len", type=int, default=None, metavar="N",
                        help=f"GPTQ, --calibration-data: longer samples are cut to this many tokens "
                             f"(default {CALIBRATION_SEQ_LEN})")  # fmt: skip
    parser.add_argument("--gptq-natural-order", action="store_true",
                        help="GPTQ: columns in natural order with group parameters from the updated weights (the "
                             "reference implementation's default) instead of act order with static groups")  # fmt: skip
    parser.add_argument("--gptq-min-rows-ratio", type=float, default=None, metavar="R",
                        help="GPTQ: round a matrix to nearest when it has fewer calibration rows than this times "
                             "its input dim K (default 1/16; 0: GPTQ from any row)")  # fmt: skip
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
    for flag in ("calibration_samples", "calibration_tokens", "calibration_seq_len"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} {value}: expected at least 1")
    if args.calibration_data is None:
        for flag in ("calibration_tokens", "calibration_seq_len"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')} applies to --calibration-data, which is not given")
    if args.method == "rtn":
        for flag in ("calibration_data", "calibration_samples", "gptq_min_rows_ratio", "gptq_natural_order"):
            if getattr(args, flag) not in (None, False):
                parser.error(
                    f"--{flag.replace('_', '-')} is for --method gptq; round-to-nearest uses no calibration"
                )
    try:
        run(args)
    except (OSError, ValueError) as e:  # bad paths, options or checkpoints (CheckpointError is a ValueError)
        parser.exit(1, f"{parser.prog}: error: {e}\n")


def run(args: argparse.Namespace) -> None:
    skip = tuple(args.skip) if args.skip is not None else default_skip()
    if args.quantize_lm_head:
        skip = tuple(s for s in skip if s != "lm_head")
    given = {} if args.gptq_min_rows_ratio is None else {"gptq_min_rows_ratio": args.gptq_min_rows_ratio}
    cfg = QuantConfig(group_size=args.group_size, symmetric=not args.asymmetric, scale_dtype=args.scale_dtype,
                      method=args.method, skip=skip, gptq_act_order=not args.gptq_natural_order, **given)  # fmt: skip
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
        if args.calibration_data is not None:
            calibration = calibration_from_jsonl(
                processor,
                args.calibration_data,
                args.calibration_samples,
                args.calibration_tokens or CALIBRATION_TOKENS,
                args.calibration_seq_len or CALIBRATION_SEQ_LEN,
            )
        else:  # image prompts only for a model with a vision tower (a text-only one cannot embed them)
            calibration = calibration_set(
                processor, args.calibration_samples or BUILTIN_SAMPLES, with_images=config.vision is not None
            )
        tokens = sum(sample["input_ids"].shape[1] for sample in calibration)
        print(f"calibration: {len(calibration)} samples, {tokens} tokens from "
              f"{args.calibration_data or 'the built-in set'}")  # fmt: skip
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # its line is the summary printed below
        report = quantize_checkpoint(args.model, args.out, cfg, calibration, device=args.device,
                                     dtype=DTYPE_NAMES[args.dtype] if args.dtype else None,
                                     max_shard_size=args.max_shard_size, overwrite=args.overwrite)  # fmt: skip
    print(report.summary())
    print(f"{args.model} ({_size(args.model) / 1e9:.2f} GB) -> {args.out} ({_size(args.out) / 1e9:.2f} GB), "
          f"{args.method}, group {args.group_size}, {time.perf_counter() - start:.1f} s")  # fmt: skip


def _tokenizer(path: str) -> str:
    return path if os.path.exists(os.path.join(path, "tokenizer.json")) else "builtin"


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


if __name__ == "__main__":
    main()
