"""KV cache: reservations (a decode step past one is named, and a padded block-table entry never points at another
sequence's keys) and ring buffers sized for the request, grown by later reservations."""

from __future__ import annotations

import functools

import pytest
import torch

from scout_mm import generation
from scout_mm.cache import KVCache
from scout_mm.generation import decode_one_token, decode_state, generate_ids, prefill
from scout_mm.model import ScoutForConditionalGeneration
from tests.helpers import max_rel_err, tiny_config


def _model(**text):
    return ScoutForConditionalGeneration(tiny_config(vision=False, **text)).eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes, a copy: comparable with torch.equal for any dtype (e4m3 has no CPU equality)."""
    return t.contiguous().view(torch.uint8).clone()


def _storage(cache: KVCache) -> dict:
    """The bytes of every storage tensor of the cache."""
    stores = {("ring", i): p for i, p in cache._ring.items()}
    stores.update({("pool", i): p for i, p in cache._pool.items()})
    stores.update({("scales", i): p for i, p in cache._scales.items()})
    return {(*name, j): _bits(t) for name, pair in stores.items() for j, t in enumerate(pair)}


def _rows(cache: KVCache, seq: int, n_tokens: int) -> list[torch.Tensor]:
    """Sequence ``seq``'s keys and values of positions [0, n_tokens) in every global layer (scales too)."""
    table = cache.block_table[seq].long()
    stores = [*cache._pool.values(), *cache._scales.values()]
    return [_bits(t[table].flatten(0, 1)[:n_tokens]) for pair in stores for t in pair]


def _prefill_batch(model, cache, ids, lengths, reserve=None):
    """Prefill row b of ``ids`` (its first ``lengths[b]`` tokens) into sequence b, reserving ``reserve[b]`` tokens
    first when given (prefill itself reserves only the prompt)."""
    with torch.no_grad():
        for b, n in enumerate(lengths):
            if reserve is not None:
                cache.reserve(b, reserve[b])
            prefill(model, cache, b, model.embed_tokens(ids[b : b + 1, :n]), 8)


def _decode(model, cache, ids, lengths, step, **kw):
    """Decode step ``step``: sequence b feeds ids[b, lengths[b] + step] at that position."""
    positions = torch.tensor([[n + step] for n in lengths])
    tokens = torch.stack([ids[b, n + step] for b, n in enumerate(lengths)])[:, None]
    with torch.no_grad():
        return decode_one_token(model, tokens, positions, cache, **kw)


# ------------------------------------------------------------------------------------------- reservations
def test_decode_past_the_reservation_names_it_at_batch_1():
    model = _model()
    cache = KVCache(model.config.text, 1, "cpu", torch.float32, block_size=4)
    ids = torch.randint(3, 290, (1, 12))
    _prefill_batch(model, cache, ids, [3])  # reserves the prompt: one block, positions [0, 4)
    _decode(model, cache, ids, [3], 0)  # position 3: still in that block
    before = _storage(cache)
    with pytest.raises(
        ValueError,
        match=r"sequence 0: decode position 4 is past its reserved capacity of 4 tokens .*reserve\(0, n_tokens\)",
    ):
        _decode(model, cache, ids, [3], 1)
    after = _storage(cache)
    assert all(torch.equal(before[name], after[name]) for name in before)  # raised before any write


@pytest.mark.parametrize("kv_cache_dtype", [None, "fp8"], ids=["model_dtype", "fp8"])
def test_decode_past_the_reservation_never_touches_another_sequence(kv_cache_dtype):
    # The audit's case: sequence 0 reserved its 3-token prompt, sequence 1 14 tokens, so sequence 0's block-table
    # row is padded. Checked, its step past the reservation raises, naming it, before writing anything; unchecked
    # (as a CUDA graph's replay runs), its write goes to the scratch block, never into real keys.
    model = _model()
    cache = KVCache(model.config.text, 2, "cpu", torch.float32, block_size=4, kv_dtype=kv_cache_dtype)
    ids = torch.randint(3, 290, (2, 14))
    lengths = [3, 11]
    cache.reserve(1, 14)
    _prefill_batch(model, cache, ids, lengths)
    assert cache.capacity(0) == 4 and cache.capacity(1) == 16
    _decode(model, cache, ids, lengths, 0)  # positions 3 and 11
    before = _storage(cache)
    with pytest.raises(ValueError, match=r"sequence 0: decode position 4 is past its reserved capacity of 4"):
        _decode(model, cache, ids, lengths, 1)
    after = _storage(cache)
    assert all(torch.equal(before[name], after[name]) for name in before)

    kept = [_rows(cache, 0, 4), _rows(cache, 1, 12)]
    scratch = [_bits(t[cache._scratch]) for pair in cache._pool.values() for t in pair]
    _decode(model, cache, ids, lengths, 1, check_reserved=False)
    for seq, rows in enumerate(kept):
        for old, new in zip(rows, _rows(cache, seq, rows[0].shape[0]), strict=True):
            assert torch.equal(old, new), seq
    written = [_bits(t[cache._scratch]) for pair in cache._pool.values() for t in pair]
    assert all(not torch.equal(old, new) for old, new in zip(scratch, written, strict=True))


def test_decode_within_the_reservation_equals_the_full_forward():
    # The audit's case again, with sequence 0 reserved for its decode steps: every step equals one full forward.
    torch.manual_seed(0)
    model = _model()
    cache = KVCache(model.config.text, 2, "cpu", torch.float32, block_size=4)
    ids = torch.randint(3, 290, (2, 14))
    lengths = [3, 11]
    with torch.no_grad():
        full = model(ids).logits
    cache.reserve(1, lengths[1] + 3)
    _prefill_batch(model, cache, ids, lengths)
    cache.reserve(0, lengths[0] + 3)
    for step in range(3):
        logits = _decode(model, cache, ids, lengths, step)
        for b, n in enumerate(lengths):
            assert max_rel_err(logits[b], full[b, n + step]) < 1e-5, (step, b)


def test_ring_only_cache_bounds_decode_by_its_rings():
    cfg = tiny_config(vision=False, no_rope_layers=[1, 1, 1, 1]).text
    cache = KVCache(cfg, 2, "cpu", torch.float32, block_size=4, max_tokens=3)
    assert not cache.global_layers and cache.ring_rows == 4
    assert cache.capacity(0) == cache.capacity(1) == 4
    with pytest.raises(ValueError, match=r"sequence 1: decode position 4 is past its reserved capacity of 4"):
        cache.check_reserved(torch.tensor([[2], [4]]))
    key = cache.storage_key()
    cache.reserve(1, 100)  # grows the rings to a whole chunk: nothing bounds the positions then
    assert cache.ring_rows == 8 and cache.capacity(0) is None
    assert cache.storage_key() != key  # a graph captured over the old rings is captured again
    cache.check_reserved(torch.tensor([[50], [99]]))
    whole = KVCache(cfg, 2, "cpu", torch.float32)  # the default: whole-chunk rings, usable without reserve()
    assert whole.ring_rows == 8 and whole.capacity(0) is None


def test_prefill_past_the_ring_rows_names_reserve():
    cfg = tiny_config(vision=False, attention_chunk_size=16).text
    cache = KVCache(cfg, 1, "cpu", torch.float32, block_size=4, max_tokens=4)
    cache.reserve(0, 4)
    cache.begin_prefill(0, 0)
    k = torch.randn(1, 6, cfg.num_key_value_heads, cfg.head_dim)
    with pytest.raises(
        ValueError, match=r"sequence 0: prefill piece \[0, 6\) .* the rings hold 4: call reserve\(\)"
    ):
        cache.update(cache.ring_layers[0], k, k, None)


@pytest.mark.parametrize("bad", [-1, 2.5, "8"])
def test_bad_max_tokens_is_named(bad):
    with pytest.raises(ValueError, match="max_tokens="):
        KVCache(tiny_config(vision=False).text, 1, "cpu", torch.float32, max_tokens=bad)


# ------------------------------------------------------------------------------------------- ring sizes
def test_ring_memory_follows_the_request():
    cfg = tiny_config(vision=False, attention_chunk_size=64).text
    per_row = 2 * 2 * 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # 2 ring layers, k+v, batch 2, fp32
    for max_tokens, rows in ((5, 8), (20, 20), (64, 64), (200, 64)):  # whole blocks of 4, at most a chunk
        cache = KVCache(cfg, 2, "cpu", torch.float32, block_size=4, max_tokens=max_tokens)
        assert cache.ring_rows == rows and cache.memory_bytes()["ring"] == rows * per_row
    # generation sizes its rings for its longest request
    model = _model(attention_chunk_size=64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "KVCache", functools.partial(KVCache, block_size=4))
        state = decode_state(model, [10, 23], torch.device("cpu"), keep=False)
    assert state.cache.ring_rows == 24 and state.cache.memory_bytes()["ring"] == 24 * per_row


def test_growing_rings_keep_their_keys_and_move_the_storage():
    # Sequences reserved a little at a time: the rings grow (and the storage key changes, so a captured graph is
    # re-captured), up to a chunk and across chunk boundaries; every step's logits equal those of a cache with
    # whole-chunk rings reserved at once, and the full forward.
    torch.manual_seed(0)
    model = _model(attention_chunk_size=8)
    ids = torch.randint(3, 290, (2, 24))
    lengths, steps = [2, 5], 19  # sequence 1 ends at position 23: its third chunk
    with torch.no_grad():
        full = model(ids).logits
    whole = KVCache(model.config.text, 2, "cpu", torch.float32, block_size=1)
    _prefill_batch(model, whole, ids, lengths, reserve=[n + steps for n in lengths])
    grown = KVCache(model.config.text, 2, "cpu", torch.float32, block_size=1, max_tokens=0)
    assert grown.ring_rows == 0 and whole.ring_rows == 8
    _prefill_batch(model, grown, ids, lengths)
    assert grown.ring_rows == 5
    keys = {grown.storage_key()}
    for step in range(steps):
        if step in (
            0,
            2,
        ):  # sequence 1 to positions 5 and 6 (rings of 7 rows), then on from 7 (a whole chunk)
            for b, n in enumerate(lengths):
                grown.reserve(b, n + (2 if step == 0 else steps))
            keys.add(grown.storage_key())
            assert grown.ring_rows == (7 if step == 0 else 8)
        expected, logits = (_decode(model, cache, ids, lengths, step) for cache in (whole, grown))
        assert max_rel_err(logits, expected) < 1e-6, step
        for b, n in enumerate(lengths):
            assert max_rel_err(logits[b], full[b, n + step]) < 1e-5, (step, b)
    assert len(keys) == 3  # the two reservations that grew the rings moved the storage
    assert grown.memory_bytes() == whole.memory_bytes()


def test_decode_writes_give_the_kernels_the_ring_rows(monkeypatch):
    # The write kernels take ``ring_size`` as the ring's row count: the slot modulus and the row stride of its
    # storage. A short ring must pass its rows, not the chunk (the reference write indexes by shape, so only the
    # Triton kernels would go wrong: TRITON_INTERPRET=1 SCOUT_MM_KERNELS=triton SCOUT_MM_FUSED=on runs them here).
    from scout_mm import kernels

    seen = []
    for name in ("write_kv_decode", "rope_write_kv_decode"):
        original = getattr(kernels, name)

        def spy(*args, _original=original, **kw):
            if kw.get("ring_size") is not None:
                k_store = args[-3]  # both end (..., k_store, v_store, positions)
                seen.append((kw["ring_size"], k_store.shape[1]))
            return _original(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    model = _model(attention_chunk_size=32)
    cache = KVCache(model.config.text, 2, "cpu", torch.float32, block_size=4, max_tokens=10)
    ids = torch.randint(3, 290, (2, 10))
    _prefill_batch(model, cache, ids, [3, 5], reserve=[10, 10])
    _decode(model, cache, ids, [3, 5], 0)
    assert seen and all(pair == (12, 12) for pair in seen)


@pytest.mark.parametrize(
    "chunk, lengths, new",
    [(32, (5, 9), 6), (8, (5, 13), 10)],
    ids=["shorter_than_a_chunk", "crossing_chunks"],
)
def test_generation_with_request_sized_rings_equals_whole_chunk_rings(monkeypatch, chunk, lengths, new):
    model = _model(attention_chunk_size=chunk, num_experts_per_tok=2)
    width = max(lengths)
    ids = torch.randint(3, 290, (2, width))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, width - n :] = 1
    caches = []

    def small(*args, **kw):  # decode_state's request-sized rings
        caches.append(KVCache(*args, block_size=4, **kw))
        return caches[-1]

    def whole(*args, max_tokens=None, **kw):  # rings of a whole chunk, as before
        caches.append(KVCache(*args, block_size=4, **kw))
        return caches[-1]

    outputs = []
    for make in (small, whole):
        monkeypatch.setattr(generation, "KVCache", make)
        outputs.append(generate_ids(model, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[]))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    rows = min(chunk, -(-(width + new) // 4) * 4)
    assert (caches[0].ring_rows, caches[1].ring_rows) == (rows, chunk)
    if rows < chunk:
        assert caches[0].memory_bytes()["ring"] * chunk == caches[1].memory_bytes()["ring"] * rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_request_sized_rings_and_reservation_check(monkeypatch):
    # On CUDA (the Triton write kernels, flash decode, the decode graph): request-sized rings generate what
    # whole-chunk rings do, graphed and eager; a kept cache is reused by a request that fits it and replaced by a
    # longer one; a low-level step past the reservation raises with positions on the device, and a graph captures
    # over that check.
    from scout_mm.generation import _STATE_ATTR, GraphedDecode

    torch.manual_seed(0)
    model = _model(attention_chunk_size=32, num_experts_per_tok=2).cuda()
    ids = torch.randint(3, 290, (2, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a 5-token and a 9-token prompt
    run = functools.partial(generate_ids, model, ids, attention_mask=mask, eos_token_id=[])
    monkeypatch.setattr(
        generation, "KVCache", lambda *a, max_tokens=None, **kw: KVCache(*a, block_size=4, **kw)
    )
    whole = run(max_new_tokens=6, cuda_graph=False, keep_graph=False).sequences
    longer = run(max_new_tokens=30, cuda_graph=False, keep_graph=False).sequences
    monkeypatch.setattr(generation, "KVCache", functools.partial(KVCache, block_size=4))
    for graph in (True, False):
        assert torch.equal(run(max_new_tokens=6, cuda_graph=graph, keep_graph=False).sequences, whole)
    assert torch.equal(run(max_new_tokens=6).sequences, whole)
    state = model.__dict__[_STATE_ATTR]
    assert state.cache.ring_rows == 16 and state.graph is not None
    assert torch.equal(run(max_new_tokens=4).sequences, whole[:, :13])  # fits: the same cache and graph
    assert model.__dict__[_STATE_ATTR] is state
    assert torch.equal(
        run(max_new_tokens=30).sequences, longer
    )  # 39 tokens: a new cache of whole-chunk rings
    assert model.__dict__[_STATE_ATTR].cache.ring_rows == 32
    generation.release_decode_state(model)

    cache = KVCache(model.config.text, 1, "cuda", torch.float32, block_size=4, max_tokens=4)
    with torch.no_grad():
        prefill(model, cache, 0, model.embed_tokens(ids[:1, :3]), 8)
        tokens = ids[:1, 3:4]
        decode_one_token(model, tokens, torch.tensor([[3]], device="cuda"), cache)
        with pytest.raises(
            ValueError, match=r"sequence 0: decode position 4 is past its reserved capacity of 4"
        ):
            decode_one_token(model, tokens, torch.tensor([[4]], device="cuda"), cache)
        cache.reserve(0, 8)
        positions = torch.tensor([[4]], device="cuda")
        graphed = GraphedDecode(model, cache, tokens, positions)(tokens, positions).clone()
        eager = decode_one_token(model, tokens, positions, cache)
    assert max_rel_err(graphed, eager) < 1e-5


def test_prefill_names_a_bad_piece_size_or_an_empty_prompt():
    # was "cannot reshape tensor of 0 elements" / an endless loop's first error
    model = _model()
    cache = KVCache(model.config.text, 1, "cpu", torch.float32, block_size=4)
    embeds = model.embed_tokens(torch.randint(3, 290, (1, 5)))
    for piece in (0, -2, 2.5):
        with pytest.raises(ValueError, match=rf"piece={piece}; expected an int >= 1"):
            prefill(model, cache, 0, embeds, piece)
    with pytest.raises(ValueError, match="a prompt of 0 tokens"):
        prefill(model, cache, 0, embeds[:, :0], 4)
