"""Generation: chunked prefill, a decode step, sampling, stopping and streaming.

A batch of prompts (left- or right-padded, as HF takes them) is prefilled sequence by sequence in pieces
that never cross an attention chunk — so no long x long matrix exists and activation memory is bounded by
the piece — then decoded together, each sequence at its own position. :func:`decode_one_token` has fixed
shapes and, without its host-side reservation check (``check_reserved=False``, or inside a capture), no host
synchronisation, so it can be compiled / CUDA-graphed.
"""

from __future__ import annotations

import numbers
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from scout_mm.cache import KVCache, resolve_kv_dtype
from scout_mm.chat_format import IMAGE_PLACEHOLDER
from scout_mm.config import is_int
from scout_mm.vision.preprocess import flatten_images

DEFAULT_PREFILL_PIECE = 8192
GENERATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class SamplingParams:
    """HF-compatible sampling settings; :meth:`validate` names any value out of range.

    As in HF, ``top_k=0`` and ``top_p=1`` turn those filters off and ``top_p=0`` keeps the most likely token
    only. ``temperature=0`` means greedy decoding (whatever ``do_sample`` says)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        # None = the default, as in transformers' generation config
        self.temperature = 1.0 if self.temperature is None else self.temperature
        self.repetition_penalty = 1.0 if self.repetition_penalty is None else self.repetition_penalty

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def validate(self) -> None:
        # Types first: a string or a bool would otherwise fail later inside a comparison or torch, or (do_sample)
        # be taken for True.
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise TypeError(f"do_sample={self.do_sample!r}; expected True or False")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_))
            ):
                raise TypeError(f"{name}={value!r}; expected a number")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}; expected an int >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature}; expected >= 0 (0 = greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            raise ValueError(f"top_k={self.top_k!r}; expected an int >= 0 (0 or None = no top-k filter)")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}; expected 0 <= top_p <= 1")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p}; expected 0 <= min_p <= 1")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}; expected > 0")
        if not self.do_sample:
            # As HF: sampling settings do nothing in greedy decoding; say so rather than ignore them quietly.
            ignored = [
                f"{name}={value}"
                for name, value, off in (
                    ("temperature", self.temperature, (0, 1)),
                    ("top_k", self.top_k, (None, 0)),
                    ("top_p", self.top_p, (None, 1)),
                    ("min_p", self.min_p, (None, 0)),
                )
                if value not in off
            ]
            if ignored:
                warnings.warn(
                    f"{', '.join(ignored)} ignored: do_sample=False decodes greedily; pass do_sample=True to sample",
                    stacklevel=_caller_stacklevel(),
                )


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside scout_mm (the user's call of
    ``generate`` / ``generate_ids`` / ``model.generate``), whatever the depth of the calls inside the package;
    to be passed by the function that calls ``warnings.warn``. Decorator frames between (``torch.no_grad``'s,
    contextlib's) are skipped too."""
    import contextlib
    import sys

    import torch.utils._contextlib as torch_contextlib

    package = os.path.dirname(os.path.abspath(__file__))
    wrappers = {contextlib.__file__, torch_contextlib.__file__}
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(package) or frame.f_code.co_filename in wrappers
    ):
        frame, level = frame.f_back, level + 1
    return level


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (batch, prompt_len + new), HF layout: prompt as given, then new tokens / pad
    prompt_tokens: int = 0  # real (unpadded) prompt tokens over the batch
    new_tokens: int = 0  # generated tokens over the batch, up to and including each stop
    new_lengths: list[int] = field(default_factory=list)  # the same per sequence; pad_token_id after it
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finished: list[bool] = field(default_factory=list)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0


# ---------------------------------------------------------------------------------------------- steps
def prefill(model, cache: KVCache, seq: int, inputs_embeds: torch.Tensor, piece: int) -> torch.Tensor:
    """Run one sequence's prompt embeddings (1, length, hidden) through the model into row ``seq`` of the
    cache, in pieces of at most ``piece`` tokens cut at chunk boundaries. Returns the last logits (vocab,).

    It reserves only the prompt: before decoding, the caller reserves every position the sequence will hold,
    ``cache.reserve(seq, length + new_tokens)`` (:func:`decode_one_token` names a step past it)."""
    return prefill_pieces(
        model, cache, seq, inputs_embeds.shape[1], lambda a, b: inputs_embeds[:, a:b], piece
    )


def prefill_pieces(model, cache: KVCache, seq: int, length: int, embed, piece: int) -> torch.Tensor:
    """:func:`prefill` of a ``length``-token prompt whose embeddings ``embed(start, end)`` (1, end - start,
    hidden) gives piece by piece, as each piece is reached. Reserves only the prompt, as :func:`prefill`."""
    if not is_int(piece) or piece < 1:
        raise ValueError(f"piece={piece!r}; expected an int >= 1 (tokens per prefill piece)")
    if length < 1:
        raise ValueError(f"a prompt of {length} tokens; prefill needs at least one")
    chunk = cache.chunk_size or length
    cache.reserve(seq, length)
    start = 0
    logits = None
    while start < length:
        end = min(start + piece, (start // chunk + 1) * chunk, length)
        positions = torch.arange(start, end, device=cache.device)[None]
        cache.begin_prefill(seq, start)
        logits = model(
            inputs_embeds=embed(start, end), position_ids=positions, cache=cache, logits_to_keep=1
        ).logits
        start = end
    cache.end_prefill()
    return logits[0, -1]


class _PromptPieces:
    """The embeddings of one sequence's real tokens (under ``attention_mask``), piece by piece: token embeddings,
    with the image tokens' rows of ``image_embeds`` (all sequences' image tokens in order, as
    ``model.image_token_embeddings`` gives them) in place. Equal to slicing ``model.embed_inputs`` of the batch.
    Made for every sequence at once by :meth:`for_batch`."""

    def __init__(self, model, ids, image_embeds, first_row=None, is_image=None):
        self.model, self.ids, self.image_embeds = model, ids, image_embeds
        self.first_row, self.is_image = first_row, is_image

    @classmethod
    def for_batch(cls, model, input_ids, attention_mask, image_embeds) -> list[_PromptPieces]:
        if image_embeds is not None:
            is_image = input_ids == model.config.image_token_index
            # index into image_embeds of every token's image row (image tokens under padding count too, as in
            # embed_inputs): the image tokens before it in the batch, row by row
            flat = is_image.flatten().long()
            rows = (flat.cumsum(0) - flat).view(is_image.shape)
        pieces = []
        for b in range(input_ids.shape[0]):
            columns = attention_mask[b].nonzero()[:, 0]  # the real tokens, whichever side the padding is on
            ids = input_ids[b, columns][None]
            if image_embeds is None:
                pieces.append(cls(model, ids, None))
            else:
                pieces.append(cls(model, ids, image_embeds, rows[b, columns], is_image[b, columns]))
        return pieces

    def embed(self, start: int, end: int) -> torch.Tensor:
        ids = self.ids[:, start:end]
        if self.image_embeds is None:
            return self.model.embed_tokens(ids)
        first, count = int(self.first_row[start]), int(self.is_image[start:end].sum())
        return self.model.embed_tokens(ids, self.image_embeds[first : first + count])


def decode_one_token(
    model, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, *, check_reserved: bool = True
) -> torch.Tensor:
    """tokens, positions (batch, 1) -> next-token logits (batch, vocab).

    The caller reserves every position it decodes (``cache.reserve(seq, n_tokens)``; :func:`prefill` reserves only
    the prompt). A position past a sequence's reservation raises a ValueError naming it
    (:meth:`KVCache.check_reserved`). That check reads the positions on the host, a device->host sync on CUDA: it
    is skipped inside a CUDA-graph capture, and ``check_reserved=False`` skips it where the caller's reservation
    covers every step (as :func:`generate_ids`'s does), keeping the step free of host syncs. Unchecked, a step past
    the reservation gives that sequence wrong logits, but its write stays out of other sequences' keys (the
    scratch block within the block table's width, the sequence's own last table entry past it)."""
    if check_reserved and not (positions.is_cuda and torch.cuda.is_current_stream_capturing()):
        cache.check_reserved(positions)
    return model(input_ids=tokens, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]


class GraphedDecode:
    """:func:`decode_one_token` captured once as a CUDA graph and replayed each step: one launch instead of
    hundreds of small kernel launches from Python, which dominate batch-1 decode. The cache's storage is
    preallocated (``KVCache.reserve``), so every replay reads and writes the same addresses."""

    def __init__(self, model, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor):
        device = tokens.device
        self.tokens, self.positions = tokens.clone(), positions.clone()
        self.graph = torch.cuda.CUDAGraph()
        # Capture needs a warm-up on a side stream (Triton compiles, lazily made buffers and cuBLAS workspaces
        # exist before the graph's private pool takes over). It runs the real first step: it writes the same
        # keys/values at the same positions as the first replay will. One warm-up step: an eager Scout-size
        # step is ~80 ms, and the capture is paid by every generate call.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            decode_one_token(model, self.tokens, self.positions, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(self.graph):
            self.logits = decode_one_token(model, self.tokens, self.positions, cache)

    @classmethod
    def try_capture(
        cls, model, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor
    ) -> GraphedDecode | None:
        """The graphed step, or None (with a warning) when some op of the step cannot be captured — e.g. a
        reference path that synchronises with the host. Generation then runs the step eagerly."""
        try:
            return cls(model, cache, tokens, positions)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            torch.cuda.synchronize(tokens.device)
            warnings.warn(
                f"decode step not CUDA-graphed ({type(e).__name__}: {e}); running it eagerly", stacklevel=3
            )
            return None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.logits


class _DecodeState:
    """What a generate call leaves on the model for the next one (:func:`decode_state`): its KV cache and its
    captured decode graph, which replay only over the same cache storage and the same weights."""

    def __init__(self, key: tuple, cache: KVCache):
        self.key, self.cache = key, cache
        self.graph: GraphedDecode | None = None
        self.graph_storage: tuple = ()  # cache.storage_key() when the graph was captured
        self.busy = False  # a generation is using it (a second, interleaved one gets its own cache)

    def holds(self, need: list[int]) -> bool:
        """Its cache holds ``need[b]`` tokens of each sequence without growing (:meth:`KVCache.capacity`)."""
        capacity = [self.cache.capacity(b) for b in range(len(need))]
        return all(c is None or n <= c for n, c in zip(need, capacity, strict=True))


# The kernels a decode graph captured depend on these switches as well as on the weights.
_GRAPH_ENV = ("SCOUT_MM_KERNELS", "SCOUT_MM_FUSED", "SCOUT_MM_PDL")
_STATE_ATTR = "_scout_decode_state"


def _state_key(model, batch: int, device: torch.device, kv_dtype: torch.dtype) -> tuple:
    weights = tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))
    env = tuple(os.environ.get(k, "") for k in _GRAPH_ENV)
    return (batch, device, model.dtype, kv_dtype, hash(weights), env)


def decode_state(
    model, need: list[int], device: torch.device, keep: bool, kv_cache_dtype=None
) -> _DecodeState:
    """A KV cache (and perhaps a captured decode graph) for a generation of ``len(need)`` sequences of at most
    ``need[b]`` tokens each. ``keep``: reuse and keep the one left on the model by the previous call when batch,
    device, dtype, KV cache dtype, the weights (every parameter and buffer, by address) and the kernel switches are
    the same and its cache already holds ``need`` — a generate call then skips the capture (one eager step + the
    capture: ~0.1-0.2 s at Scout size). Otherwise a fresh one (the kept one is dropped first: a growing cache next
    to the old one and its graph can run a large model out of memory). ``kv_cache_dtype``: see :class:`KVCache`."""
    kv_dtype = resolve_kv_dtype(kv_cache_dtype, model.dtype)
    key = _state_key(model, len(need), device, kv_dtype)
    state = model.__dict__.get(_STATE_ATTR) if keep else None
    if state is not None and not state.busy:
        if state.key == key and state.holds(need):
            return state
        release_decode_state(model)
        state = None
    # Rings of the longest request's length, not a whole chunk (1-18 GiB at Scout size for a short request)
    cache = KVCache(
        model.config.text, len(need), device, model.dtype, kv_dtype=kv_dtype, max_tokens=max(need)
    )
    fresh = _DecodeState(key, cache)
    if keep and (state is None or not state.busy):
        release_decode_state(model)  # one kept state at most: its cache can be gigabytes
        model.__dict__[_STATE_ATTR] = fresh
    return fresh


def release_decode_state(model) -> None:
    """Drop the KV cache and decode graph a ``generate`` call kept on ``model`` for the next one."""
    if model.__dict__.pop(_STATE_ATTR, None) is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def process_logits(
    logits: torch.Tensor, history: torch.Tensor, params: SamplingParams
) -> torch.Tensor:  # (batch, vocab) fp32
    """HF's order: repetition penalty, then (when sampling) temperature, top-k, top-p, min-p."""
    scores = logits.float()
    if params.repetition_penalty != 1.0:
        seen = torch.gather(scores, 1, history)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        scores = scores.scatter(1, history, seen)
    if params.greedy:
        return scores
    # Shifted so that the top score is 0 before dividing: a tiny temperature then sends the others to -inf
    # instead of every score to +-inf (NaN after softmax). The sampling distribution, top-k, top-p and min-p
    # do not change under the shift.
    scores = (scores - scores.amax(-1, keepdim=True)) / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if params.min_p is not None and params.min_p > 0:
        probs = scores.softmax(-1)
        threshold = params.min_p * probs.max(-1, keepdim=True).values
        scores = scores.masked_fill(probs < threshold, float("-inf"))
    return scores


def sample(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    if params.greedy:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------------------------------- driver
def generate_steps(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    prefill_piece: int | None = None,
    truncate: bool = False,
    stats: GenerateOutput | None = None,
    cuda_graph: bool = True,
    keep_graph: bool = True,
    kv_cache_dtype: str | torch.dtype | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An iterator of ``(tokens (batch,), active (batch,) bool)``, both on the host, after each decoding step
    (the first comes from prefill). Sequences stop at an EOS token or a stop string; ``active`` is False from the
    step after. On CUDA the next step is already queued when a step's tokens are yielded. ``keep_graph``: reuse
    the KV cache and captured decode graph of the previous call when they fit (:func:`decode_state`).
    ``kv_cache_dtype="fp8"`` keeps the global layers' KV cache in e4m3 (:class:`scout_mm.cache.KVCache`).

    The arguments are checked here, before the first step: bad input raises at the call, not mid-stream."""
    params = params or SamplingParams()
    params.validate()
    config = model.config.text
    # The embedding takes int64 or int32 ids only; a bool or uint8 tensor is more likely a mask or pixels.
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"input_ids is {type(input_ids).__name__} {getattr(input_ids, 'dtype', '')}; expected an integer "
            "torch.Tensor (int64 or int32) of shape (batch, prompt_len)"
        )
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)}; expected (batch > 0, prompt_len > 0)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    if prefill_piece is not None and (not is_int(prefill_piece) or prefill_piece < 1):
        raise ValueError(f"prefill_piece={prefill_piece!r}; expected an int >= 1 or None")
    device = model.device
    if model.dtype not in GENERATION_DTYPES or device.type == "meta":
        raise ValueError(
            f"model is {model.dtype} on {device}; generation needs weights in one of "
            f"{[str(d).removeprefix('torch.') for d in GENERATION_DTYPES]} on a real device"
        )
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device).bool()
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)  # the vision tower casts to its own dtype
    lengths = attention_mask.sum(-1).tolist()
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty (no tokens under attention_mask)")
    longest = max(lengths)
    limit = config.max_position_embeddings
    if longest >= limit:
        raise ValueError(
            f"prompt of {longest} tokens leaves no room to generate: the model maximum is {limit} positions "
            "(max_position_embeddings); shorten the prompt"
        )
    if longest + params.max_new_tokens > limit:
        if not truncate:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds the model "
                f"maximum of {limit} positions (truncate=True, or --truncate in scripts/generate.py, generates at "
                f"most {limit - longest})"
            )
        params = SamplingParams(**{**params.__dict__, "max_new_tokens": limit - longest})
    eos = set(_token_ids(eos_token_id, config.eos_token_ids, "eos_token_id"))
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if not all(isinstance(s, str) and s for s in stop_strings):
        raise ValueError(f"stop_strings={stop_strings!r}; expected non-empty strings")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (pass tokenizer=processor)")
    if seed is not None and not is_int(seed):
        raise TypeError(f"seed={seed!r}; expected an int or None")
    if stats is not None and not isinstance(stats, GenerateOutput):
        raise TypeError(f"stats is {type(stats).__name__}; expected a GenerateOutput to fill, or None")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    need = [n + params.max_new_tokens for n in lengths]
    keep = keep_graph and cuda_graph and device.type == "cuda"
    kv_dtype = resolve_kv_dtype(kv_cache_dtype, model.dtype)  # raises here, before the first step
    return _run_steps(model, need, keep, kv_dtype, input_ids, pixel_values, attention_mask, params, lengths, eos,
                      stop_strings, tokenizer, generator, prefill_piece, stats, cuda_graph)  # fmt: skip


@torch.no_grad()
def _run_steps(model, need, keep, kv_dtype, *args):
    state = decode_state(model, need, model.device, keep=keep, kv_cache_dtype=kv_dtype)
    state.busy = True
    try:
        yield from _generate_steps(model, state, *args)
    finally:
        state.busy = False


def _generate_steps(model, state, input_ids, pixel_values, attention_mask, params, lengths, eos,
                    stop_strings, tokenizer, generator, prefill_piece, stats, cuda_graph):  # fmt: skip
    config, device, batch, cache = model.config.text, input_ids.device, input_ids.shape[0], state.cache
    piece = min(prefill_piece or DEFAULT_PREFILL_PIECE, config.attention_chunk_size or DEFAULT_PREFILL_PIECE)
    _sync(device)
    start = time.perf_counter()
    # Embedded piece by piece as prefill reaches them: a long prompt's embeddings never exist whole (2.7 GB for
    # 256K tokens of Scout). The images go through the vision tower once, here.
    _, image_embeds = model.image_token_embeddings(input_ids, pixel_values)
    first_logits = []
    for b, pieces in enumerate(_PromptPieces.for_batch(model, input_ids, attention_mask, image_embeds)):
        cache.reserve(b, lengths[b] + params.max_new_tokens)
        first_logits.append(prefill_pieces(model, cache, b, lengths[b], pieces.embed, piece))
    logits = torch.stack(first_logits)
    _sync(device)
    if stats is not None:
        stats.prompt_tokens = sum(lengths)
        stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()

    history = input_ids  # for the repetition penalty, as HF: the padded prompt + generated tokens
    positions = torch.tensor(lengths, device=device)[:, None]
    active = [True] * batch  # host-side: a row stops after its EOS token / stop string
    texts = [[] for _ in range(batch)] if stop_strings else None
    # Every position is reserved above (prompt + max_new_tokens): no reservation check, which syncs on CUDA
    step_fn = lambda tokens, positions: decode_one_token(  # noqa: E731
        model, tokens, positions, cache, check_reserved=False
    )
    last = params.max_new_tokens - 1

    def advance(tokens):  # queue the decode step that feeds ``tokens`` back: (history, logits, positions)
        return (
            torch.cat([history, tokens[:, None]], dim=1),
            step_fn(tokens[:, None], positions),
            positions + 1,
        )

    for step in range(params.max_new_tokens):
        tokens = sample(process_logits(logits, history, params), params, generator)
        pending = _HostCopy(tokens)
        # Run ahead: queue the next decode step before reading this step's tokens on the host, so the GPU
        # does not wait for Python (stop checks, streaming, detokenising) between steps. When every row
        # turns out to have stopped, that one queued step is wasted. Step 0 reads first (no graph capture
        # for a reply that ends at once).
        run_ahead = 0 < step < last
        if run_ahead:
            history, logits, positions = advance(tokens)
        tokens_host = pending.wait()
        was_active = torch.tensor(active)
        if stats is not None:
            stats.new_tokens += sum(active)
            stats.new_lengths = [n + a for n, a in zip(stats.new_lengths or [0] * batch, active, strict=True)]
        going = _still_active(active, tokens_host, eos, texts, stop_strings, tokenizer)
        yield tokens_host, was_active
        if step == last or not going:
            break
        if not run_ahead:
            if cuda_graph and device.type == "cuda":
                if state.graph is None or state.graph_storage != cache.storage_key():
                    state.graph = GraphedDecode.try_capture(model, cache, tokens[:, None], positions)
                    state.graph_storage = cache.storage_key()
                step_fn = state.graph or step_fn
            history, logits, positions = advance(tokens)
    _sync(device)
    if stats is not None:
        stats.decode_seconds = time.perf_counter() - start
        stats.finished = [not a for a in active]


class _HostCopy:
    """A device tensor's copy to pinned host memory, started now (ordered after the work that made it) and
    waited for later, so the host does not wait for work queued after it."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self.host, self.event = tensor, None
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def _still_active(
    active: list[bool], tokens: torch.Tensor, eos: set[int], texts, stop_strings, tokenizer
) -> bool:
    """Marks rows whose token (host tensor) is an EOS or completes a stop string; True while any row runs."""
    hits = _hit_stop_string(texts, tokens, stop_strings, tokenizer) if texts is not None else None
    for b, token in enumerate(tokens.tolist()):
        if token in eos or (hits is not None and hits[b]):
            active[b] = False
    return any(active)


@torch.no_grad()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    streamer=None,
    prefill_piece: int | None = None,
    truncate: bool = False,
    cuda_graph: bool = True,
    keep_graph: bool = True,
    kv_cache_dtype: str | torch.dtype | None = None,
) -> GenerateOutput:
    """HF-compatible generation; returns the sequences (prompt as given + new tokens, ``pad_token_id`` after
    a sequence stops) with token counts and prefill/decode timings. ``streamer`` gets HF's
    ``put(tokens)`` / ``end()`` calls. On CUDA the decode step runs as a captured CUDA graph unless
    ``cuda_graph=False``; with ``keep_graph`` (default) the graph and its KV cache stay on the model for the next
    call of the same batch size (:func:`decode_state`; :func:`release_decode_state` frees them).
    ``kv_cache_dtype="fp8"``: the global layers' KV cache in e4m3 with per-row scales, about half the memory and
    decode traffic of a long prompt (:class:`scout_mm.cache.KVCache`); None (default) keeps the model's dtype."""
    params = SamplingParams(max_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty)
    if pad_token_id is None:
        pad_token_id = model.config.text.pad_token_id if model.config.text.pad_token_id is not None else 0
    if not is_int(pad_token_id):  # checked now: it is first used after the last step
        raise TypeError(f"pad_token_id={pad_token_id!r}; expected a token id (int) or None")
    stats = GenerateOutput(sequences=input_ids)
    new = []
    steps = generate_steps(
        model, input_ids, pixel_values, attention_mask, params, eos_token_id, stop_strings, tokenizer, seed,
        prefill_piece, truncate, stats, cuda_graph, keep_graph, kv_cache_dtype,
    )  # fmt: skip
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for tokens, active in steps:
        tokens = torch.where(active, tokens, pad_token_id)
        new.append(tokens)
        if streamer is not None:
            streamer.put(tokens)
    if streamer is not None:
        streamer.end()
    device = model.device
    stats.sequences = torch.cat([input_ids.to(device), torch.stack(new, dim=1).to(device)], dim=1)
    return stats


class TextDelta:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 characters until their
    last byte arrives. The pieces join to exactly the decode of all the ids.

    Incremental, as vLLM and TGI detokenise: a token decodes only the ids from ``prefix`` on (those since the last
    piece plus the ones of that piece, whose text is subtracted again as context), so the cost per token does not
    grow with the answer; only a run of bytes that never completes a character is decoded again until it ends.
    This is exact for decoders that concatenate the tokens' bytes, as byte-level BPE (Llama 4's tokenizer and the
    built-in one) does: the offsets move only where the text so far ends in a whole character, and there a lossy
    UTF-8 decode of the whole equals the decodes of the two parts joined."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were decoded into the last piece: context for the next one
        self.read = 0  # ids before this are in pieces already

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decode(self.prefix)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character split across tokens: wait for the rest
        piece = text[len(self._decode(self.prefix, self.read)) :]
        self.prefix, self.read = self.read, len(self.ids)
        return piece

    def flush(self) -> str:
        """The held-back rest (an incomplete character at the end decodes as U+FFFD, as in the whole decode)."""
        piece = self._decode(self.prefix)[len(self._decode(self.prefix, self.read)) :]
        self.prefix = self.read = len(self.ids)
        return piece


def _hit_stop_string(texts, tokens, stop_strings, tokenizer) -> list[bool]:
    # A token of a byte-level BPE decodes to at least one byte, so a stop string of n UTF-8 bytes lies within the
    # last n tokens that complete it (+2 spare for tokenizers whose first token of a decode loses a prefix space).
    # Counting characters instead would miss stops made of 4-byte characters split into byte tokens. The window
    # grows only while it decodes to fewer bytes than the stop string (tokens that decode to nothing): the output
    # is not decoded whole every step.
    longest = max(len(s.encode("utf-8")) for s in stop_strings)
    hits = []
    for b, token in enumerate(tokens.tolist()):
        texts[b].append(token)
        window = longest + 2
        tail = tokenizer.decode(texts[b][-window:])
        while len(tail.encode("utf-8")) < longest and window < len(texts[b]):
            window *= 2
            tail = tokenizer.decode(texts[b][-window:])
        hits.append(any(s in tail for s in stop_strings))
    return hits


def _token_ids(value, default, name: str) -> list[int]:
    """None -> ``default``; an id, a list of ids or an integer tensor / array -> a list of ids."""
    if value is None:
        return list(default)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        value = value.reshape(-1).tolist()
    elif isinstance(value, torch.Tensor) and not value.is_floating_point():
        value = value.flatten().tolist()
    elif is_int(value):
        value = [value]
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or not all(is_int(v) for v in value)
    ):
        raise TypeError(f"{name}={value!r}; expected a token id, a list of token ids, or None")
    return [int(v) for v in value]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- text API
def generate(
    model,
    processor,
    prompt: str | Sequence[dict] | Sequence[str] | Sequence[Sequence[dict]],
    images=None,
    *,
    stream: bool = False,
    stats: GenerateOutput | None = None,
    **sampling,
):
    """Answer a prompt: returns the generated text, or (``stream=True``) an iterator of text pieces.

    ``prompt`` is the user's text (images go before it unless it holds ``<|image|>`` placeholders; with images it
    may be empty, to caption them), a list of chat messages (``{"role", "content"}``; image parts take ``images``
    in order or carry their own), or a batch: a list of user texts and/or of chat message lists (then returns a
    list of texts, and ``images`` holds one entry per prompt: an image, a list of images, or None; streaming needs
    a single prompt). ``images``: PIL images, paths, encoded image files as bytes, or uint8 arrays/tensors.
    ``sampling``: the keyword arguments of :func:`generate_ids` (``temperature=0`` is greedy; ``eos_token_id``
    defaults to the processor's stop tokens). ``stats``: a :class:`GenerateOutput` to fill with token counts and
    prefill/decode timings.
    """
    batched = _is_batch(prompt)
    if stats is not None and not isinstance(stats, GenerateOutput):
        raise TypeError(f"stats is {type(stats).__name__}; expected a GenerateOutput to fill, or None")
    if batched:
        if stream:
            raise ValueError("stream=True takes a single prompt, not a batch")
        images_per_prompt = images if images is not None else [None] * len(prompt)
        if not isinstance(images_per_prompt, (list, tuple)) or len(images_per_prompt) != len(prompt):
            given = len(images_per_prompt) if isinstance(images_per_prompt, (list, tuple)) else "no list of"
            raise ValueError(
                f"{len(prompt)} prompts but {given} image lists; expected one entry per prompt (an image, a list "
                "of images, or None)"
            )
        chats = [
            _as_messages(p, imgs, i)
            for i, (p, imgs) in enumerate(zip(prompt, images_per_prompt, strict=True))
        ]
        flat_images = [img for imgs in images_per_prompt for img in flatten_images(imgs)] or None
    else:
        chats = [_as_messages(prompt, images)]
        flat_images = flatten_images(images) or None
    # Without explicit images, the processor takes them from the messages' image parts.
    inputs = processor.apply_chat_template(
        chats, add_generation_prompt=True, tokenize=True, images=flat_images, padding_side="left"
    )
    sampling.setdefault("tokenizer", processor)
    # None (HF's "use the default") or a single id: the answer is cut at these, so they must be a list here.
    sampling["eos_token_id"] = _token_ids(
        sampling.get("eos_token_id"), processor.stop_token_ids, "eos_token_id"
    )
    kwargs = dict(
        input_ids=inputs["input_ids"],
        pixel_values=inputs.get("pixel_values"),
        attention_mask=inputs["attention_mask"],
    )
    if stream:
        names = [f.name for f in fields(SamplingParams)]
        params = SamplingParams(**{k: sampling.pop(k) for k in names if k in sampling})
        sampling.pop("pad_token_id", None)
        if sampling.pop("streamer", None) is not None:
            raise ValueError("stream=True and streamer= are two ways to stream; pass one")
        # generate_steps checks the input now, so bad input raises here rather than at the first piece.
        steps = generate_steps(model, **kwargs, params=params, stats=stats, **sampling)
        return _stream_text(steps, processor, set(sampling["eos_token_id"]))
    out = generate_ids(model, **kwargs, **sampling)
    if stats is not None:
        stats.__dict__.update(out.__dict__)
    prompt_len = inputs["input_ids"].shape[1]
    answers = []
    for row, n_new in zip(out.sequences[:, prompt_len:].tolist(), out.new_lengths, strict=True):
        # Only the tokens up to the row's stop: after it the row holds pad_token_id, which may be a plain token.
        answer = _until_stop(row[:n_new], sampling["eos_token_id"])
        answers.append(processor.decode(answer, skip_special_tokens=True))
    return answers if batched else answers[0]


def _stream_text(steps: Iterator, processor, stops: set[int]) -> Iterator[str]:
    delta = TextDelta(processor)
    for tokens, active in steps:
        # Not `break` at the stop: the steps end by themselves right after it, and run to the end to fill stats.
        token = int(tokens[0])
        if bool(active[0]) and token not in stops:
            piece = delta.push(token)
            if piece:
                yield piece
    rest = delta.flush()
    if rest:
        yield rest


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    stops = set(stops)
    for i, token in enumerate(ids):
        if token in stops:
            return ids[:i]
    return ids


def _is_batch(prompt) -> bool:
    """True for a batch (a list of texts and/or of message lists), False for one text or one message list; any
    other type raises, before anything is tokenized."""
    if isinstance(prompt, str):
        return False
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError(
                "prompt is an empty list; expected a text, a list of chat messages, or a batch of them"
            )
        if all(isinstance(item, Mapping) for item in prompt):
            return False
        if all(isinstance(item, str) or _is_messages(item) for item in prompt):
            return True
    text = repr(prompt)
    raise TypeError(
        f"prompt is {type(prompt).__name__} {text if len(text) <= 60 else text[:57] + '...'}; expected a string, "
        "a list of chat messages ({'role', 'content'} dicts), or a list of those (a batch)"
    )


def _is_messages(item) -> bool:
    return isinstance(item, (list, tuple)) and bool(item) and all(isinstance(m, Mapping) for m in item)


def _as_messages(prompt, images, index: int | None = None) -> list[dict]:
    if not isinstance(prompt, str):
        return list(prompt)  # chat messages, checked by the chat template
    placed = IMAGE_PLACEHOLDER in prompt  # the user put the images; else they go before the text
    image_parts = [] if placed else [{"type": "image"} for _ in flatten_images(images)]
    if not prompt.strip():
        if not image_parts:
            where = "empty prompt" if index is None else f"prompt {index} is empty"
            raise ValueError(f"{where}: pass a text, images, or both")
        # images only: the same as the chat form with image parts only
        return [{"role": "user", "content": image_parts}]
    return [{"role": "user", "content": [*image_parts, {"type": "text", "text": prompt}]}]
