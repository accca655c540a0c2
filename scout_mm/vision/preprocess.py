"""Image preprocessing for the vision tower: any image -> RGB uint8 -> best-fit tile canvas -> normalised tiles.

The semantics are those of HF ``Llama4ImageProcessor`` (itself following Meta's reference), so pixel values match
it exactly:

1. Pick a canvas of ``rows x cols`` tiles (``rows * cols <= max_patches``) that needs the least scaling: the
   smallest upscale if some canvas allows upscaling, else the mildest downscale; ties go to the smallest area.
2. Resize the image without distortion to fit the canvas (upscaling only up to one tile side unless
   ``resize_to_max_canvas``), pad right/bottom with zeros, and cut it into ``rows * cols`` tiles, row-major.
3. When there is more than one tile, append a global tile: the whole image squashed to ``tile x tile``.
4. Rescale to [0, 1] and normalise with mean/std, in bfloat16 as the reference does (so values are bf16-rounded;
   they are returned as float32).
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

ImageInput = Image.Image | str | os.PathLike | bytes | torch.Tensor | np.ndarray
# One image each, though str and bytes are Sequences: never read as a list of images.
SINGLE_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, torch.Tensor)

# PIL resample codes (the form HF stores in preprocessor_config.json) -> torchvision interpolation names.
# PIL's box (4) and hamming (5) filters have no tensor resize in torchvision: refused when the config is read.
RESAMPLE_CODES = {0: "nearest-exact", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_UNSUPPORTED_RESAMPLE = {4: "box", 5: "hamming"}
# 16-bit and float PIL images have no agreed 8-bit scaling; refuse them rather than guess.
_REJECTED_PIL_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def to_rgb_uint8(image: ImageInput, index: int = 0) -> torch.Tensor:
    """Any supported image as a ``(3, H, W)`` uint8 tensor; transparency is composited onto white.

    Accepts PIL images (any 8-bit mode: RGB, RGBA, L, LA, P, PA, CMYK, YCbCr, 1, ...), paths to image files, the
    bytes of an encoded image file (PNG, JPEG, ... as read from a file, an HTTP response or a dataset), and uint8
    tensors/arrays shaped ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` with C in 1, 3, 4 (channels first when
    ambiguous). ``index`` only labels error messages.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if isinstance(path, str) and path.lower().startswith(("http://", "https://")):
            raise ValueError(
                f"image {index}: {path!r} is a URL; images are not downloaded here: fetch it first and pass the "
                "file's path, its bytes or a PIL image"
            )
        if os.path.isdir(path):
            raise IsADirectoryError(f"image {index}: {path!r} is a folder, not an image file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image {index}: no file at {path!r}")
        image = _open_image(path, f"{path!r}", index)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        image = _open_image(io.BytesIO(image), f"{len(image)} bytes", index)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, index)
    if isinstance(image, np.ndarray):
        # A read-only array (np.asarray of a PIL image) is copied: torch cannot guard memory it must not write.
        image = torch.from_numpy(
            np.ascontiguousarray(image) if image.flags.writeable else np.array(image, order="C")
        )
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"image {index}: got {type(image).__name__}; expected a PIL image, a path, the bytes of an image "
            "file, or a uint8 tensor/array"
        )
    return _tensor_to_rgb(image, index)


def image_file_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file as :func:`to_rgb_uint8` reads it (upright by its EXIF orientation),
    from the file's header: the pixels are not decoded. A PNG's EXIF is read only when it comes before the
    pixel data (where it belongs; a later one would cost a full decode here)."""
    with Image.open(path) as image:
        width, height = image.size
        if image.format == "PNG" and "exif" not in image.info:
            return width, height
        if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # turned a quarter
            return height, width
    return width, height


def _open_image(source, label: str, index: int) -> Image.Image:
    """An image file (a path or a file object), decoded whole and turned upright by its EXIF orientation (as a
    camera stores a photo, and as HF's image loading reads it); ``label`` names it in errors."""
    try:
        with Image.open(source) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)  # a copy, upright (the image as stored when untagged)
    except Image.DecompressionBombError as e:
        # Not an OSError: without this a CLI would end in a traceback.
        raise ValueError(
            f"image {index}: {label} is too large to decode safely ({e}); raise PIL.Image.MAX_IMAGE_PIXELS to "
            "accept it"
        ) from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {index}: {label} is not a readable image file ({e})") from e


def _pil_to_rgb(image: Image.Image, index: int) -> torch.Tensor:
    if image.mode in _REJECTED_PIL_MODES:
        raise ValueError(
            f"image {index}: mode {image.mode!r}; expected an 8-bit mode (RGB, RGBA, L, LA, P, CMYK, ...): "
            "convert 16-bit or float images to 8 bits first"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {index}: empty image of size {image.size}")
    try:
        image.load()
    except AssertionError as e:
        # What PIL raises, with no message, when a lazily opened image's file was closed before its pixels were read.
        raise ValueError(
            f"image {index}: cannot read its pixels, its file was closed first; call .load() inside the "
            "`with Image.open(...)` block, or pass the path"
        ) from e
    try:
        if "A" in image.getbands() or "transparency" in image.info:
            # Same as HF: transparent pixels become white, not black.
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"image {index}: cannot convert mode {image.mode!r} to RGB ({e})") from e
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


def _tensor_to_rgb(image: torch.Tensor, index: int) -> torch.Tensor:
    if image.dtype != torch.uint8:
        raise TypeError(f"image {index}: tensor dtype {image.dtype}; expected torch.uint8 (values 0..255)")
    gray = image.ndim == 2
    if gray:
        image = image.unsqueeze(0)
    if image.ndim != 3:
        raise ValueError(
            f"image {index}: tensor shape {tuple(image.shape)}; expected (H, W), (C, H, W) or (H, W, C) "
            "with C in 1, 3, 4 (pass several images as a list)"
        )
    if image.shape[0] not in (1, 3, 4):
        if image.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"image {index}: tensor shape {tuple(image.shape)}; expected 1, 3 or 4 channels first or last"
            )
        image = image.permute(2, 0, 1)
    elif image.shape[-1] in (1, 3, 4) and not gray:
        # Channels first, as HF decides; it warns too, since e.g. a (3, 5000, 3) RGB strip is then read as a
        # 5000 x 3 image instead of 3 x 5000.
        warnings.warn(
            f"image {index}: tensor shape {tuple(image.shape)} may be (C, H, W) or (H, W, C); read as (C, H, W). "
            "Pass a PIL image to avoid the ambiguity",
            stacklevel=2,
        )
    if image.shape[-1] == 0 or image.shape[-2] == 0:
        raise ValueError(f"image {index}: empty image of shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        # Composite onto white like the PIL path; same float round trip as HF for arrays.
        pixels = tvF.to_dtype(image.movedim(0, -1), torch.float32, scale=True)
        rgb, alpha = pixels[..., :3], pixels[..., 3:]
        image = tvF.to_dtype(rgb * alpha + (1 - alpha), torch.uint8, scale=True).movedim(-1, 0)
    return image.contiguous()


def flatten_images(images: ImageInput | Sequence | None) -> list:
    """One image, a list of images, or a list of per-sample lists -> a flat list (None -> empty)."""
    if images is None:
        return []
    if isinstance(images, SINGLE_IMAGE_TYPES) or not isinstance(images, Sequence):
        return [images]  # PIL images and arrays are not Sequences; bad types are reported per image later
    flat = []
    for item in images:
        if isinstance(item, Sequence) and not isinstance(item, SINGLE_IMAGE_TYPES):
            flat.extend(item)
        else:
            flat.append(item)
    return flat


@functools.cache
def candidate_canvases(max_tiles: int, tile_size: int) -> tuple[tuple[int, int], ...]:
    """All ``(height, width)`` canvases of at most ``max_tiles`` tiles, in the reference's order.

    Canvases are grouped by aspect ratio in the order ratios first appear while walking tile counts from
    ``max_tiles`` down to 1. The order only matters for ties in area, which go to the first one.
    """
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n_tiles in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, n_tiles + 1) if n_tiles % d == 0):
            cols = n_tiles // rows
            by_ratio.setdefault(rows / cols, []).append((rows * tile_size, cols * tile_size))
    return tuple(canvas for group in by_ratio.values() for canvas in group)


def select_canvas(
    height: int, width: int, max_tiles: int, tile_size: int, resize_to_max_canvas: bool = False
) -> tuple[int, int]:
    """The canvas ``(height, width)`` in pixels that an image of ``height x width`` is fitted into."""
    canvases = candidate_canvases(max_tiles, tile_size)
    sizes = torch.tensor(canvases)  # (n_canvases, 2)
    # float32 division like the reference, so that near-ties resolve the same way.
    scales = torch.minimum(sizes[:, 0] / height, sizes[:, 1] / width)
    upscales = scales[scales >= 1]
    if len(upscales):
        chosen = upscales.max() if resize_to_max_canvas else upscales.min()
    else:
        chosen = scales[scales < 1].max()
    matching = [canvases[i] for i in torch.nonzero(scales == chosen).flatten().tolist()]
    return min(matching, key=lambda hw: hw[0] * hw[1])


def fitted_size(
    height: int, width: int, canvas: tuple[int, int], tile_size: int, resize_to_max_canvas: bool = False
) -> tuple[int, int]:
    """Size the image is resized to inside ``canvas``, keeping its aspect ratio (floor on the free side)."""
    canvas_h, canvas_w = canvas
    # Small images are not blown up past one tile side (unless resize_to_max_canvas): they get padded instead.
    cap_h = canvas_h if resize_to_max_canvas else max(height, tile_size)
    cap_w = canvas_w if resize_to_max_canvas else max(width, tile_size)
    limit_h, limit_w = min(cap_h, canvas_h), min(cap_w, canvas_w)
    # The reference computes a ratio in float32 (0-d tensors) where its limit came from the canvas tensor and
    # in float64 where it came from the image size. Both roundings are kept: otherwise e.g. a 285x285 image
    # on a 168 canvas ends up 168x167 instead of 168x168.
    from_canvas_h = resize_to_max_canvas or canvas_h < cap_h
    from_canvas_w = resize_to_max_canvas or canvas_w < cap_w
    scale_h = (torch.tensor(limit_h) if from_canvas_h else limit_h) / height
    scale_w = (torch.tensor(limit_w) if from_canvas_w else limit_w) / width
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), limit_h), limit_w
    else:
        new_h, new_w = limit_h, min(math.floor(width * scale_h), limit_w)
    return max(int(new_h), 1), max(int(new_w), 1)


@dataclass
class ImageProcessor:
    """Turns images into ``(n_tiles, 3, tile_size, tile_size)`` float tiles plus their ``(rows, cols)`` grid.

    Field names follow HF ``preprocessor_config.json`` where one exists (``max_patches`` is the tile budget,
    ``resample`` a PIL code or torchvision interpolation name).
    """

    tile_size: int = 336
    max_patches: int = 16
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int | str = 2
    resize_to_max_canvas: bool = False

    def __post_init__(self):
        if self.tile_size < 1 or self.max_patches < 1:
            raise ValueError(
                f"tile_size={self.tile_size}, max_patches={self.max_patches}; expected positive integers"
            )
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"image_mean={self.image_mean}, image_std={self.image_std}; expected 3 values each"
            )
        unsupported = _UNSUPPORTED_RESAMPLE.get(self.resample, self.resample)
        if unsupported in _UNSUPPORTED_RESAMPLE.values():
            raise ValueError(
                f"resample={self.resample!r} (PIL's {unsupported} filter) has no tensor resize; use one of "
                f"{RESAMPLE_CODES}"
            )
        if self.resample not in RESAMPLE_CODES and self.resample not in RESAMPLE_CODES.values():
            raise ValueError(
                f"resample={self.resample!r}; expected a PIL code {sorted(RESAMPLE_CODES)} or one of "
                f"{sorted(RESAMPLE_CODES.values())}"
            )

    @property
    def interpolation(self):
        name = RESAMPLE_CODES.get(self.resample, self.resample)
        return InterpolationMode(name)

    def preprocess(self, image: ImageInput, index: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (tiles ``(n_tiles, 3, tile, tile)`` float32, ``(rows, cols)`` of the local grid).

        ``n_tiles`` is ``rows * cols``, plus one global tile when ``rows * cols > 1``.
        """
        pixels = to_rgb_uint8(image, index)  # (3, H, W) uint8
        height, width = pixels.shape[-2:]
        tile = self.tile_size
        canvas = select_canvas(height, width, self.max_patches, tile, self.resize_to_max_canvas)
        new_size = fitted_size(height, width, canvas, tile, self.resize_to_max_canvas)
        resized = tvF.resize(pixels, list(new_size), interpolation=self.interpolation, antialias=True)
        padded = tvF.pad(resized, [0, 0, canvas[1] - new_size[1], canvas[0] - new_size[0]], fill=0)
        rows, cols = canvas[0] // tile, canvas[1] // tile
        # (3, rows*tile, cols*tile) -> (rows*cols, 3, tile, tile), tiles in row-major order
        tiles = self._normalize(padded).view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)
        tiles = tiles.reshape(rows * cols, 3, tile, tile)
        if rows * cols > 1:
            squashed = tvF.resize(pixels, [tile, tile], interpolation=self.interpolation, antialias=True)
            tiles = torch.cat([tiles, self._normalize(squashed)[None]])
        return tiles, (rows, cols)

    def __call__(
        self, images: ImageInput | Sequence[ImageInput]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images (one, a list, or a list of lists) -> (all tiles ``(total_tiles, 3, tile, tile)``, grids)."""
        images = flatten_images(images)
        if len(images) == 0:
            raise ValueError("no images given; expected at least one")
        results = [self.preprocess(image, i) for i, image in enumerate(images)]
        return torch.cat([tiles for tiles, _ in results]), [grid for _, grid in results]

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = list(self.image_mean), list(self.image_std)
        if self.do_rescale and self.do_normalize:
            # The reference rescales and normalises in bfloat16; doing the same keeps pixel values identical.
            values = tvF.normalize(pixels.to(torch.bfloat16) * self.rescale_factor, mean, std)
        elif self.do_rescale:
            values = pixels * self.rescale_factor
        elif self.do_normalize:
            values = tvF.normalize(pixels.float(), mean, std)
        else:
            values = pixels
        return values.float()

    # ------------------------------------------------------------------ HF preprocessor_config.json
    def to_hf(self) -> dict[str, Any]:
        """The HF ``preprocessor_config.json`` dict for ``Llama4ImageProcessor``."""
        resample = self.resample
        if isinstance(resample, str):
            resample = {name: code for code, name in RESAMPLE_CODES.items()}[resample]
        return {
            "image_processor_type": "Llama4ImageProcessor",
            "processor_class": "Llama4Processor",
            "size": {"height": self.tile_size, "width": self.tile_size},
            "max_patches": self.max_patches,
            "resize_to_max_canvas": self.resize_to_max_canvas,
            "resample": resample,
            "do_resize": True,
            "do_convert_rgb": True,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @classmethod
    def from_hf(cls, config: dict[str, Any], **overrides) -> ImageProcessor:
        """Build from an HF ``preprocessor_config.json`` dict; keyword arguments override its values."""
        kwargs: dict[str, Any] = {}
        size = config.get("size")
        if size is not None:
            if size.get("height") != size.get("width"):
                raise ValueError(f"size={size}; expected square tiles with height == width")
            kwargs["tile_size"] = size["height"]
        if config.get("do_resize") is False:
            raise ValueError("do_resize=False; Llama 4 always resizes images onto its tile canvas")
        names = {f.name for f in fields(cls)}
        kwargs.update({k: v for k, v in config.items() if k in names and k != "tile_size" and v is not None})
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(
                f"unknown image processor options {sorted(unknown)}; expected some of {sorted(names)}"
            )
        kwargs.update(overrides)
        return cls(**kwargs)
