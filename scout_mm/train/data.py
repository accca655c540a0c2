"""Training data: sources of tokenized examples, sequence packing with assistant-only labels, and a
deterministic, resumable stream of packed micro-batches.

A *source* maps an integer index to an :class:`Example` (token ids, labels, lazily loaded images); the
stream is infinite (file sources repeat in a fresh seeded permutation each epoch). Global micro-batch ``g``
holds the examples ``[g * docs_per_batch, (g + 1) * docs_per_batch)`` packed into rows of ``seq_len``
tokens, and rank ``r`` of ``world`` trains on the batches ``g = r, r + world, ...``. The whole data state is
therefore one number, the count of global micro-batches consumed, and it means the same thing for any number
of GPUs or DataLoader workers.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scout_mm.chat_format import IMAGE_PLACEHOLDER, render_chat
from scout_mm.processor import Processor
from scout_mm.train.synthetic import SyntheticTasks, render
from scout_mm.vision.preprocess import image_file_size, select_canvas, to_rgb_uint8

IGNORE_INDEX = -100


@dataclass
class ImageRef:
    """An image known by its size, loaded only when its batch is built (as a PIL image or a (3, H, W) uint8
    tensor: what the image processor takes)."""

    width: int
    height: int
    load: Callable[[], Image.Image | torch.Tensor]


@dataclass
class Example:
    """One document: ``labels[t] = ids[t]`` where the model should learn to produce token t, else -100."""

    ids: list[int]
    labels: list[int]
    images: list[ImageRef] = field(default_factory=list)
    task: str = ""  # synthetic task name, for per-task evaluation
    origin: str = ""  # "path:line" of a jsonl record, for messages


@dataclass
class PackedBatch:
    """Examples packed into rows; every tensor is (rows, seq_len) except ``pixel_values``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor  # restart at 0 at each document, as at inference
    token_mask: torch.Tensor  # True on document tokens, False on padding
    doc_ids: torch.Tensor  # index of the document in ``tasks``, -1 on padding
    pixel_values: torch.Tensor | None  # (tiles, 3, tile, tile) bfloat16, all images in row-major order
    tasks: list[str]
    index: int = -1  # global micro-batch index (-1 for evaluation batches)
    truncated: list[str] = field(default_factory=list)  # documents cut to seq_len: "origin (n tokens)"

    def to(self, device) -> PackedBatch:
        return self._apply(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> PackedBatch:
        """Called by the DataLoader (``pin_memory=True``) so that ``to(cuda)`` copies asynchronously."""
        return self._apply(lambda t: t.pin_memory())

    def _apply(self, fn) -> PackedBatch:
        tensors = (
            self.input_ids,
            self.labels,
            self.position_ids,
            self.token_mask,
            self.doc_ids,
            self.pixel_values,
        )
        return PackedBatch(
            *(fn(t) if t is not None else None for t in tensors), self.tasks, self.index, self.truncated
        )

    @property
    def n_label_tokens(self) -> int:
        """The targets the LM loss counts: ``labels[:, 1:]`` not ignored (position ``t`` predicts ``t + 1``). Read
        on the host batch: on a CUDA one it would sync."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------- tokenization
def image_grid(processor: Processor, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of the local tile grid an image of this size gets (the processor's own rule)."""
    ip = processor.image_processor
    if ip is None:
        raise ValueError("images given, but the processor has no image processor (text-only model)")
    canvas = select_canvas(height, width, ip.max_patches, ip.tile_size, ip.resize_to_max_canvas)
    return canvas[0] // ip.tile_size, canvas[1] // ip.tile_size


def encode_conversation(
    processor: Processor, messages: Sequence[dict], images: Sequence[ImageRef] = (), task: str = ""
) -> Example:
    """Token ids of a chat conversation (Llama 4 template), with labels on assistant turns only.

    Each message is tokenized on its own (special tokens separate them, so the ids equal those of the whole
    rendered conversation); an assistant turn's content and its closing ``<|eot|>`` are labelled, the header
    ``<|header_start|>assistant<|header_end|>\\n\\n`` is not. ``<|image|>`` placeholders expand into each
    image's token layout, images taken in order.
    """
    ids, labels = [processor.bos_token_id], [IGNORE_INDEX]
    grids = iter([image_grid(processor, im.width, im.height) for im in images])
    # The template renders the first message specially (a system prompt is trimmed): take each message's
    # text as the difference between consecutive renderings.
    previous = processor.apply_chat_template(messages[:1], add_generation_prompt=False)
    texts = [previous.removeprefix("<|begin_of_text|>")]
    for i in range(1, len(messages)):
        current = processor.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        texts.append(current[len(previous) :])
        previous = current
    assistant_header = "<|header_start|>assistant<|header_end|>\n\n"
    for message, text in zip(messages, texts):
        if message["role"] == "assistant" and text.startswith(assistant_header):
            head = processor.encode(assistant_header, add_special_tokens=False)
            body = processor.encode(text[len(assistant_header) :], add_special_tokens=False)
            whole = processor.encode(text, add_special_tokens=False)
            if head + body != whole:
                # Content starting with whitespace merges with the header's "\n\n": label from the merge on.
                head = whole[: len(head) - 1]
                body = whole[len(head) :]
            ids += head + body
            labels += [IGNORE_INDEX] * len(head) + body
        else:
            piece = processor.encode(text, add_special_tokens=False)
            ids += piece
            labels += [IGNORE_INDEX] * len(piece)
    return _expand_images(processor, ids, labels, grids, len(images), task, images)


def encode_text(processor: Processor, text: str) -> Example:
    """A plain document: ``<|begin_of_text|> text <|end_of_text|>``, every token after BOS labelled."""
    ids = (
        [processor.bos_token_id] + processor.encode(text, add_special_tokens=False) + [processor.eos_token_id]
    )
    return Example(ids, [IGNORE_INDEX] + ids[1:])


def _expand_images(processor, ids, labels, grids, n_images, task, images) -> Example:
    placeholder = processor.image_placeholder_id
    n_placeholders = ids.count(placeholder)
    if n_placeholders != n_images:
        raise ValueError(f"conversation has {n_placeholders} image placeholders but {n_images} images")
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        if token == placeholder:
            layout = processor.image_token_ids(next(grids))
            out_ids += layout
            out_labels += [IGNORE_INDEX] * len(layout)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return Example(out_ids, out_labels, list(images), task)


# ---------------------------------------------------------------------- sources
class SyntheticSource:
    """The built-in synthetic image-text tasks (:mod:`scout_mm.train.synthetic`) as examples."""

    def __init__(self, processor: Processor, split: str = "train", seed: int = 0, tasks=None):
        self.processor = processor
        self.tasks = SyntheticTasks(split, seed, **({"tasks": tasks} if tasks else {}))

    def __len__(self) -> int | None:
        return None

    def __getitem__(self, index: int) -> Example:
        sample = self.tasks[index]
        image = ImageRef(sample.scene.width, sample.scene.height, functools.partial(render, sample.scene))
        return encode_conversation(self.processor, sample.messages(), [image], task=sample.task)


def _image_paths(record: dict):
    """A conversation record's image paths: ``"images": [...]``, or one ``"image"``."""
    return record.get("images", [record["image"]] if "image" in record else [])


class JsonlSource:
    """A jsonl file of ``{"text": ...}`` documents or ``{"messages": [...], "images": [paths]}``
    conversations (``"image": path`` also works; relative paths are relative to the file's folder).

    The file is read and checked once, up front (JSON, keys, field types, image files exist), so that a bad
    record fails at start-up naming ``path:line`` rather than at the step that first draws it. As an infinite
    stream, epoch ``e`` visits its lines in a permutation seeded by ``(seed, e)``.
    """

    def __init__(self, processor: Processor, path: str | os.PathLike, seed: int = 0):
        self.processor, self.path, self.seed = processor, os.fspath(path), seed
        self.folder = os.path.dirname(os.path.abspath(self.path))
        self.records, self.lines = [], []  # the records and their 1-based line numbers
        # JSON Lines is UTF-8; "utf-8-sig" also reads the byte-order mark Windows tools put first.
        with open(self.path, encoding="utf-8-sig") as f:
            try:
                lines = f.readlines()
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{self.path}: not UTF-8 text (byte {e.start}: {e.reason}); expected a JSON Lines file"
                ) from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{self.path}:{number}: invalid JSON: {e}") from None
            self._check(record, f"{self.path}:{number}")
            self.records.append(record)
            self.lines.append(number)
        if not self.records:
            raise ValueError(f"{self.path}: no records")

    def _check(self, record, where: str) -> None:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a JSON {type(record).__name__}; expected an object")
        if "text" not in record and "messages" not in record:
            raise ValueError(f"{where}: keys {sorted(record)}; expected 'text' or 'messages'")
        if "messages" not in record:
            if not isinstance(record["text"], str):
                raise ValueError(f"{where}: 'text' is a {type(record['text']).__name__}; expected a string")
            return
        try:  # the chat template's own checks (roles, content parts), and where the images go
            n_placeholders = render_chat(record["messages"], False).count(IMAGE_PLACEHOLDER)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        paths = _image_paths(record)
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"{where}: images {paths!r}; expected a list of file paths")
        if len(paths) != n_placeholders:
            raise ValueError(f"{where}: {n_placeholders} image placeholders but {len(paths)} images")
        for image_path in paths:
            if not os.path.isfile(self._full_path(image_path)):
                raise ValueError(f"{where}: image {self._full_path(image_path)} does not exist")

    def __len__(self) -> int:
        return len(self.records)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one permutation per epoch, a few alive at a time
    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(f"jsonl:{self.seed}:{epoch}").shuffle(order)
        return order

    def __getitem__(self, index: int) -> Example:
        n = len(self.records)
        k = self._permutation(index // n)[index % n]
        record, origin = self.records[k], f"{self.path}:{self.lines[k]}"
        try:
            if "messages" not in record:
                example = encode_text(self.processor, record["text"])
            else:
                images = [self._image_ref(p) for p in _image_paths(record)]
                example = encode_conversation(self.processor, record["messages"], images)
        except (OSError, ValueError, TypeError, KeyError) as e:  # e.g. an unreadable image
            raise ValueError(f"{origin}: {e}") from e
        example.origin = origin
        return example

    def _full_path(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.folder, path)

    def _image_ref(self, path: str) -> ImageRef:
        full = self._full_path(path)
        width, height = image_file_size(full)  # the header only; upright, as inference reads the file

        def load(full=full):
            # As inference reads the file (to_rgb_uint8): upright by its EXIF orientation, transparency on white.
            image = to_rgb_uint8(full)
            if (image.shape[2], image.shape[1]) != (width, height):  # the tile layout was planned with these
                raise ValueError(
                    f"{full}: decoded as {image.shape[2]}x{image.shape[1]} pixels, but its header read "
                    f"{width}x{height} (an EXIF orientation stored after the pixel data?); re-save it upright"
                )
            return image

        return ImageRef(width, height, load)


class Mixture:
    """Several sources drawn at random with fixed weights; example ``i`` is a pure function of ``i``."""

    def __init__(self, sources: Sequence, weights: Sequence[float], seed: int = 0):
        if len(sources) != len(weights) or not sources or min(weights) <= 0:
            raise ValueError(
                f"{len(sources)} sources with weights {list(weights)}; expected one positive weight each"
            )
        total = sum(weights)
        self.sources, self.seed = list(sources), seed
        self.cumulative = [sum(weights[: k + 1]) / total for k in range(len(weights))]

    def __len__(self) -> None:
        return None

    def __getitem__(self, index: int) -> Example:
        if len(self.sources) == 1:
            return self.sources[0][index]
        u = random.Random(f"mixture:{self.seed}:{index}").random()
        k = next(k for k, c in enumerate(self.cumulative) if u < c)
        return self.sources[k][index]


# ---------------------------------------------------------------------- packing
ONE_DOC_PER_ROW = "doc"
ROW_MULTIPLE = 32  # one-document rows are padded to a multiple of this (few distinct shapes per run)


def plan_rows(lengths: Sequence[int], seq_len: int, align: int | str | None) -> list[list[tuple[int, int]]]:
    """Greedy packing: rows of ``(document, offset)`` in document order.

    With ``align`` (the attention chunk size) a document that would straddle a chunk boundary starts at the
    next boundary instead, so that chunked-attention layers see each short document alone in its chunk
    with the chunk boundaries it has at inference (where a prompt starts at index 0). Global (NoPE) layers
    still see the earlier documents of the row. ``align="doc"`` puts every document alone in its own row
    (no attention between documents in any layer, exactly as at inference; rows are right-padded). Documents
    longer than ``seq_len`` raise.
    """
    if align == ONE_DOC_PER_ROW:
        for length in lengths:
            _check_fits(length, seq_len)
        return [[(doc, 0)] for doc in range(len(lengths))]
    rows: list[list[tuple[int, int]]] = [[]]
    offset = 0
    for doc, length in enumerate(lengths):
        _check_fits(length, seq_len)
        for _ in range(2):
            start = offset
            if align and start % align and (start % align) + length > align:
                start += align - start % align
            if start + length <= seq_len:
                rows[-1].append((doc, start))
                offset = start + length
                break
            rows.append([])
            offset = 0
    return [row for row in rows if row]


def truncate(example: Example, seq_len: int, processor: Processor) -> Example:
    """The first ``seq_len`` tokens of ``example``. An image whose token layout the cut would split is dropped
    whole, with every token from its ``<|image_start|>`` on (its tiles must match its tokens)."""
    ids = example.ids[:seq_len]
    n_images = 0
    if example.images:
        starts = [i for i, token in enumerate(ids) if token == processor.boi_token_id]
        if starts and processor.eoi_token_id not in ids[starts[-1] :]:
            ids = ids[: starts[-1]]
        n_images = ids.count(processor.eoi_token_id)
    return Example(ids, example.labels[: len(ids)], example.images[:n_images], example.task, example.origin)


def _check_fits(length: int, seq_len: int) -> None:
    if length > seq_len:
        raise ValueError(f"document of {length} tokens does not fit seq_len={seq_len}; raise seq_len")


def pack(
    examples: Sequence[Example], seq_len: int, align: int | str | None, processor: Processor
) -> PackedBatch:
    """Pack examples into rows (see :func:`plan_rows`) and load their images into tiles.

    Rows are ``seq_len`` long; with ``align="doc"`` (one document per row) they are as long as the longest
    document rounded up to a multiple of :data:`ROW_MULTIPLE` (at most ``seq_len``).
    """
    pad_id = processor.pad_token_id
    lengths = [len(e.ids) for e in examples]
    rows = plan_rows(lengths, seq_len, align)
    width = seq_len
    if align == ONE_DOC_PER_ROW and lengths:
        width = min(seq_len, -(-max(lengths) // ROW_MULTIPLE) * ROW_MULTIPLE)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.full(shape, -1, dtype=torch.long)
    tiles = []
    for r, row in enumerate(rows):
        for doc, start in row:
            example = examples[doc]
            n = len(example.ids)
            input_ids[r, start : start + n] = torch.tensor(example.ids)
            labels[r, start : start + n] = torch.tensor(example.labels)
            position_ids[r, start : start + n] = torch.arange(n)
            doc_ids[r, start : start + n] = doc
            tiles += [_tiles(processor, image) for image in example.images]
    pixel_values = torch.cat(tiles) if tiles else None
    return PackedBatch(
        input_ids, labels, position_ids, doc_ids >= 0, doc_ids, pixel_values, [e.task for e in examples]
    )


def _tiles(processor: Processor, image: ImageRef) -> torch.Tensor:
    tiles, _ = processor.image_processor.preprocess(image.load())
    # The processor normalises in bfloat16, so the bfloat16 copy is exact and half the size.
    return tiles.to(torch.bfloat16)


# ---------------------------------------------------------------------- the stream
class PackedStream(IterableDataset):
    """Packed micro-batches ``start + rank, start + rank + world, ...`` of an infinite source, split over
    DataLoader workers so that the loader yields them in exactly that order. Micro-batch ``g`` holds the
    documents ``[doc_offset + g * docs_per_batch, doc_offset + (g + 1) * docs_per_batch)``."""

    def __init__(
        self,
        source,
        processor: Processor,
        docs_per_batch: int,
        seq_len: int,
        align: int | str | None,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        doc_offset: int = 0,
    ):
        self.source, self.processor = source, processor
        self.docs_per_batch, self.seq_len, self.align = docs_per_batch, seq_len, align
        self.start, self.rank, self.world = start, rank, world
        # Documents before micro-batch 0: resuming with another micro_batch_size can leave the position
        # between two micro-batch boundaries of the new size.
        self.doc_offset = doc_offset

    def batch(self, index: int) -> PackedBatch:
        first = self.doc_offset + index * self.docs_per_batch
        examples = [self.source[i] for i in range(first, first + self.docs_per_batch)]
        # A document longer than seq_len is truncated, as HF trainers do (tokenizer truncation=True, TRL's
        # max_length): one long record in a large file should cost its tail, not stop the run at the step
        # that draws it (and again at that step on every resume). The loop counts and reports them.
        truncated = [f"{e.origin or e.task or 'document'} ({len(e.ids)} tokens)" for e in examples
                     if len(e.ids) > self.seq_len]  # fmt: skip
        if truncated:
            examples = [truncate(e, self.seq_len, self.processor) for e in examples]
        batch = pack(examples, self.seq_len, self.align, self.processor)
        batch.index, batch.truncated = index, truncated
        return batch

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start + self.rank + self.world * worker
        while True:
            yield self.batch(index)
            index += self.world * n_workers


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(stream: PackedStream, num_workers: int) -> DataLoader:
    """An in-order DataLoader over a :class:`PackedStream` (batches are built in the workers)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


def eval_batches(
    source, processor: Processor, n_docs: int, docs_per_batch: int, seq_len: int, align: int | str | None
) -> list[PackedBatch]:
    """The first ``n_docs`` examples of an (evaluation) source, packed; built once, reused every eval."""
    examples = [source[i] for i in range(n_docs)]
    return [
        pack(examples[first : first + docs_per_batch], seq_len, align, processor)
        for first in range(0, n_docs, docs_per_batch)
    ]
