"""A small GPTQ calibration set built with the processor: chat-formatted text prompts and image+text prompts
(the package's example image and synthetic pictures of coloured shapes), one sequence per sample."""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import torch
from PIL import Image, ImageDraw

TEXTS = (
    "Explain how a transformer language model predicts the next word, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between mitochondria and chloroplasts?",
    "Translate into French: The weather is lovely today, let's go for a walk by the river.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n# explain this",
    "List five practical tips for saving energy at home and explain why each works.",
    "The capital of Australia is Canberra, not Sydney. Why do so many people get this wrong?",
    "Solve: a train leaves at 3pm travelling 80 km/h; another leaves at 4pm at 100 km/h. When do they meet?",
)
IMAGE_PROMPTS = (
    "Describe the image in detail.",
    "What shapes and colours do you see?",
    "How many objects are in this picture, and where are they?",
    "Write a caption for this image.",
)


def synthetic_image(seed: int, size: int = 336) -> Image.Image:
    """Coloured rectangles and ellipses on a random background (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
        x1, y1 = x0 + int(rng.integers(20, size // 2)), y0 + int(rng.integers(20, size // 2))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def calibration_set(
    processor, n_samples: int = 16, with_images: bool = True
) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` model inputs ``{"input_ids": (1, seq), "pixel_values": (tiles, 3, t, t) or absent}``:
    text prompts, and (``with_images``) every other sample an image prompt."""
    example = str(files("scout_mm") / "assets" / "example.png")
    samples = []
    for i in range(n_samples):
        if with_images and i % 2 == 1:
            image = example if i % 4 == 1 else synthetic_image(i)
            content = [
                {"type": "image"},
                {"type": "text", "text": IMAGE_PROMPTS[(i // 2) % len(IMAGE_PROMPTS)]},
            ]
            images = [image]
        else:
            content = [{"type": "text", "text": TEXTS[(i // 2 if with_images else i) % len(TEXTS)]}]
            images = None
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = processor(prompt, images=images)
        sample = {"input_ids": inputs["input_ids"]}
        if images:
            sample["pixel_values"] = inputs["pixel_values"]
        samples.append(sample)
    return samples
