"""GPTQ calibration samples, one sequence each: a small built-in set made with the processor (chat-formatted
text prompts and image+text prompts on the package's example image and synthetic pictures of coloured shapes),
or real data from a jsonl file in the training formats."""

from __future__ import annotations

import os
from importlib.resources import files

import numpy as np
import torch
from PIL import Image, ImageDraw

from scout_mm.config import is_int

# Defaults for calibration data from a file. 128K tokens: with Scout's 16 routed experts and top-1 routing each
# expert gets ~8K rows, about its down_proj's K (8192) and above gate_up's (5120), where GPTQ clearly beats
# round-to-nearest; the hidden states GPTQ keeps for them are 1.3 GB (bf16, hidden 5120). 2048 tokens per
# sample: the usual GPTQ calibration length, and one attention chunk of Scout's 8192 holds it whole.
CALIBRATION_TOKENS = 128 * 1024
CALIBRATION_SEQ_LEN = 2048
BUILTIN_SAMPLES = 16  # calibration_set's default size

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
    processor, n_samples: int = BUILTIN_SAMPLES, with_images: bool = True
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


def calibration_from_jsonl(
    processor,
    path: str | os.PathLike,
    n_samples: int | None = None,
    max_tokens: int = CALIBRATION_TOKENS,
    max_seq_len: int = CALIBRATION_SEQ_LEN,
    seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Calibration samples ``{"input_ids": (1, seq), "pixel_values": (tiles, 3, t, t) or absent}`` from a jsonl
    file of ``{"text": ...}`` documents or ``{"messages": [...], "images": [paths]}`` conversations (image paths
    relative to the file), read and checked as training reads it (:class:`scout_mm.train.data.JsonlSource`:
    errors name ``path:line``) and tokenized as training tokenizes it.

    Records are taken in a seeded random order, each cut to ``max_seq_len`` tokens (an image the cut would split
    is dropped with its tokens), until ``n_samples`` records (None: no limit), ``max_tokens`` tokens in all (the
    last sample is cut to fit) or the end of the file. GPTQ keeps the hidden states of every calibration token
    while it quantizes: ``max_tokens x hidden_size`` values in the model's dtype (Scout, bf16: 10 KB a token).
    """
    limits = {"max_tokens": max_tokens, "max_seq_len": max_seq_len}
    if n_samples is not None:
        limits["n_samples"] = n_samples
    for name, value in limits.items():
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r}; expected a positive integer")
    from scout_mm.train.data import JsonlSource, truncate

    source = JsonlSource(processor, path, seed=seed)
    n_records = len(source) if n_samples is None else min(n_samples, len(source))
    samples, budget = [], max_tokens
    for index in range(n_records):
        if budget == 0:
            break
        example = source[index]  # epoch 0 of the training reader's seeded order: a sample of the whole file
        if len(example.ids) > min(max_seq_len, budget):
            example = truncate(example, min(max_seq_len, budget), processor)
        budget -= len(example.ids)
        sample = {"input_ids": torch.tensor([example.ids])}
        if example.images:
            try:
                tiles = [processor.image_processor.preprocess(image.load())[0] for image in example.images]
            except (OSError, ValueError) as e:  # an unreadable image: only its header was read so far
                raise ValueError(f"{example.origin}: {e}") from e
            sample["pixel_values"] = torch.cat(tiles)
        samples.append(sample)
    return samples
