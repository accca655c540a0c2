"""Build the ``tiny`` preset, run it on the package's example image and a prompt, and print its parameter
counts and next-token distribution. The weights are RANDOM (seeded): the output shows the whole pipeline
working — processor, vision tower, early fusion, MoE decoder — not a trained answer.

    python scripts/demo.py [--prompt TEXT] [--image PATH] [--preset tiny] [--seed 0] [--top 10]
"""

from __future__ import annotations

import argparse
import time
from importlib.resources import files

import torch

from scout_mm import Processor, ScoutConfig, ScoutForConditionalGeneration, count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="What shapes are in the image?")
    parser.add_argument("--image", default=str(files("scout_mm") / "assets" / "example.png"))
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=10, help="how many next tokens to list")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = ScoutConfig.from_preset(args.preset)
    model = ScoutForConditionalGeneration(config).eval()
    processor = Processor.from_config(config)
    counts = count_parameters(model)
    print(f"preset {args.preset!r}: {counts['total'] / 1e6:.1f}M parameters, {counts['active'] / 1e6:.1f}M active "
          f"per token ({config.text.num_local_experts} experts, top-{config.text.num_experts_per_tok}); "
          f"RANDOM weights (seed {args.seed})")  # fmt: skip

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(prompt, images=[args.image])
    n_tiles = inputs["pixel_values"].shape[0]
    print(f"image {args.image}: {n_tiles} tile(s) -> {int((inputs['input_ids'] == config.image_token_index).sum())} "
          f"image tokens; prompt {inputs['input_ids'].shape[1]} tokens")  # fmt: skip

    start = time.perf_counter()
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            logits_to_keep=1,
        )
    elapsed = time.perf_counter() - start
    probs = torch.softmax(out.logits[0, -1].float(), dim=-1)
    top = torch.topk(probs, args.top)
    print(f"forward pass: {elapsed * 1e3:.0f} ms on CPU; next-token distribution (top {args.top}):")
    for p, token_id in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {p:7.4f}  {token_id:5d}  {processor.decode([token_id])!r}")


if __name__ == "__main__":
    main()
