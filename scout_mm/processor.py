"""Tokenizer + Llama 4 chat format + image placeholders -> model inputs.

Text is tokenized with a ``tokenizers`` ``tokenizer.json`` (the package's own 8192-entry tokenizer or a real
Llama 4 one). In user text a single ``<|image|>`` marks where an image goes; the processor expands it into the
Llama 4 layout (as HF ``Llama4Processor`` does)::

    <|image_start|> [tile rows: (<|patch|>*T <|tile_x_separator|>)... <|patch|>*T <|tile_y_separator|>]
                    <|image|> <|patch|>*T <|image_end|>

with ``T`` tokens per tile; the bracketed local tiles appear only when the image uses more than one tile.
``pixel_values`` holds each image's local tiles then its global tile, in the same order as the ``<|patch|>``
runs, so the model can overwrite the ``<|patch|>`` embeddings with image features in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from scout_mm.chat_format import IMAGE_PLACEHOLDER, SPECIAL_TOKENS, render_chat
from scout_mm.config import read_json_object
from scout_mm.vision.preprocess import SINGLE_IMAGE_TYPES, ImageInput, ImageProcessor, flatten_images

BUILTIN = "builtin"
BUILTIN_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"


class BatchInputs(dict):
    """``dict`` of model inputs with ``.to(device)``, so ``model(**inputs.to("cuda"))`` works."""

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BatchInputs:
        """Move tensors to ``device``; ``dtype`` applies to floating tensors (``pixel_values``) only."""

        def move(value):
            if not isinstance(value, torch.Tensor):
                return value
            return value.to(device, dtype if value.is_floating_point() else None)

        return BatchInputs({key: move(value) for key, value in self.items()})


class Processor:
    """Tokenizer, Llama 4 chat template and image preprocessing behind one HF-like interface."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor | None = None,
        *,
        patch_size: int = 14,
        pixel_shuffle_ratio: float = 0.5,
        padding_side: str = "left",
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.patch_size = patch_size
        self.pixel_shuffle_ratio = pixel_shuffle_ratio
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
        self.padding_side = padding_side
        missing = [name for name in SPECIAL_TOKENS.values() if tokenizer.token_to_id(name) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the Llama 4 special tokens {missing}")
        self.special_ids = {role: tokenizer.token_to_id(name) for role, name in SPECIAL_TOKENS.items()}
        if image_processor is not None and image_processor.tile_size % patch_size:
            raise ValueError(
                f"tile_size={image_processor.tile_size} is not a multiple of patch_size={patch_size}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = BUILTIN, **overrides) -> Processor:
        """Load from a folder holding ``tokenizer.json`` (HF Llama 4 or ``save_pretrained`` layout).

        ``path="builtin"`` loads the package's own 8192-id tokenizer. Tile size, tile budget, mean/std and
        resample come from ``preprocessor_config.json`` (or an ``image_processor`` entry of
        ``processor_config.json``), patch size and pixel shuffle ratio from ``processor_config.json``; keyword
        arguments override them: ``tile_size``, ``max_patches``, ``patch_size``, ``pixel_shuffle_ratio``,
        ``padding_side`` and the other :class:`ImageProcessor` fields.
        """
        folder = BUILTIN_TOKENIZER_DIR if os.fspath(path) == BUILTIN else Path(path)
        tokenizer_file = folder if folder.is_file() else folder / "tokenizer.json"
        folder = tokenizer_file.parent
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {tokenizer_file}: a checkpoint folder needs its processor beside the weights "
                "(processor.save_pretrained(folder) after model.save_pretrained(folder))"
            )
        processor_cfg = _read_json(folder / "processor_config.json")
        image_cfg = _read_json(folder / "preprocessor_config.json") or processor_cfg.get(
            "image_processor", {}
        )
        text_options = {}
        for key in ("patch_size", "pixel_shuffle_ratio", "padding_side"):
            value = overrides.pop(key, processor_cfg.get(key))
            if value is not None:
                text_options[key] = value
        image_processor = ImageProcessor.from_hf(image_cfg, **overrides)
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception ("expected `,` ...") that names no file
            raise ValueError(
                f"{tokenizer_file} is not a readable tokenizer.json ({e}); pass the checkpoint folder or its "
                "tokenizer.json"
            ) from e
        return cls(tokenizer, image_processor, **text_options)

    @classmethod
    def from_config(cls, config, tokenizer_path: str | os.PathLike = BUILTIN, **overrides) -> Processor:
        """A processor whose tiles, patch size and special-token ids agree with a ``ScoutConfig``.

        Raises ``ValueError`` when the tokenizer's special-token ids differ from the config's.
        """
        vision = config.vision
        if vision is not None:
            overrides.setdefault("tile_size", vision.image_size)
            overrides.setdefault("patch_size", vision.patch_size)
            overrides.setdefault("pixel_shuffle_ratio", vision.pixel_shuffle_ratio)
        processor = cls.from_pretrained(tokenizer_path, **overrides)
        if vision is None:
            processor.image_processor = None
        checks = [
            ("text.bos_token_id", config.text.bos_token_id, processor.bos_token_id),
            ("text.pad_token_id", config.text.pad_token_id, processor.pad_token_id),
        ]
        # A text-only model never sees image tokens: its (default) image ids do not matter.
        if vision is not None:
            checks += [
                ("image_token_index", config.image_token_index, processor.image_token_id),
                ("boi_token_index", config.boi_token_index, processor.boi_token_id),
                ("eoi_token_index", config.eoi_token_index, processor.eoi_token_id),
            ]
        bad = [
            f"{name}={want} but the tokenizer has {got}"
            for name, want, got in checks
            if want not in (None, got)
        ]
        if bad:
            builtin = os.fspath(tokenizer_path) == BUILTIN
            hint = (
                " (the built-in tokenizer serves the tiny and small presets: pass tokenizer_path=)"
                if builtin
                else ""
            )
            raise ValueError(f"config and tokenizer disagree: {', '.join(bad)}{hint}")
        if processor.vocab_size > config.text.vocab_size:
            raise ValueError(
                f"tokenizer has {processor.vocab_size} ids; config.text.vocab_size={config.text.vocab_size}"
            )
        if vision is not None and processor.tokens_per_tile != vision.tokens_per_tile:
            raise ValueError(
                f"{processor.tokens_per_tile} tokens per tile; config says {vision.tokens_per_tile}"
            )
        return processor

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json``, ``processor_config.json`` and (with an image
        processor) ``preprocessor_config.json`` in the layout HF uses for Llama 4."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        tokenizer_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": SPECIAL_TOKENS["bos"],
            "eos_token": SPECIAL_TOKENS["eot"],  # instruct convention: a turn ends with <|eot|>
            "pad_token": SPECIAL_TOKENS["pad"],
            "padding_side": self.padding_side,
        }
        processor_cfg = {
            "processor_class": "Llama4Processor",
            "patch_size": self.patch_size,
            "pixel_shuffle_ratio": self.pixel_shuffle_ratio,
            "padding_side": self.padding_side,
            "fake_image_token": IMAGE_PLACEHOLDER,
            "image_token": IMAGE_PLACEHOLDER,
        }
        files = {"tokenizer_config.json": tokenizer_cfg, "processor_config.json": processor_cfg}
        if self.image_processor is not None:
            # transformers 5 reads the nested copy, 4.x and original Llama 4 checkpoints the separate file.
            processor_cfg["image_processor"] = files["preprocessor_config.json"] = (
                self.image_processor.to_hf()
            )
        for name, content in files.items():
            with open(folder / name, "w") as f:
                json.dump(content, f, indent=2)

    # ------------------------------------------------------------------ special tokens
    bos_token_id = property(lambda self: self.special_ids["bos"], doc="``<|begin_of_text|>``")
    eos_token_id = property(lambda self: self.special_ids["eos"], doc="``<|end_of_text|>``")
    eom_token_id = property(lambda self: self.special_ids["eom"], doc="``<|eom|>`` (end of message)")
    eot_token_id = property(lambda self: self.special_ids["eot"], doc="``<|eot|>`` (end of turn)")
    pad_token_id = property(lambda self: self.special_ids["pad"], doc="``<|finetune_right_pad|>``")
    boi_token_id = property(lambda self: self.special_ids["boi"], doc="``<|image_start|>``")
    eoi_token_id = property(lambda self: self.special_ids["eoi"], doc="``<|image_end|>``")
    image_token_id = property(lambda self: self.special_ids["patch"], doc="``<|patch|>`` (image features)")
    image_placeholder_id = property(lambda self: self.special_ids["image"], doc="``<|image|>``")

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops on any of these: end of text, end of message, end of turn."""
        return [self.eos_token_id, self.eom_token_id, self.eot_token_id]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def tokens_per_tile(self) -> int:
        """``<|patch|>`` tokens per tile after pixel shuffle (144 for 336-px tiles, patch 14, ratio 0.5)."""
        if self.image_processor is None:
            raise ValueError("this processor has no image processor (text-only config)")
        grid = self.image_processor.tile_size // self.patch_size
        return grid * grid // int(round(1 / self.pixel_shuffle_ratio**2))

    # ------------------------------------------------------------------ text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (``<|begin_of_text|>`` first when ``add_special_tokens``); placeholders stay
        single ``<|image|>`` tokens: use ``__call__`` to expand them."""
        if not isinstance(text, str):
            raise TypeError(f"text is {type(text).__name__}; expected str")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        # BOS is added here, not by the tokenizer.json post-processor, so every tokenizer file behaves alike.
        return [self.bos_token_id] + ids if add_special_tokens and ids[:1] != [self.bos_token_id] else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-D tensor)."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"ids tensor of shape {tuple(ids.shape)}; expected 1-D (use batch_decode)")
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
    ):
        """Texts of several id sequences (a list of lists or a 2-D tensor)."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return self.tokenizer.decode_batch(
            [list(s) for s in sequences], skip_special_tokens=skip_special_tokens
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        images: Sequence[ImageInput] | None = None,
        continue_final_message: bool = False,
        **call_kwargs,
    ) -> str | list[str] | BatchInputs:
        """Render messages in the Llama 4 chat format (a batch when given a list of conversations).

        A message is ``{"role": ..., "content": str | [{"type": "text", "text": ...}, {"type": "image"}]}``;
        image parts become ``<|image|>`` placeholders. As in HF, ``add_generation_prompt`` (open an assistant
        turn: pass True to generate an answer) is False by default, and ``continue_final_message`` leaves the last
        message open. With ``tokenize=True`` returns ``self(prompt, images)``, where ``images`` defaults to the
        ``"image"`` (or ``"path"``) values of the image parts (local files or in-memory images: URLs are not
        fetched).
        """
        batched = isinstance(messages, Sequence) and bool(messages) and not isinstance(messages[0], Mapping)
        conversations = messages if batched else [messages]
        prompts = [render_chat(c, add_generation_prompt, continue_final_message) for c in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        if images is None:
            found = [
                part.get("image", part.get("path", part.get("url")))
                for conversation in conversations
                for message in conversation
                if not isinstance(message.get("content"), str)
                for part in message["content"]
                if part.get("type") == "image"
            ]
            carried = sum(img is not None for img in found)
            if 0 < carried < len(found):
                # Else the count check would report 0 images given, though some parts hold one.
                raise ValueError(
                    f"{carried} of {len(found)} image parts carry an image; give each image part its own "
                    "('image', 'path' or 'url'), or none of them and pass images="
                )
            images = found if carried else None
        return self(prompts if batched else prompts[0], images=images, **call_kwargs)

    # ------------------------------------------------------------------ text + images -> model inputs
    def image_token_ids(self, grid: tuple[int, int]) -> list[int]:
        """The token ids one image expands to, given its ``(rows, cols)`` tile grid."""
        ids = self.special_ids
        patches = [ids["patch"]] * self.tokens_per_tile
        layout = [ids["boi"]]
        rows, cols = grid
        if rows * cols > 1:
            for _ in range(rows):
                for col in range(cols):
                    layout += patches + ([ids["tile_x"]] if col < cols - 1 else [ids["tile_y"]])
        return layout + [ids["image"]] + patches + [ids["eoi"]]

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        *,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> BatchInputs:
        """Tokenize ``text`` (one string or a batch) and preprocess ``images`` into model inputs.

        Each ``<|image|>`` in the text takes the next image (images are matched in order across the batch; a
        list of lists is flattened) and is expanded into that image's token layout. ``add_special_tokens``
        prepends ``<|begin_of_text|>`` unless the text already starts with it (as chat prompts do).
        ``padding``: True/"longest" pads to the longest sequence, "max_length" to ``max_length``, False pads
        nothing (then ``return_tensors="pt"`` needs equal lengths). Pads with ``<|finetune_right_pad|>`` on
        ``padding_side`` (default: the processor's, "left" as HF Llama 4 uses for generation).

        Returns ``input_ids`` and ``attention_mask`` (``(batch, seq)`` long tensors, or lists when
        ``return_tensors`` is None) and, with images, ``pixel_values`` ``(total_tiles, 3, tile, tile)`` float32.
        """
        side = padding_side or self.padding_side
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding={padding!r}; expected True, False, 'longest' or 'max_length'")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side={side!r}; expected 'left' or 'right'")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}; expected 'pt' or None")
        texts = _as_text_batch(text)
        flat_images = flatten_images(images)
        counts = [t.count(IMAGE_PLACEHOLDER) for t in texts]
        per_sample = _per_sample_counts(images)
        if per_sample is not None and per_sample != counts:
            # Flattened, they would still add up and each image would silently go to another sample's placeholder.
            raise ValueError(
                f"images per sample {per_sample} but {IMAGE_PLACEHOLDER} placeholders per sample {counts}; "
                "expected one list of images per text, one image per placeholder"
            )
        if sum(counts) != len(flat_images):
            raise ValueError(
                f"the text has {sum(counts)} {IMAGE_PLACEHOLDER} placeholders (per sample: {counts}) but "
                f"{len(flat_images)} images were given; expected one image per placeholder"
            )
        pixel_values, layouts = None, []
        if flat_images:
            if self.image_processor is None:
                raise ValueError("images given to a text-only processor (its config has no vision part)")
            pixel_values, grids = self.image_processor(flat_images)
            layouts = [self.image_token_ids(grid) for grid in grids]
        sequences = []
        for i, sample in enumerate(texts):
            # Plain encode per piece: encode_batch's thread pool breaks in forked DataLoader workers.
            pieces = [
                self.encode(piece, add_special_tokens=False) for piece in sample.split(IMAGE_PLACEHOLDER)
            ]
            ids = pieces[0]
            for piece in pieces[1:]:
                ids += layouts.pop(0) + piece
            if add_special_tokens and ids[:1] != [self.bos_token_id]:
                ids.insert(0, self.bos_token_id)
            if not ids:
                raise ValueError(f"text {i} is empty and add_special_tokens=False: nothing to tokenize")
            sequences.append(ids)
        longest = max(len(ids) for ids in sequences)
        if padding == "max_length":
            if max_length is None or max_length < longest:
                raise ValueError(
                    f"max_length={max_length} with padding='max_length'; a text has {longest} tokens"
                )
            longest = max_length
        elif padding in (False, "do_not_pad"):
            longest = 0
        input_ids, attention_mask = [], []
        for ids in sequences:
            pad_ids, pad_mask, mask = (
                [self.pad_token_id] * (longest - len(ids)),
                [0] * (longest - len(ids)),
                [1] * len(ids),
            )
            input_ids.append(pad_ids + ids if side == "left" else ids + pad_ids)
            attention_mask.append(pad_mask + mask if side == "left" else mask + pad_mask)
        if return_tensors == "pt":
            if len({len(ids) for ids in input_ids}) > 1:
                raise ValueError("sequences differ in length; pass padding=True to return tensors")
            input_ids, attention_mask = torch.tensor(input_ids), torch.tensor(attention_mask)
        out = BatchInputs(input_ids=input_ids, attention_mask=attention_mask)
        if pixel_values is not None:
            out["pixel_values"] = pixel_values
        return out


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _per_sample_counts(images) -> list[int] | None:
    """Image counts when ``images`` is a list of per-sample lists, else None."""
    if not isinstance(images, Sequence) or isinstance(images, SINGLE_IMAGE_TYPES) or not images:
        return None
    if not all(isinstance(item, Sequence) and not isinstance(item, SINGLE_IMAGE_TYPES) for item in images):
        return None
    return [len(item) for item in images]


def _as_text_batch(text) -> list[str]:
    if text is None:
        raise ValueError(f"text is required; put {IMAGE_PLACEHOLDER} in it where each image goes")
    if isinstance(text, str):
        return [text]
    if not isinstance(text, Sequence) or not all(isinstance(t, str) for t in text):
        raise TypeError(f"text is {type(text).__name__}; expected a string or a list of strings")
    if len(text) == 0:
        raise ValueError("text is an empty list; expected at least one string")
    return list(text)
