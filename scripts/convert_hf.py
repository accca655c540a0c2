"""Re-save a Llama 4 / scout_mm checkpoint with another dtype or shard size, validating every tensor against
the config on the way (shapes, missing/unexpected tensors). Tokenizer and processor files are copied along.
The output loads in scout_mm and in transformers.

    python scripts/convert_hf.py --src PATH --dst PATH [--dtype bfloat16] [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from scout_mm import ScoutForConditionalGeneration, count_parameters
from scout_mm.checkpoint import DTYPE_NAMES, PROCESSOR_FILES, exit_cleanly_on_sigterm, parse_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src", required=True, help="checkpoint folder (config.json + safetensors)")
    parser.add_argument("--dst", required=True, help="output folder (written atomically)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPE_NAMES),
        default=None,
        help="cast weights (default: the dtype config.json states)",
    )
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()  # a kill removes the half-written output folder, as Ctrl-C does
    try:
        parse_size(args.max_shard_size)
        model = ScoutForConditionalGeneration.from_pretrained(args.src, dtype=DTYPE_NAMES.get(args.dtype))
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        sys.exit(f"convert_hf.py: error: {e}")
    counts = count_parameters(model)
    print(
        f"loaded {args.src}: {counts['total'] / 1e9:.3f}B parameters ({counts['active'] / 1e9:.3f}B active)"
    )
    try:
        model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
    except OSError as e:
        sys.exit(f"convert_hf.py: error: cannot write {args.dst}: {e}")
    for name in PROCESSOR_FILES:
        source, target = os.path.join(args.src, name), os.path.join(args.dst, name)
        # With --dst = --src the files are already there (save_pretrained keeps them).
        if os.path.isfile(source) and not (os.path.exists(target) and os.path.samefile(source, target)):
            shutil.copy2(source, target)
    print(f"saved {args.dst}")


if __name__ == "__main__":
    main()
