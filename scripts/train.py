"""Train a scout_mm model with DeepSpeed (ZeRO-2/3, optional CPU offload), as DeepSpeed users launch it:

    deepspeed --num_gpus N scripts/train.py --config configs/tiny.yaml --deepspeed configs/ds_zero2.json
    deepspeed --hostfile hostfile scripts/train.py --config configs/small.yaml --deepspeed configs/ds_zero3.json
    python scripts/train.py --config configs/tiny.yaml --deepspeed configs/ds_zero2.json   # one process

Any config field can be overridden: ``--train.max_steps 200 --optim.lr 3e-4 --data.num_workers 0``
(values are parsed as YAML). A run resumes from ``train.output_dir``'s latest checkpoint unless
``--train.resume never``, with the configured ``train.max_steps`` and schedule (so a larger max_steps extends
a finished run); a checkpoint written by another number of GPUs is converted to DeepSpeed's universal format
first (automatically, said in the log). ``--train.profile_steps [20,22]`` writes a
torch.profiler breakdown of those steps to ``train.output_dir/profile.txt``. See
``scout_mm/train/config.py`` for every field.
"""

import time

LAUNCH_TIME = time.time()  # the time budget counts imports and start-up too

import argparse  # noqa: E402

import yaml  # noqa: E402

from scout_mm.train.config import TrainConfig, all_keys  # noqa: E402
from scout_mm.train.loop import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML training config (configs/tiny.yaml, configs/small.yaml)")
    parser.add_argument(
        "--deepspeed",
        "--deepspeed_config",
        dest="deepspeed",
        help="DeepSpeed JSON (configs/ds_zero2.json, ...)",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    overrides = parser.add_argument_group("config overrides")
    for key in all_keys():
        overrides.add_argument(f"--{key}", dest=key, metavar="VALUE")
    args = parser.parse_args()
    values = [(key, getattr(args, key)) for key in all_keys() if getattr(args, key) is not None]
    try:
        cfg = TrainConfig.load(args.config, values)
    except (OSError, ValueError, yaml.YAMLError) as e:  # a missing or malformed config, a bad value
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    try:
        train(cfg, args.deepspeed, launch_time=LAUNCH_TIME)
    except (OSError, ValueError) as e:
        # Found before the model was built (a data file, eval task, DeepSpeed JSON, checkpoint to resume): one
        # line, as argparse reports a bad flag. Errors once training runs keep their traceback.
        if not getattr(e, "before_training", False):
            raise
        parser.exit(1, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
