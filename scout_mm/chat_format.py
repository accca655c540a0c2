"""The Llama 4 chat format: its special tokens (names and order) and the rendering of chat messages.

Kept apart from the processor, as Meta's ``llama-models`` keeps ``chat_format.py``: this is the text layer
only — the processor turns the rendered text and the images into model inputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

IMAGE_PLACEHOLDER = "<|image|>"


def llama4_special_tokens(count: int = 256) -> list[str]:
    """The first ``count`` Llama 4 special tokens in id order (Llama 4 id 200000 + r is entry r)."""
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    names += ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
    names += ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    names += [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(8, 69)]
    names += ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>"]
    names += ["<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    names += [f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)]
    names += ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
    names += [f"<|vision_reserved_special_token_{i}|>" for i in range(7, 1048)]
    names += [f"<|reasoning_reserved_special_token_{i}|>" for i in range(8)]
    names += ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(names))]
    if not 0 < count <= len(names):
        raise ValueError(f"count={count}; expected 1..{len(names)}")
    return names[:count]


SPECIAL_TOKENS = {  # role -> token name
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "eom": "<|eom|>",
    "eot": "<|eot|>",
    "pad": "<|finetune_right_pad|>",
    "header_start": "<|header_start|>",
    "header_end": "<|header_end|>",
    "boi": "<|image_start|>",
    "eoi": "<|image_end|>",
    "tile_x": "<|tile_x_separator|>",
    "tile_y": "<|tile_y_separator|>",
    "image": IMAGE_PLACEHOLDER,
    "patch": "<|patch|>",
}


def render_chat(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, continue_final_message: bool = False
) -> str:
    """The Llama 4 chat format, as HF's Llama 4 chat template renders it (without tool definitions).

    ``continue_final_message`` (HF's argument): the last message is left open (no ``<|eot|>``) so that a model
    continues it, e.g. an assistant answer begun by the caller. One difference from HF's template: a system
    message of several text parts keeps all of them, joined (HF's keeps the first part only)."""
    if add_generation_prompt and continue_final_message:
        raise ValueError(
            "add_generation_prompt and continue_final_message exclude each other: the first opens a new "
            "assistant turn, the second leaves the last message open"
        )
    if not isinstance(messages, Sequence) or len(messages) == 0:
        raise ValueError(
            f"messages is {messages!r}; expected a non-empty list of {{'role', 'content'}} dicts"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} is {message!r}; expected a dict with 'role' and 'content'")
        if not isinstance(message["role"], str) or not message["role"]:
            raise ValueError(f"message {i}: role {message['role']!r}; expected a string such as 'user'")
        if "tool_calls" in message:
            raise ValueError(f"message {i}: tool_calls are not supported by this chat template")
    out = [SPECIAL_TOKENS["bos"]]
    if messages[0]["role"] == "system":
        # The system prompt is trimmed; the other messages are not (matches the reference template).
        system = _render_content(messages[0]["content"], 0, allow_images=False).strip()
        out.append(f"<|header_start|>system<|header_end|>\n\n{system}<|eot|>")
    first = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[first:], start=first):
        role = message["role"]
        if role in ("tool", "ipython"):
            content = message["content"]
            body = content if isinstance(content, (int, float)) else json.dumps(content, ensure_ascii=False)
            out.append(f"<|header_start|>ipython<|header_end|>\n\n{body}<|eot|>")
        else:
            out.append(
                f"<|header_start|>{role}<|header_end|>\n\n{_render_content(message['content'], i)}<|eot|>"
            )
    if continue_final_message:
        last = messages[-1]["content"]
        ends_in_text = isinstance(last, Sequence) and bool(last) and isinstance(last[-1], Mapping)
        if not isinstance(last, str) and not (ends_in_text and last[-1].get("type") == "text"):
            raise ValueError(
                "continue_final_message: the last message must end with text to continue (a string content or "
                "a last part of type 'text')"
            )
        out[-1] = out[-1].removesuffix("<|eot|>")
    if add_generation_prompt:
        out.append("<|header_start|>assistant<|header_end|>\n\n")
    return "".join(out)


def _render_content(content, index: int, allow_images: bool = True) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise TypeError(
            f"message {index}: content is {type(content).__name__}; expected str or a list of parts"
        )
    rendered = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"message {index}: text part {part!r}; expected a 'text' string")
            rendered.append(part["text"])
        elif kind == "image" and allow_images:
            rendered.append(IMAGE_PLACEHOLDER)
        else:
            expected = "'text' or 'image'" if allow_images else "'text' (no images in a system message)"
            raise ValueError(f"message {index}: content part {part!r}; expected type {expected}")
    return "".join(rendered)
