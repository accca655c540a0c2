"""Processor: parity with HF ``Llama4ImageProcessor`` / ``Llama4Processor``, the shipped tokenizer, bad input."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from scout_mm.chat_format import llama4_special_tokens
from scout_mm.config import SMALL_SPECIAL_OFFSET, SMALL_VOCAB_SIZE, ScoutConfig
from scout_mm.processor import BUILTIN_TOKENIZER_DIR, Processor
from scout_mm.vision.preprocess import ImageProcessor, image_file_size

transformers = pytest.importorskip("transformers")

TOKENIZER_FILE = str(BUILTIN_TOKENIZER_DIR / "tokenizer.json")
rng = np.random.default_rng()  # fresh images every run


def random_image(height: int, width: int, mode: str = "RGB") -> Image.Image:
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P+transparency":
        image = image.convert("RGB").quantize(colors=16)
        image.info["transparency"] = 3
        return image
    return image if mode == "RGBA" else image.convert(mode)


def image_sizes(tile: int, max_patches: int) -> list[tuple[int, int]]:
    """Random sizes of every kind: tiny, one tile exactly, square, wide, tall, larger than the max canvas."""
    r = lambda lo, hi: int(rng.integers(lo, hi))  # noqa: E731
    big = tile * (max_patches + 2)
    return [
        (r(1, 12), r(1, 12)),
        (tile, tile),
        (s := r(tile // 2, 2 * tile), s),
        (r(20, tile), r(2 * tile, 4 * tile)),
        (r(2 * tile, 5 * tile), r(10, tile)),
        (r(big, big + 300), r(big, big + 300)),
        (r(tile, 3 * tile), r(tile, 3 * tile)),
    ]


def hf_processor(tile: int, max_patches: int, tokenizer_file: str = TOKENIZER_FILE):
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=tokenizer_file,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot|>",
        pad_token="<|finetune_right_pad|>",
    )
    image_processor = transformers.Llama4ImageProcessor(
        size={"height": tile, "width": tile}, max_patches=max_patches
    )
    return transformers.Llama4Processor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14)


@pytest.fixture(scope="module")
def builtin() -> Processor:
    return Processor.from_pretrained("builtin", tile_size=168, max_patches=4)


# ---------------------------------------------------------------------- image preprocessing parity
@pytest.mark.parametrize(
    "tile,max_patches,to_max_canvas",
    [(336, 16, False), (336, 4, True), (168, 6, False), (168, 1, False), (168, 9, True)],
)
def test_pixel_values_and_grids_match_hf(tile, max_patches, to_max_canvas):
    sizes = image_sizes(tile, max_patches)
    images = [random_image(h, w) for h, w in sizes] + [random_image(*sizes[3])]  # a repeated shape too
    ours = ImageProcessor(tile_size=tile, max_patches=max_patches, resize_to_max_canvas=to_max_canvas)
    pixel_values, grids = ours(images)
    reference = transformers.Llama4ImageProcessor(
        size={"height": tile, "width": tile}, max_patches=max_patches, resize_to_max_canvas=to_max_canvas
    )
    expected = reference(images, return_tensors="pt")
    assert grids == [tuple(g) for g in expected["aspect_ratios"].tolist()]
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == expected["pixel_values"].shape
    assert (pixel_values - expected["pixel_values"].float()).abs().max() <= 1e-5


@pytest.mark.parametrize("tile,side", [(168, 285), (168, 262), (168, 553), (336, 524), (336, 639)])
def test_float32_resize_rounding_matches_hf(tile, side):
    # Sizes where float32 and float64 ratios floor differently: the reference's float32 wins.
    images = [random_image(side, side), random_image(side, side + 7), random_image(side + 7, side)]
    for max_patches in (1, 2):
        pixel_values, _ = ImageProcessor(tile_size=tile, max_patches=max_patches)(images)
        reference = transformers.Llama4ImageProcessor(
            size={"height": tile, "width": tile}, max_patches=max_patches
        )
        expected = reference(images, return_tensors="pt")["pixel_values"].float()
        assert (pixel_values - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "P+transparency", "CMYK", "1", "YCbCr"])
def test_non_rgb_modes_match_hf(mode):
    images = [random_image(int(rng.integers(50, 400)), int(rng.integers(50, 400)), mode) for _ in range(2)]
    pixel_values, grids = ImageProcessor(tile_size=168, max_patches=4)(images)
    expected = transformers.Llama4ImageProcessor(size={"height": 168, "width": 168}, max_patches=4)(
        images, return_tensors="pt"
    )
    assert grids == [tuple(g) for g in expected["aspect_ratios"].tolist()]
    assert (pixel_values - expected["pixel_values"].float()).abs().max() <= 1e-5


@pytest.mark.parametrize("layout", ["HWC", "CHW", "HW", "HW1", "CHW4", "HWC4"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_arrays_and_tensors_match_hf(layout, kind):
    h, w = int(rng.integers(30, 300)), int(rng.integers(30, 300))
    channels = 4 if layout.endswith("4") else 1 if layout.endswith("1") or layout == "HW" else 3
    array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    if layout == "HW":
        array = array[..., 0]
    elif layout.startswith("CHW"):
        array = np.ascontiguousarray(array.transpose(2, 0, 1))
    image = torch.from_numpy(array) if kind == "torch" else array
    pixel_values, grids = ImageProcessor(tile_size=168, max_patches=4)([image])
    reference = image[..., None] if layout == "HW" else image  # HF wants a channel axis
    expected = transformers.Llama4ImageProcessor(size={"height": 168, "width": 168}, max_patches=4)(
        [reference], return_tensors="pt"
    )
    assert grids == [tuple(g) for g in expected["aspect_ratios"].tolist()]
    assert (pixel_values - expected["pixel_values"].float()).abs().max() <= 1e-5


def test_ambiguous_array_layout_warns():
    """(3, W, 3) may be a 3-row RGB strip or a 3-channel image 3 pixels wide: read as channels first, as HF does,
    but not silently."""
    processor = ImageProcessor(tile_size=168, max_patches=4)
    with pytest.warns(UserWarning, match=r"tensor shape \(3, 500, 3\) may be \(C, H, W\) or \(H, W, C\)"):
        _, grids = processor([np.zeros((3, 500, 3), np.uint8)])
    assert grids == [(3, 1)]  # read as 500 x 3: tall
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for unambiguous in [
            np.zeros((20, 500, 3), np.uint8),
            np.zeros((3, 20, 500), np.uint8),
            np.zeros((9, 3), np.uint8),
        ]:
            processor([unambiguous])


def test_path_input_equals_pil_input(tmp_path):
    image = random_image(200, 300)
    image.save(tmp_path / "image.png")
    processor = ImageProcessor(tile_size=168, max_patches=4)
    for path in (tmp_path / "image.png", str(tmp_path / "image.png")):
        assert torch.equal(processor([path])[0], processor([image])[0])


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_image_files_are_turned_upright_by_their_exif_orientation_as_hf_does(tmp_path, suffix):
    """A camera stores a portrait photo as a landscape one plus an EXIF orientation; HF reads it upright."""
    hf = hf_processor(168, 4).image_processor
    processor = ImageProcessor(tile_size=168, max_patches=4)
    stored = random_image(int(rng.integers(60, 200)), int(rng.integers(250, 400)))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        path = tmp_path / f"o{orientation}{suffix}"
        stored.save(path, exif=exif.tobytes(), **({"quality": 95} if suffix == ".jpg" else {}))
        expected = hf([str(path)], return_tensors="pt")
        tiles, grid = processor([str(path)])
        assert [tuple(g) for g in grid] == [tuple(g) for g in expected["aspect_ratios"].tolist()], orientation
        assert torch.equal(tiles, expected["pixel_values"]), orientation
        # the bytes of the file too, and the header-only size the training loader plans tiles with
        assert torch.equal(processor([path.read_bytes()])[0], tiles)
        upright = (stored.height, stored.width) if orientation >= 5 else stored.size
        assert image_file_size(path) == upright


def test_urls_and_box_resampling_are_refused_by_name():
    with pytest.raises(ValueError, match="is a URL; images are not downloaded"):
        ImageProcessor(tile_size=168, max_patches=4)(["https://example.com/cat.png"])
    for resample in (4, 5, "box"):
        with pytest.raises(ValueError, match="has no tensor resize"):
            ImageProcessor(resample=resample)


# ---------------------------------------------------------------------- full processor parity
@pytest.mark.parametrize("tile,max_patches", [(336, 16), (168, 4), (168, 1)])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_input_ids_match_hf_processor(tile, max_patches, padding_side):
    sizes = image_sizes(tile, max_patches)
    chosen = [sizes[i] for i in rng.choice(len(sizes), 3, replace=False)]
    images = [random_image(h, w) for h, w in chosen]
    texts = [
        "<|image|>What colour is the big square?",
        "Compare <|image|> with\n<|image|>: which has more circles? Count them.",
        "No image in this one, just a longer question about shapes and colours.",
    ]
    ours = Processor.from_pretrained("builtin", tile_size=tile, max_patches=max_patches)(
        texts, images, padding_side=padding_side
    )
    expected = hf_processor(tile, max_patches)(
        text=texts, images=images, return_tensors="pt", padding=True, padding_side=padding_side
    )
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert torch.equal(ours["attention_mask"], expected["attention_mask"])
    assert (ours["pixel_values"] - expected["pixel_values"].float()).abs().max() <= 1e-5


@pytest.mark.parametrize("tile,tokens", [(336, 144), (168, 36)])
def test_image_layout_counts(tile, tokens):
    processor = Processor.from_pretrained("builtin", tile_size=tile, max_patches=6)
    assert processor.tokens_per_tile == tokens
    for h, w in image_sizes(tile, 6):
        out = processor("<|image|>", [random_image(h, w)])
        ids = out["input_ids"][0]
        n_tiles = out["pixel_values"].shape[0]
        assert (ids == processor.image_token_id).sum() == n_tiles * tokens
        assert ids[1] == processor.boi_token_id and ids[-1] == processor.eoi_token_id
        assert (ids == processor.image_placeholder_id).sum() == 1
        x_sep = (ids == processor.special_ids["tile_x"]).sum().item()
        y_sep = (ids == processor.special_ids["tile_y"]).sum().item()
        rows_cols = (y_sep, x_sep // y_sep + 1) if y_sep else (1, 1)
        assert n_tiles == (rows_cols[0] * rows_cols[1] + (1 if y_sep else 0))


# ---------------------------------------------------------------------- chat template
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "  You answer briefly.\n"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is here?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here? "}, {"type": "image"}]},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": " Count shapes. "}]},
        {"role": "user", "content": "How many?"},
        {"role": "tool", "content": {"count": 3, "shape": "étoile"}},
        {"role": "ipython", "content": "plain text"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["plain", "images", "system_tool"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(builtin, conversation, add_generation_prompt):
    expected = hf_processor(168, 4).apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert builtin.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected
    prompt = builtin.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert prompt.startswith("<|begin_of_text|>")


def test_chat_template_literal_format_and_batch(builtin):
    message = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]}]
    expected = (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nHi<|image|><|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    assert builtin.apply_chat_template(message, add_generation_prompt=True) == expected
    assert builtin.apply_chat_template([message, message], add_generation_prompt=True) == [expected, expected]


@pytest.mark.parametrize("conversation", CONVERSATIONS[:2], ids=["plain", "images"])
def test_chat_template_defaults_and_continue_final_message_match_hf(builtin, conversation):
    hf = hf_processor(168, 4)
    # HF's default: no assistant turn opened.
    assert builtin.apply_chat_template(conversation) == hf.apply_chat_template(conversation, tokenize=False)
    opened = conversation + [{"role": "assistant", "content": [{"type": "text", "text": "It is"}]}]
    expected = hf.apply_chat_template(opened, tokenize=False, continue_final_message=True)
    assert builtin.apply_chat_template(opened, continue_final_message=True) == expected
    assert expected.endswith("<|header_start|>assistant<|header_end|>\n\nIt is")
    with pytest.raises(ValueError, match="exclude each other"):
        builtin.apply_chat_template(opened, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ValueError, match="must end with text"):
        builtin.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}],
            continue_final_message=True,
        )


def test_chat_tokenize_uses_message_images_and_single_bos(builtin):
    image = random_image(100, 250)
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]}
    ]
    out = builtin.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    prompt = builtin.apply_chat_template(conversation, add_generation_prompt=True)
    expected = hf_processor(168, 4)(
        text=[prompt], images=[image], add_special_tokens=False, return_tensors="pt"
    )
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert (out["input_ids"][0] == builtin.bos_token_id).sum() == 1


# ---------------------------------------------------------------------- tokenizer asset and ids
def test_builtin_tokenizer_layout(builtin):
    assert builtin.vocab_size == SMALL_VOCAB_SIZE
    assert builtin.tokenizer.get_vocab_size(with_added_tokens=False) == SMALL_SPECIAL_OFFSET
    for rel, name in enumerate(llama4_special_tokens(256)):
        assert builtin.tokenizer.token_to_id(name) == SMALL_SPECIAL_OFFSET + rel
    assert os.path.getsize(TOKENIZER_FILE) < 2 * 1024 * 1024
    o = SMALL_SPECIAL_OFFSET
    assert (builtin.bos_token_id, builtin.eos_token_id, builtin.eom_token_id, builtin.eot_token_id) == (
        o, o + 1, o + 7, o + 8,
    )  # fmt: skip
    assert (builtin.pad_token_id, builtin.boi_token_id, builtin.eoi_token_id) == (o + 18, o + 80, o + 81)
    assert (builtin.image_token_id, builtin.image_placeholder_id) == (o + 92, o + 90)
    assert llama4_special_tokens(1144)[1134:] == [
        f"<|reasoning_reserved_special_token_{i}|>" for i in range(8)
    ] + [
        "<|reasoning_thinking_start|>",
        "<|reasoning_thinking_end|>",
    ]


def test_encode_decode_round_trip(builtin):
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"\n\t-_/éüß日本語🙂")
    text = "".join(rng.choice(alphabet, 300))
    ids = builtin.encode(text)
    assert ids[0] == builtin.bos_token_id and all(0 <= i < SMALL_SPECIAL_OFFSET for i in ids[1:])
    assert builtin.decode(ids, skip_special_tokens=True) == text
    assert builtin.decode(torch.tensor(ids)) == "<|begin_of_text|>" + text
    batch = builtin(["short", text], padding_side="right")
    assert builtin.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["short", text]
    assert batch["input_ids"][0, -1] == builtin.pad_token_id and batch["attention_mask"][0].sum() == len(
        builtin.encode("short")
    )


def test_padding_options(builtin):
    out = builtin(["a b c d e f", "a"], padding="max_length", max_length=20, padding_side="left")
    assert out["input_ids"].shape == (2, 20) and out["attention_mask"][1, -2:].tolist() == [1, 1]
    lists = builtin(["a b c", "a"], return_tensors=None, padding=False)
    assert [len(ids) for ids in lists["input_ids"]] == [4, 2]
    assert "pixel_values" not in lists


# ---------------------------------------------------------------------- configs, save/load
def test_from_config_tiny_preset():
    cfg = ScoutConfig.from_preset("tiny")
    processor = Processor.from_config(cfg)
    assert processor.image_processor.tile_size == cfg.vision.image_size == 168
    assert processor.tokens_per_tile == cfg.vision.tokens_per_tile == 36
    assert processor.image_token_id == cfg.image_token_index
    assert processor.stop_token_ids == cfg.text.eos_token_ids


def test_from_config_rejects_mismatched_ids():
    with pytest.raises(ValueError, match="image_token_index=200092"):
        Processor.from_config(ScoutConfig.from_preset("scout-17b-16e"))


def test_from_config_text_only_ignores_image_token_ids():
    # A text-only model never sees image tokens: its config's image ids (here Llama 4's defaults, which the
    # built-in tokenizer does not have) must not stop the processor; its text ids still must agree.
    cfg = ScoutConfig.from_preset("tiny")
    cfg.vision = None
    cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index = 200092, 200080, 200081
    processor = Processor.from_config(cfg)
    assert processor.image_processor is None
    assert processor.stop_token_ids == cfg.text.eos_token_ids
    cfg.text.bos_token_id += 1
    with pytest.raises(ValueError, match="text.bos_token_id"):
        Processor.from_config(cfg)


def test_save_load_round_trip(tmp_path, builtin):
    processor = Processor.from_pretrained("builtin", tile_size=168, max_patches=6, padding_side="right")
    processor.save_pretrained(tmp_path)
    loaded = Processor.from_pretrained(tmp_path)
    assert loaded.image_processor == processor.image_processor
    assert (loaded.patch_size, loaded.pixel_shuffle_ratio, loaded.padding_side) == (14, 0.5, "right")
    images = [random_image(300, 500), random_image(40, 60)]
    texts = ["<|image|> one", "two <|image|>"]
    a, b = processor(texts, images), loaded(texts, images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The saved folder is also a valid HF Llama 4 processor.
    hf = transformers.Llama4Processor.from_pretrained(tmp_path)
    expected = hf(text=texts, images=images, return_tensors="pt", padding=True, padding_side="right")
    assert torch.equal(a["input_ids"], expected["input_ids"])
    # and an HF-written folder loads here
    hf_processor(168, 3).save_pretrained(tmp_path / "hf")
    from_hf = Processor.from_pretrained(tmp_path / "hf")
    assert (from_hf.image_processor.tile_size, from_hf.image_processor.max_patches) == (168, 3)


def test_from_pretrained_names_a_file_that_is_not_a_tokenizer(tmp_path):
    # Was: tokenizers' bare Exception "expected `,` or `}` at line 2 column 18", naming no file.
    (tmp_path / "config.json").write_text('{"model_type": "llama4"}')
    (tmp_path / "tokenizer.json").write_text("{not json")
    for given in (tmp_path / "config.json", tmp_path):
        name = "config.json" if given != tmp_path else "tokenizer.json"
        with pytest.raises(ValueError, match=f"{name} is not a readable tokenizer.json"):
            Processor.from_pretrained(given)


def test_from_pretrained_reads_hf_preprocessor_config(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(open(TOKENIZER_FILE, "rb").read())
    config = {"size": {"height": 224, "width": 224}, "max_patches": 2, "image_mean": [0.4, 0.5, 0.6]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = Processor.from_pretrained(tmp_path, max_patches=3)
    assert loaded.image_processor.tile_size == 224 and loaded.image_processor.max_patches == 3
    assert loaded.image_processor.image_mean == (0.4, 0.5, 0.6)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "text,n_images,match",
    [
        ("<|image|><|image|>", 1, "2 <\\|image\\|> placeholders"),
        ("no placeholder", 1, "0 <\\|image\\|> placeholders"),
        (None, 1, "text is required"),
        ([], 0, "empty list"),
    ],
)
def test_placeholder_image_mismatch(builtin, text, n_images, match):
    with pytest.raises(ValueError, match=match):
        builtin(text, [random_image(20, 20) for _ in range(n_images)] or None)


def test_per_sample_image_lists_must_match_their_texts(builtin):
    image = random_image(20, 20)
    with pytest.raises(
        ValueError, match=r"images per sample \[0, 1\] but .* placeholders per sample \[1, 0\]"
    ):
        builtin(["<|image|> a", "b"], [[], [image]])
    with pytest.raises(ValueError, match=r"images per sample \[1\] but .* per sample \[1, 0\]"):
        builtin(["<|image|> a", "b"], [[image]])
    out = builtin(["<|image|> a", "b"], [[image], []])  # matching lists, and a flat list, are fine
    assert torch.equal(out["input_ids"], builtin(["<|image|> a", "b"], [image])["input_ids"])


def test_bad_text(builtin):
    with pytest.raises(TypeError, match="expected a string or a list of strings"):
        builtin(["ok", 3])
    with pytest.raises(ValueError, match="text 0 is empty"):
        builtin("", add_special_tokens=False)
    with pytest.raises(ValueError, match="padding_side='middle'"):
        builtin("a", padding_side="middle")
    with pytest.raises(ValueError, match="return_tensors='np'"):
        builtin("a", return_tensors="np")
    with pytest.raises(ValueError, match="differ in length"):
        builtin(["a b c", "a"], padding=False)
    with pytest.raises(ValueError, match="max_length=2"):
        builtin(["a b c"], padding="max_length", max_length=2)


def test_bad_images(builtin, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    cases = [
        (str(tmp_path / "notes.txt"), ValueError, "not a readable image file"),
        (str(tmp_path / "missing.png"), FileNotFoundError, "no file at"),
        (str(tmp_path), IsADirectoryError, "is a folder, not an image file"),
        (np.zeros((10, 10, 2), np.uint8), ValueError, r"shape \(10, 10, 2\)"),
        (np.zeros((2, 10, 10, 3), np.uint8), ValueError, r"shape \(2, 10, 10, 3\)"),
        (np.zeros((10, 10, 3), np.float32), TypeError, "dtype torch.float32"),
        (np.zeros((0, 10, 3), np.uint8), ValueError, "empty image"),
        (Image.new("F", (10, 10)), ValueError, "mode 'F'"),
        (Image.new("I;16", (10, 10)), ValueError, "mode 'I;16'"),
        (12345, TypeError, "got int"),
    ]
    for image, error, match in cases:
        with pytest.raises(error, match=match):
            builtin("<|image|>", [image])


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_encoded_image_bytes_are_opened_as_images(builtin):
    image = random_image(50, 70)
    expected = builtin("<|image|> a", [image])
    data = _png_bytes(image)
    for given in (data, [data], [[data]], bytearray(data), [memoryview(data)]):
        out = builtin("<|image|> a", given)
        assert torch.equal(out["input_ids"], expected["input_ids"])
        assert torch.equal(out["pixel_values"], expected["pixel_values"])
    with pytest.raises(ValueError, match="image 0: 12 bytes is not a readable image file"):
        builtin("<|image|>", [b"not an image"])


def test_read_only_arrays_are_copied_before_torch_sees_them(builtin, monkeypatch):
    # np.asarray(pil_image) is read-only; torch would wrap it (with a warning, once per process) and could write it.
    from_numpy = torch.from_numpy

    def writable_only(array):
        assert array.flags.writeable, "torch.from_numpy got a read-only array"
        return from_numpy(array)

    monkeypatch.setattr(torch, "from_numpy", writable_only)
    image = random_image(30, 40)
    expected = builtin("<|image|>", [image])["pixel_values"]
    assert torch.equal(builtin("<|image|>", [np.asarray(image)])["pixel_values"], expected)
    channels_first = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
    channels_first.flags.writeable = False
    assert torch.equal(builtin("<|image|>", [channels_first])["pixel_values"], expected)


def test_closed_or_oversized_image_files_are_named(builtin, tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    random_image(50, 50).save(path)
    with Image.open(path) as lazy:
        pass  # closed before its pixels were read
    with pytest.raises(ValueError, match="image 0: cannot read its pixels, its file was closed first"):
        builtin("<|image|>", [lazy])
    with Image.open(path) as loaded:
        loaded.load()
    assert "pixel_values" in builtin("<|image|>", [loaded])  # read before the close: fine
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2500 pixels: over twice the limit, a "bomb"
    for given, name in ((str(path), repr(str(path))), (path.read_bytes(), "bytes")):
        with pytest.raises(ValueError, match=f"image 0: .*{re.escape(name)} is too large to decode safely"):
            builtin("<|image|>", [given])


def test_chat_image_parts_with_only_some_images_are_counted(builtin):
    image = random_image(20, 20)
    parts = [{"type": "image", "image": image}, {"type": "image"}, {"type": "text", "text": "compare"}]
    with pytest.raises(ValueError, match="1 of 2 image parts carry an image"):
        builtin.apply_chat_template([{"role": "user", "content": parts}], tokenize=True)


def test_bad_chat_messages(builtin):
    with pytest.raises(ValueError, match="messages is \\[\\]; expected a non-empty list"):
        builtin.apply_chat_template([])
    with pytest.raises(ValueError, match="messages is {'role'"):
        builtin.apply_chat_template({"role": "user", "content": "hi"})
    with pytest.raises(ValueError, match="expected a dict with 'role' and 'content'"):
        builtin.apply_chat_template([{"content": "hi"}])
    with pytest.raises(ValueError, match="'audio'"):
        builtin.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="no images in a system message"):
        builtin.apply_chat_template([{"role": "system", "content": [{"type": "image"}]}])
    with pytest.raises(ValueError, match="2 <\\|image\\|> placeholders"):
        builtin.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], tokenize=True
        )


def test_chat_roles_and_text_parts_must_be_strings(builtin):
    with pytest.raises(ValueError, match="message 0: role None; expected a string"):
        builtin.apply_chat_template([{"role": None, "content": "hi"}])
    with pytest.raises(ValueError, match="message 0: text part .*; expected a 'text' string"):
        builtin.apply_chat_template([{"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(ValueError, match="message 0: text part .*; expected a 'text' string"):
        builtin.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": 5}]}])


def test_bad_configuration(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Processor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="resample=99"):
        ImageProcessor(resample=99)
    with pytest.raises(ValueError, match="not a multiple of patch_size=14"):
        Processor.from_pretrained("builtin", tile_size=100)
    with pytest.raises(TypeError, match="unknown image processor options \\['tile'\\]"):
        Processor.from_pretrained("builtin", tile=100)
