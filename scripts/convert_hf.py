"""Re-save a Llama 4 / scout_mm checkpoint: change dtype or shard size, or turn a text-only
``Llama4ForCausalLM`` checkpoint into our layout check. Output loads in scout_mm and in transformers.

    python scripts/convert_hf.py --src PATH --dst PATH [--dtype bfloat16] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse

import torch

from scout_mm import ScoutForConditionalGeneration, count_parameters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="checkpoint folder (config.json + safetensors)")
    parser.add_argument("--dst", required=True, help="output folder (written atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    model = ScoutForConditionalGeneration.from_pretrained(args.src, dtype=DTYPES.get(args.dtype))
    counts = count_parameters(model)
    print(f"loaded {args.src}: {counts['total'] / 1e9:.3f}B parameters ({counts['active'] / 1e9:.3f}B active)")
    model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
    print(f"saved {args.dst}")


if __name__ == "__main__":
    main()
