"""FP8 (e4m3) KV cache of the global layers: the quantizer's definition, the cache's reads and writes, the model
and ``generate`` with ``kv_cache_dtype="fp8"`` on CPU; the Triton write and decode kernels under
``TRITON_INTERPRET=1`` (one subprocess, fp32 / fp16) against the references; and on CUDA (bf16, graphed decode).
Fresh random inputs, ragged lengths, paged and contiguous layouts."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from scout_mm import generation
from scout_mm.cache import KVCache
from scout_mm.kernels import fused_reference, reference
from scout_mm.kernels.flash_decode import _e4m3_words
from scout_mm.kernels.reference import FP8_KV_DTYPE, dequantize_kv, quantize_kv_fp8
from tests.helpers import INTERPRETED, interpreter_suite, require_interpreter, tiny_config

cpu_only = pytest.mark.skipif(
    INTERPRETED, reason="plain CPU test: not repeated in the interpreter subprocess"
)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rows(n: int, dim: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Rows over 24 orders of magnitude, plus the hard cases: an all-zero row, a single spike, values that round up
    into the next binade (carry), exact ties, and values in e4m3's subnormal range after scaling."""
    x = torch.randn(n, dim) * torch.logspace(-10, 12, n, base=2.0)[:, None]
    special = torch.zeros(5, dim)
    special[1, 3] = -3.0e-3  # a single spike: its row's scale is its own
    special[2] = (
        1.0  # max 1.0: scale 2^-8, so these land on e4m3 at 256 x: a carry into the next binade, ties to
    )
    # even (8.5 -> 8, 9.5 -> 10), subnormal codes (a tie at 2.5 * 2^-9 -> 2 * 2^-9), up into the normal range
    e4m3 = [127.4, -127.4, 8.5, 9.5, 0.0154, -0.0156, 1.0e-3, 2.5 * 2.0**-9, 448.0 / 256]
    special[2, : len(e4m3)] = torch.tensor(e4m3) / 256
    special[3, 0], special[3, 1:] = (
        448.0,
        torch.linspace(-0.02, 0.02, dim - 1),
    )  # subnormal codes after scaling
    special[4] = torch.linspace(-1.0, 1.0, dim) * 3.0e4
    return torch.cat([x, special]).to(dtype).to(device)


def _fp8_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == FP8_KV_DTYPE and bool((a.view(torch.uint8) == b.view(torch.uint8)).all())


# ---------------------------------------------------------------------------------------------------- the format


@cpu_only
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_quantizer_scale_is_the_least_power_of_two_that_fits(dtype):
    x = _rows(200, 64, dtype)
    values, scale = quantize_kv_fp8(x)
    assert values.dtype == FP8_KV_DTYPE and scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    mantissa, _ = torch.frexp(scale)
    assert bool((mantissa == 0.5).all())  # powers of two
    amax = x.float().abs().amax(-1).double()
    nonzero = amax > 0
    assert bool((amax <= 448 * scale.double()).all())
    assert bool((amax[nonzero] > 224 * scale.double()[nonzero]).all())  # half of it would not fit
    assert bool((values.float() == 0).all(-1)[~nonzero].all())


@cpu_only
def test_quantizer_rounds_to_nearest_even_and_dequantizes_exactly():
    x = _rows(300, 128)
    values, scale = quantize_kv_fp8(x)
    y = x / scale[:, None]  # exact: a power of two
    # Every e4m3 value, sorted: the nearest one (ties to the even code) is what each y must have become.
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_KV_DTYPE).float()
    finite = codes[torch.isfinite(codes)].unique()
    upper = torch.searchsorted(finite, y.contiguous()).clamp(1, len(finite) - 1)
    lo, hi = finite[upper - 1], finite[upper]
    nearest = torch.where((y - lo).abs() <= (hi - y).abs(), lo, hi)
    tie = (y - lo).abs() == (hi - y).abs()
    assert bool((values.float()[~tie] == nearest[~tie]).all())
    even = lambda v: (v.to(FP8_KV_DTYPE).view(torch.uint8) & 1) == 0  # noqa: E731
    assert bool(even(values.float()[tie]).all())
    # dequantised: exact in fp32 and bf16 (a power of two times a 4-bit significand)
    exact = values.float() * scale[:, None]
    assert torch.equal(dequantize_kv(values, scale, torch.float32), exact)
    assert torch.equal(dequantize_kv(values, scale, torch.bfloat16).float(), exact)
    # and within half a step of x: 1/16 relative for normal codes, 2^-10 * scale below them
    bound = torch.maximum(x.abs() / 16, scale[:, None] * 2.0**-10)
    assert bool(((exact - x).abs() <= bound).all())


@cpu_only
@pytest.mark.parametrize("ring", [False, True], ids=["paged", "ring"])
def test_reference_write_stores_quantized_rows_at_the_token_slots(ring):
    batch, heads, dim, slots = 3, 2, 32, 8
    k, v = torch.randn(batch, 1, heads, dim), torch.randn(batch, 1, heads, dim) * 100
    n_blocks = 7
    shape = (batch, slots, heads, dim) if ring else (n_blocks, slots, heads, dim)
    stores = [torch.zeros(shape, dtype=FP8_KV_DTYPE) for _ in range(2)]
    scales = [torch.full(shape[:-1], -1.0) for _ in range(2)]
    positions = torch.tensor([0, 13, 21])
    table = torch.tensor([[4, 0, 1], [2, 6, 3], [5, 1, 0]], dtype=torch.int32)
    where = dict(ring_size=slots) if ring else dict(block_table=table, block_size=slots)
    lens = fused_reference.write_kv_decode(k, v, *stores, positions, **where, k_scale_store=scales[0],
                                           v_scale_store=scales[1])  # fmt: skip
    assert lens.tolist() == ([1, 6, 6] if ring else [1, 14, 22])
    for new, store, scale in zip((k, v), stores, scales, strict=True):
        for b, p in enumerate(positions.tolist()):
            at = (b, p % slots) if ring else (int(table[b, p // slots]), p % slots)
            values, row_scale = quantize_kv_fp8(new[b, 0])
            assert _fp8_equal(store[at], values) and torch.equal(scale[at], row_scale)
        assert int((scale != -1).sum()) == batch * heads  # nothing else written


# ---------------------------------------------------------------------------------------------------- the cache


def _model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    from scout_mm import ScoutForConditionalGeneration

    return ScoutForConditionalGeneration(tiny_config(vision=False, **overrides)).eval()


@torch.no_grad()
def _run_cache(model, kv_cache_dtype, ids, n_decode: int, piece: int, block_size: int = 4, feed=None):
    """Prefill ``ids`` (1, L) in pieces, then decode ``n_decode`` tokens (greedy, or ``feed``'s); (cache, [logits per
    step])."""
    cache = KVCache(
        model.config.text, 1, ids.device, model.dtype, block_size=block_size, kv_dtype=kv_cache_dtype
    )
    embeds = model.get_input_embeddings()(ids)
    logits = [generation.prefill(model, cache, 0, embeds, piece)]
    cache.end_prefill()
    cache.reserve(0, ids.shape[1] + n_decode)
    for step in range(n_decode):
        token = (logits[-1].argmax(-1) if feed is None else feed[step]).view(1, 1)
        positions = torch.tensor([[ids.shape[1] + step]], device=ids.device)
        logits.append(generation.decode_one_token(model, token, positions, cache)[0])
    return cache, logits


@cpu_only
@pytest.mark.parametrize("chunk", [8, None], ids=["chunked", "all_global"])
def test_cache_stores_the_first_global_layer_exactly_quantized(chunk):
    # The layers before the first global one see the same input with either cache, so that layer's fp8 pool must
    # hold exactly the quantised rows of the full-precision pool: prefill pieces (ragged: 37 tokens in pieces of
    # 5 over blocks of 4) and decode writes alike. Later layers differ by the rounding, within fp8's precision.
    model = _model(attention_chunk_size=chunk)
    ids = torch.randint(3, 300, (1, 37))
    full, full_logits = _run_cache(model, None, ids, 6, piece=5)
    fp8, fp8_logits = _run_cache(model, "fp8", ids, 6, piece=5)
    assert fp8.fp8 and not full.fp8
    layer = fp8.global_layers[0]
    n_blocks = -(-43 // 4)
    table = fp8.block_table[0, :n_blocks].long()
    for j in range(2):
        ref_values, ref_scale = quantize_kv_fp8(full._pool[layer][j][table].flatten(0, 1)[:43])
        assert _fp8_equal(fp8._pool[layer][j][table].flatten(0, 1)[:43], ref_values)
        assert torch.equal(fp8._scales[layer][j][table].flatten(0, 1)[:43], ref_scale)
    for a, b in zip(full_logits, fp8_logits, strict=True):
        assert float((a - b).norm() / a.norm()) < 0.05


@cpu_only
def test_cache_memory_and_storage_key_count_the_scales():
    cfg = tiny_config(vision=False).text
    full = KVCache(cfg, 2, "cpu", torch.bfloat16, block_size=16)
    fp8 = KVCache(cfg, 2, "cpu", torch.bfloat16, block_size=16, kv_dtype="fp8")
    for cache in (full, fp8):
        cache.reserve(0, 100)
        cache.reserve(1, 40)
    assert fp8.memory_bytes()["ring"] == full.memory_bytes()["ring"]  # the rings keep the model's dtype
    head_dim = cfg.head_dim
    assert fp8.memory_bytes()["global"] * 2 * head_dim == full.memory_bytes()["global"] * (head_dim + 4)
    key = fp8.storage_key()
    fp8.reserve(0, 400)  # grows the pools and their scales
    assert fp8.storage_key() != key
    assert all(
        s.shape == p.shape[:-1] for i in fp8.global_layers for s, p in zip(fp8._scales[i], fp8._pool[i])
    )


@cpu_only
def test_generate_with_fp8_cache_and_bad_dtype_names_it():
    model = _model(1)
    ids = torch.randint(3, 300, (2, 19))
    ids[1, :4] = 0
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: ragged prompts
    out = generation.generate_ids(model, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[],
                                  kv_cache_dtype="fp8")  # fmt: skip
    assert out.sequences.shape == (2, 24)
    for bad in ("int8", torch.float16, "e5m2"):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            generation.generate_ids(model, ids, max_new_tokens=2, kv_cache_dtype=bad)


@cpu_only
def test_reference_decode_takes_scales_for_both_or_neither():
    q = torch.randn(1, 4, 1, 16)
    k = torch.randn(1, 2, 10, 16).to(FP8_KV_DTYPE)
    with pytest.raises(ValueError, match="both k_scale and v_scale"):
        reference.decode_attention(q, k, k, scale=0.25, k_scale=torch.ones(1, 2, 10))


# ---------------------------------------------------------------------------------------------------- kernels


test_interpreter_suite = interpreter_suite(__file__, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def kernels_interpreted():
    require_interpreter()
    from scout_mm.kernels import flash_decode, fused

    return fused, flash_decode


def _check_write_kernel(fused, dtype, ring: bool, device="cpu"):
    batch, heads, dim, slots = 3, 2, 64, 8
    rows = _rows(batch * heads * 2 - 5, dim, dtype, device)  # the 5 hard rows included
    k, v = rows[: batch * heads].view(batch, 1, heads, dim), rows[batch * heads :].view(batch, 1, heads, dim)
    shape = (batch, slots, heads, dim) if ring else (6, slots, heads, dim)
    positions = torch.tensor([5, 8, 47], device=device)
    table = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 3, 1, 0, 2, 4], [1, 0, 3, 2, 5, 4]], dtype=torch.int32)
    where = dict(ring_size=slots) if ring else dict(block_table=table.to(device), block_size=slots)
    results = []
    for impl in (fused, fused_reference):
        stores = [torch.zeros(shape, dtype=FP8_KV_DTYPE, device=device) for _ in range(2)]
        scales = [torch.zeros(shape[:-1], device=device) for _ in range(2)]
        lens = impl.write_kv_decode(k, v, *stores, positions, **where, k_scale_store=scales[0],
                                    v_scale_store=scales[1])  # fmt: skip
        results.append((lens, stores, scales))
    (lens, stores, scales), (ref_lens, ref_stores, ref_scales) = results
    assert torch.equal(lens, ref_lens)
    for a, b in zip(stores, ref_stores, strict=True):
        assert _fp8_equal(a, b)  # bit for bit, the hard rows included
    for a, b in zip(scales, ref_scales, strict=True):
        assert torch.equal(a, b)


def _fp8_problem(batch, n_heads, n_kv_heads, q_len, capacity, head_dim, paged_block, dtype, device="cpu"):
    q = torch.randn(batch, n_heads, q_len, head_dim, device=device).to(dtype)
    lens = torch.randint(q_len, capacity + 1, (batch,), dtype=torch.int32, device=device)
    if paged_block:
        max_blocks = -(-capacity // paged_block)
        n_blocks = batch * max_blocks + 2
        shape = (n_blocks, paged_block, n_kv_heads, head_dim)
        table = torch.randperm(n_blocks, device=device)[: batch * max_blocks].view(batch, max_blocks).int()
    else:
        shape = (batch, n_kv_heads, capacity, head_dim)
        table = None
    # keys and values of very different sizes per row: each row's own scale matters
    sizes = torch.rand(2, *shape[:-1], 1, device=device) * torch.tensor([50.0, 3.0], device=device).view(
        2, 1, 1, 1, 1
    )
    k, k_scale = quantize_kv_fp8(torch.randn(shape, device=device) * sizes[0])
    v, v_scale = quantize_kv_fp8(torch.randn(shape, device=device) * sizes[1])
    kw = dict(scale=head_dim**-0.5, kv_lens=lens, block_table=table)
    return q, (k, v, k_scale, v_scale), kw


def _check_decode_kernel(flash_decode, shape, paged_block, dtype, n_splits=None, device="cpu", tol=None):
    q, (k, v, k_scale, v_scale), kw = _fp8_problem(*shape, paged_block, dtype, device)
    out, lse = flash_decode.decode_attention(
        q, k, v, k_scale=k_scale, v_scale=v_scale, n_splits=n_splits, **kw
    )
    # the same kernel over the cache dequantised to q's dtype (reference.dequantize_kv): the same numbers go into
    # its dot products. Bit for bit in the interpreter; compiled, the two loops may schedule their MMAs differently
    # (registers vs shared memory), which changes fp32 rounding only.
    k_full, v_full = dequantize_kv(k, k_scale, dtype), dequantize_kv(v, v_scale, dtype)
    same_out, same_lse = flash_decode.decode_attention(q, k_full, v_full, n_splits=n_splits, **kw)
    if device == "cpu":
        assert torch.equal(out, same_out) and torch.equal(lse, same_lse)
    else:
        assert float((out.float() - same_out.float()).norm() / same_out.float().norm()) < 2e-3
        assert float((lse - same_lse).abs().max()) < 1e-4
    ref_out, ref_lse = reference.decode_attention(q.double(), k_full.double(), v_full.double(), **kw)
    also_ref, _ = reference.decode_attention(q, k, v, k_scale=k_scale, v_scale=v_scale, **kw)
    assert torch.equal(also_ref, reference.decode_attention(q, k_full, v_full, **kw)[0])
    tol = tol or (1e-5 if dtype == torch.float32 else 2e-3)
    assert float((out.double() - ref_out).norm() / ref_out.norm()) < tol
    assert float((lse.double() - ref_lse).abs().max()) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("ring", [False, True], ids=["paged", "ring"])
def test_write_kernel_matches_reference_bit_for_bit(kernels_interpreted, dtype, ring):
    _check_write_kernel(kernels_interpreted[0], dtype, ring)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("paged_block", [None, 8, 5], ids=["contiguous", "paged", "paged_odd_block"])
@pytest.mark.parametrize("shape", [(1, 4, 2, 1, 70, 16), (3, 6, 2, 2, 45, 32)], ids=["b1_q1", "b3_q2"])
@pytest.mark.parametrize("form", [1, 2, 3], ids=["dequantized_tiles", "folded_scales", "word_tiles"])
def test_decode_kernel_reads_fp8_as_dequantized(
    kernels_interpreted, monkeypatch, shape, paged_block, dtype, form
):
    monkeypatch.setattr(kernels_interpreted[1], "KV_FP8_FORM", form)
    _check_decode_kernel(kernels_interpreted[1], shape, paged_block, dtype, n_splits=3)


@triton.jit
def _convert_words(words_ptr, out_ptr, W: tl.constexpr, ROWS: tl.constexpr):
    r = tl.arange(0, ROWS)
    w = tl.arange(0, W)
    words = tl.load(words_ptr + r[:, None] * W + w[None, :])
    values = _e4m3_words(words, out_ptr.dtype.element_ty)
    d = tl.arange(0, 4 * W)
    tl.store(out_ptr + r[:, None] * 4 * W + d[None, :], values)


@pytest.mark.parametrize("paged_block", [None, 8], ids=["contiguous", "paged"])
def test_decode_kernel_word_form_falls_back_where_rows_are_not_whole_words(kernels_interpreted, paged_block):
    # A cache view one byte into its storage cannot be read as int32 words: form 3 reads it as form 2, same result.
    flash_decode = kernels_interpreted[1]
    q, (k, v, k_scale, v_scale), kw = _fp8_problem(2, 4, 2, 1, 40, 16, paged_block, torch.float32)
    shifted = []
    for t in (k, v):
        store = torch.empty(t.numel() + 1, dtype=torch.uint8)
        store[1:] = t.reshape(-1).view(torch.uint8)
        shifted.append(store[1:].view(FP8_KV_DTYPE).view(t.shape))
    words, _ = flash_decode.decode_attention(q, k, v, k_scale=k_scale, v_scale=v_scale, n_splits=2, **kw)
    odd, _ = flash_decode.decode_attention(q, *shifted, k_scale=k_scale, v_scale=v_scale, n_splits=2, **kw)
    assert shifted[0].storage_offset() == 1 and torch.equal(words, odd)


def _check_word_conversion(dtype, device):
    """Every e4m3 code (NaN excepted), in int32 words of four, through :func:`_e4m3_words` to ``dtype``: exactly
    PyTorch's e4m3 -> ``dtype`` conversion, and the codes land at element 4 w + j of their row."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # 254 codes, no NaN
    codes = codes[torch.randperm(codes.numel())]
    codes = torch.cat([codes, codes[:2]]).view(8, 32).to(device)  # 8 rows of 8 words
    out = torch.empty(8, 32, dtype=dtype, device=device)
    _convert_words[(1,)](codes.view(torch.int32), out, W=8, ROWS=8)
    expected = codes.view(FP8_KV_DTYPE).to(dtype)
    assert torch.equal(out.view(torch.int16) if dtype != torch.float32 else out.view(torch.int32),
                       expected.view(torch.int16) if dtype != torch.float32 else expected.view(torch.int32))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_e4m3_word_conversion_is_exact(kernels_interpreted, dtype):
    _check_word_conversion(dtype, "cpu")


def test_kernels_name_a_missing_or_wrong_scale(kernels_interpreted):
    fused, flash_decode = kernels_interpreted
    q, (k, v, k_scale, v_scale), kw = _fp8_problem(1, 4, 2, 1, 20, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        flash_decode.decode_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="k_scale"):
        flash_decode.decode_attention(q, k, v, k_scale=k_scale[:, :4], v_scale=v_scale, **kw)
    new = torch.randn(1, 1, 2, 16)
    where = dict(block_table=kw["block_table"], block_size=8)
    with pytest.raises(ValueError, match="needs k_scale_store"):
        fused.write_kv_decode(new, new, k, v, torch.tensor([3]), **where)
    with pytest.raises(ValueError, match="KV scales"):
        fused.write_kv_decode(new, new, k, v, torch.tensor([3]), **where, k_scale_store=k_scale.double(),
                              v_scale_store=v_scale)  # fmt: skip
    with pytest.raises(ValueError, match="needs k_scale_store"):  # the fused RoPE write takes no FP8 store
        fused.rope_write_kv_decode(torch.randn(1, 1, 4, 16), new, new, torch.ones(1, 1, 8), torch.zeros(1, 1, 8),
                                   None, k, v, torch.tensor([3]), **where)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("ring", [False, True], ids=["paged", "ring"])
def test_gpu_write_kernel_bit_for_bit(ring):
    from scout_mm.kernels import fused

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        _check_write_kernel(fused, dtype, ring, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("paged_block", [None, 256, 100], ids=["contiguous", "paged", "paged_odd_block"])
@pytest.mark.parametrize("form", [1, 2, 3], ids=["dequantized_tiles", "folded_scales", "word_tiles"])
def test_gpu_decode_kernel_reads_fp8_as_dequantized(monkeypatch, paged_block, form):
    from scout_mm.kernels import flash_decode

    monkeypatch.setattr(flash_decode, "KV_FP8_FORM", form)
    # Scout's attention shape (40 query heads over 8 kv heads, head_dim 128), ragged lengths up to 20K keys
    _check_decode_kernel(flash_decode, (2, 40, 8, 1, 20000, 128), paged_block, torch.bfloat16, device="cuda",
                         tol=1e-2)  # fmt: skip
    _check_decode_kernel(flash_decode, (3, 8, 2, 3, 777, 64), paged_block, torch.float16, device="cuda")


@pytest.mark.gpu
@gpu
def test_gpu_e4m3_word_conversion_is_exact():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # bf16: the inline PTX
        _check_word_conversion(dtype, "cuda")


@pytest.mark.gpu
@gpu
def test_gpu_model_decode_logits_agree_across_fp8_forms(monkeypatch):
    # The tiny model in bf16 over a 3000-token prompt (every layer global: the paged FP8 cache holds it all), the
    # same 6 tokens fed to the decode steps: forms 2 and 3 (scales folded; form 3 over int32 words) give form 1's
    # logits (tiles dequantised) step by step (identical on an H100; the bound allows fp32 reordering, far below the
    # ~1e-2 by which the FP8 cache's logits differ from the bf16 cache's).
    from scout_mm.kernels import flash_decode

    model = _model(attention_chunk_size=None).to("cuda", torch.bfloat16)
    ids = torch.randint(3, 300, (1, 3000), device="cuda")
    feed = torch.randint(3, 300, (6,), device="cuda")
    runs = {}
    for form in (1, 2, 3):
        monkeypatch.setattr(flash_decode, "KV_FP8_FORM", form)
        runs[form] = _run_cache(model, "fp8", ids, 6, piece=1024, block_size=256, feed=feed)[1]
    for form in (2, 3):
        diffs = [
            float((a.float() - b.float()).norm() / a.float().norm()) for a, b in zip(runs[1], runs[form])
        ]
        assert diffs[0] == 0.0 and max(diffs) < 1e-3, (form, diffs)  # prefill never reads the decode kernel


@pytest.mark.gpu
@gpu
def test_gpu_generate_fp8_cache_graphed_equals_eager():
    torch.manual_seed(0)
    from scout_mm import ScoutForConditionalGeneration

    model = ScoutForConditionalGeneration(tiny_config(vision=False)).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, 300, (2, 45), device="cuda")
    runs = [
        generation.generate_ids(
            model, ids, max_new_tokens=12, eos_token_id=[], kv_cache_dtype="fp8", cuda_graph=graph
        )  # fmt: skip
        for graph in (True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)


@cpu_only
def test_fp8_split_rule_widens_only_large_paged_caches(monkeypatch):
    # FP8 paged caches of at least FP8_WIDE_FROM keys get _PROGRAMS_PER_SM_FP8 programs per SM; smaller ones, bf16
    # caches and the contiguous layout keep the layout's rule (the device's SM count stands in for an H100's 132).
    from scout_mm.kernels import flash_decode

    device = torch.device("cpu")
    sms = flash_decode._sm_count(device)
    big, small = flash_decode.FP8_WIDE_FROM, flash_decode.FP8_WIDE_FROM // 2
    per_sm_fp8 = flash_decode._PROGRAMS_PER_SM_FP8["paged"]
    per_sm = flash_decode._PROGRAMS_PER_SM_BY_LAYOUT["paged"]
    assert flash_decode._n_splits(1, 8, big, "paged", device, fp8=True) == -(-per_sm_fp8 * sms // 8)
    assert flash_decode._n_splits(1, 8, small, "paged", device, fp8=True) == -(-per_sm * sms // 8)
    assert flash_decode._n_splits(1, 8, big, "paged", device) == -(-per_sm * sms // 8)
    # never more splits than the capacity has minimum-length runs
    assert flash_decode._n_splits(1, 1, 256, "paged", device, fp8=True) <= 256 // 64


@cpu_only
@pytest.mark.parametrize("kv_cache_dtype", [None, "fp8"], ids=["model_dtype", "fp8"])
def test_prefill_over_one_block_run_equals_scattered_blocks(kv_cache_dtype):
    # A sequence reserved at once owns consecutive pool blocks: prefill then writes and reads the global layers
    # through views of the pool. A sequence whose blocks interleave with another's goes through its block table.
    # Both must store the same rows and give the same logits, piece after piece (ragged pieces over blocks of 4).
    model = _model(attention_chunk_size=8)
    ids = torch.randint(3, 300, (1, 29))
    embeds = model.get_input_embeddings()(ids)
    run = KVCache(model.config.text, 2, "cpu", model.dtype, block_size=4, kv_dtype=kv_cache_dtype)
    run.reserve(1, 7)
    scattered = KVCache(model.config.text, 2, "cpu", model.dtype, block_size=4, kv_dtype=kv_cache_dtype)
    for seq, n in ((0, 8), (1, 8), (0, 16), (1, 12), (0, 29)):  # seq 0: blocks 0-1, 4-5, 8-...
        scattered.reserve(seq, n)
    run.reserve(0, 29)
    assert run._block_run(0, 8) == 2 and scattered._block_run(0, 8) is None
    with torch.no_grad():
        views = []
        original = KVCache._update_prefill

        def spy(self, layer, k, v):
            view = original(self, layer, k, v)
            if self is run and layer in self.global_layers:
                views.append((layer, view))
            return view

        KVCache._update_prefill = spy
        try:
            a = generation.prefill(model, run, 0, embeds, piece=5)
            b = generation.prefill(model, scattered, 0, embeds, piece=5)
        finally:
            KVCache._update_prefill = original
    assert torch.equal(a, b)
    table_run = run.block_table[0, :8].long()
    table_scattered = scattered.block_table[0, :8].long()
    for layer in run.global_layers:
        for j in range(2):
            assert torch.equal(run._pool[layer][j][table_run], scattered._pool[layer][j][table_scattered])
            if kv_cache_dtype:
                assert torch.equal(
                    run._scales[layer][j][table_run], scattered._scales[layer][j][table_scattered]
                )
    if kv_cache_dtype is None:  # the history is a view of the pool, not a copy
        assert len(views) == len(run.global_layers) * 7  # 29 tokens: pieces of 5 cut at the 8-token chunks
        for layer, view in views:
            assert view.k.untyped_storage().data_ptr() == run._pool[layer][0].untyped_storage().data_ptr()
            assert view.v.untyped_storage().data_ptr() == run._pool[layer][1].untyped_storage().data_ptr()


@cpu_only
def test_prefill_without_reserved_blocks_names_the_problem():
    cfg = tiny_config(vision=False, attention_chunk_size=8).text
    cache = KVCache(cfg, 1, "cpu", torch.float32, block_size=4)
    cache.reserve(0, 4)  # one block; the piece below needs two
    cache.begin_prefill(0, 0)
    k = torch.randn(1, 5, cfg.num_key_value_heads, cfg.head_dim)
    with pytest.raises(ValueError, match=r"sequence 0 has 1 KV blocks .* 2 needed: call reserve\(\)"):
        cache.update(cache.global_layers[0], k, k, None)


def test_fp8_rounding_bounds_stated_in_the_cache_docstring():
    """Relative error <= 1/16 for entries down to 2**-13 of their row's largest |value|; below, an absolute error
    under 1e-5 of the row's largest (scout_mm/cache.py)."""
    from scout_mm.kernels.reference import dequantize_kv, quantize_kv_fp8

    x = torch.randn(512, 8, 128) * torch.logspace(0, -7, 128)  # every row spans 7 decades
    codes, scales = quantize_kv_fp8(x)
    error = (dequantize_kv(codes, scales, torch.float32) - x).abs()
    largest = x.abs().amax(-1, keepdim=True)
    near = x.abs() >= largest * 2**-13
    assert float((error / x.abs())[near].max()) <= 1 / 16 + 1e-6
    assert float((error / largest)[~near].max()) < 1e-5
