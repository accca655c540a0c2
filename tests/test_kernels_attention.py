"""Flash attention and decode attention kernels vs their PyTorch references.

CPU: the Triton kernels run under ``TRITON_INTERPRET=1`` at tiny shapes. Triton decides interpretation when
a kernel is defined (at import), so the interpreted cases run in ONE subprocess with the variable set (it
never leaks into other test files); each test below checks its case's result. GPU tests (marked) use real
Scout shapes and fresh random inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest
import torch

# ------------------------------------------------------------------------------- interpreted cases (CPU)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(batch, n_heads, n_kv_heads, q_len, kv_len, head_dim, dtype=torch.float32):
    q = torch.randn(batch, n_heads, q_len, head_dim, dtype=dtype)
    k = torch.randn(batch, n_kv_heads, kv_len, head_dim, dtype=dtype)
    v = torch.randn(batch, n_kv_heads, kv_len, head_dim, dtype=dtype)
    return q, k, v


def _real_rows(batch, q_len, q_start, kv_start):  # (batch, 1, q_len, 1): not a left-padding query
    if kv_start is None:
        return torch.ones(batch, 1, q_len, 1, dtype=torch.bool)
    t = q_start + torch.arange(q_len)
    return (t[None, :] >= kv_start[:, None])[:, None, :, None]


def _check_attention(batch, n_heads, n_kv_heads, q_len, kv_len, head_dim, *, chunk_size=None, q_start=None,
                     pad=None, temperature=False, backward=False, dtype=torch.float32):  # fmt: skip
    from scout_mm.kernels import reference
    from scout_mm.kernels.flash_attention import attention_with_lse

    q_start = kv_len - q_len if q_start is None else q_start
    q, k, v = _inputs(batch, n_heads, n_kv_heads, q_len, kv_len, head_dim, dtype)
    kv_start = torch.tensor(pad, dtype=torch.int32) if pad is not None else None
    q_scale = 1 + torch.rand(batch, q_len) if temperature else None
    kw = dict(
        scale=head_dim**-0.5, chunk_size=chunk_size, q_start=q_start, kv_start=kv_start, q_scale=q_scale
    )
    real = _real_rows(batch, q_len, q_start, kv_start)
    for x in (q, k, v):
        x.requires_grad_(backward)
    out, lse = attention_with_lse(q, k, v, **kw)
    q64, k64, v64 = (x.detach().double().requires_grad_(backward) for x in (q, k, v))
    ref = reference.attention(q64, k64, v64, **kw)
    errors = {"out": _rel(out * real, ref * real), "finite": float(torch.isfinite(out).all())}
    # LSE of the visible scores, recomputed densely: log(sum(exp(s))) = log of the normaliser.
    scores = (
        torch.einsum(
            "bhqd,bhkd->bhqk",
            (q64 * q_scale[:, None, :, None] if temperature else q64),
            k64.repeat_interleave(n_heads // n_kv_heads, 1),
        )
        * kw["scale"]
    )
    t = q_start + torch.arange(q_len)
    keys = torch.arange(kv_len)
    kv0 = kv_start.long() if kv_start is not None else torch.zeros(batch, dtype=torch.long)
    pos_q = (t[None, :] - kv0[:, None]).clamp(min=0)
    start = kv0[:, None] + (pos_q // chunk_size * chunk_size if chunk_size else 0)
    visible = (keys[None, None, :] <= t[None, :, None]) & (keys[None, None, :] >= start[:, :, None])
    ref_lse = torch.logsumexp(scores.masked_fill(~visible[:, None], float("-inf")), -1)
    errors["lse"] = (lse.double() - ref_lse).abs().masked_fill(~real[..., 0], 0).max().item()
    if backward:
        grad = torch.randn_like(out) * real  # padding rows are garbage by contract: no gradient flows in
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
        errors.update({f"d{n}": _rel(g, w) for n, g, w in zip("qkv", got, want, strict=True)})
    return errors


def _check_decode(batch, n_heads, n_kv_heads, q_len, capacity, head_dim, *, paged_block=None, lens=None,
                  starts=None, temperature=False):  # fmt: skip
    from scout_mm.kernels.flash_decode import decode_attention
    from scout_mm.kernels.reference import decode_attention as decode_reference

    q = torch.randn(batch, n_heads, q_len, head_dim)
    kv_lens = torch.tensor(lens, dtype=torch.int32) if lens is not None else None
    kv_start = torch.tensor(starts, dtype=torch.int32) if starts is not None else None
    q_scale = 1 + torch.rand(batch, q_len) if temperature else None
    if paged_block:
        max_blocks = -(-capacity // paged_block)
        n_blocks = batch * max_blocks + 3
        k = torch.randn(n_blocks, paged_block, n_kv_heads, head_dim)
        v = torch.randn(n_blocks, paged_block, n_kv_heads, head_dim)
        table = torch.randperm(n_blocks)[: batch * max_blocks].view(batch, max_blocks).int()
    else:
        k = torch.randn(batch, n_kv_heads, capacity, head_dim)
        v = torch.randn(batch, n_kv_heads, capacity, head_dim)
        table = None
    kw = dict(scale=head_dim**-0.5, kv_lens=kv_lens, block_table=table, kv_start=kv_start, q_scale=q_scale)
    out, lse = decode_attention(q, k, v, n_splits=3, **kw)
    ref_out, ref_lse = decode_reference(q, k, v, **kw)
    return {"out": _rel(out, ref_out), "lse": (lse - ref_lse).abs().max().item()}


def _check_merge():
    from scout_mm.kernels.flash_decode import merge_states

    rows, n_keys, head_dim = 6, 40, 16
    scores = torch.randn(rows, n_keys) * 3
    scores[0, 10:] = float("-inf")  # row 0: the second part sees nothing
    values = torch.randn(n_keys, head_dim)
    want = torch.softmax(scores, -1) @ values
    outs, lses = [], []
    for part in (slice(0, 10), slice(10, 25), slice(25, 40)):
        s = scores[:, part]
        lse = torch.logsumexp(s, -1)
        outs.append(torch.nan_to_num(torch.softmax(s, -1)) @ values[part])
        lses.append(lse)
    out, lse = merge_states(torch.stack(outs), torch.stack(lses))
    return {"out": _rel(out, want), "lse": (lse - torch.logsumexp(scores, -1)).abs().max().item()}


def _check_dispatch():
    import scout_mm.kernels as kernels
    from scout_mm.kernels.flash_attention import attention as flash

    q, k, v = _inputs(1, 4, 2, 20, 20, 16)
    kw = dict(scale=0.25, chunk_size=8)
    # SCOUT_MM_KERNELS=triton in the worker: dispatch must hand the call to the kernel, bit for bit.
    return {"out": (kernels.attention(q, k, v, **kw) - flash(q, k, v, **kw)).abs().max().item()}


_CASES = {
    "causal_mha_odd_len": lambda: _check_attention(1, 2, 2, 37, 37, 16),
    "causal_gqa4_backward": lambda: _check_attention(2, 4, 1, 45, 45, 16, backward=True),
    "chunked_8_gqa5": lambda: _check_attention(1, 5, 1, 50, 50, 32, chunk_size=8),
    "chunked_13_gqa4_odd_chunk": lambda: _check_attention(1, 4, 1, 41, 41, 16, chunk_size=13),
    "chunked_32_gqa1": lambda: _check_attention(2, 2, 2, 70, 70, 16, chunk_size=32),
    "chunked_temperature_padding_backward": lambda: _check_attention(
        2, 4, 2, 45, 45, 16, chunk_size=12, pad=[0, 7], temperature=True, backward=True
    ),
    "causal_padding_temperature_backward": lambda: _check_attention(
        2, 5, 1, 33, 33, 16, pad=[5, 0], temperature=True, backward=True
    ),
    "cache_offset_chunked_padding": lambda: _check_attention(
        2, 5, 1, 23, 61, 32, chunk_size=16, pad=[3, 30], temperature=True
    ),
    "cache_offset_chunked_backward": lambda: _check_attention(
        1, 4, 2, 19, 50, 16, chunk_size=16, backward=True
    ),
    "head_dim_64_chunked": lambda: _check_attention(1, 2, 1, 33, 33, 64, chunk_size=16),
    "head_dim_128_causal": lambda: _check_attention(1, 2, 1, 21, 21, 128),
    "fp16_chunked_gqa4": lambda: _check_attention(1, 4, 1, 40, 40, 32, chunk_size=16, dtype=torch.float16),
    "decode_contiguous": lambda: _check_decode(3, 5, 1, 1, 100, 32, lens=[100, 37, 5], starts=[0, 4, 1]),
    "decode_contiguous_multi_query_temperature": lambda: _check_decode(
        2, 4, 2, 3, 70, 16, lens=[70, 9], temperature=True
    ),
    "decode_contiguous_full": lambda: _check_decode(1, 4, 1, 1, 64, 16),
    "decode_paged": lambda: _check_decode(3, 5, 1, 1, 100, 32, paged_block=8, lens=[100, 37, 5]),
    "decode_paged_odd_block_multi_query": lambda: _check_decode(
        2, 8, 2, 2, 90, 16, paged_block=24, lens=[90, 50], starts=[0, 3]
    ),
    "merge_states": _check_merge,
    "dispatch_routes_to_kernel": _check_dispatch,
}


def _worker(names):
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    results = {}
    for name in names:
        try:
            results[name] = _CASES[name]()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", SCOUT_MM_KERNELS="triton")
    proc = subprocess.run(
        [sys.executable, __file__, *_CASES], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS ") :])


def _assert_case(results, name, tol=1e-5, lse_tol=1e-4):
    errors = results[name]
    assert "error" not in errors, errors.get("error")
    for key, value in errors.items():
        limit = 1.0 if key == "finite" else (lse_tol if key == "lse" else tol)
        assert (value == 1.0) if key == "finite" else (value <= limit), f"{name}: {key} = {value} > {limit}"


@pytest.mark.parametrize("name", [n for n in _CASES if n.startswith(("causal", "chunked", "cache", "head"))])
def test_flash_attention_matches_reference(interpreted, name):
    _assert_case(interpreted, name)


def test_flash_attention_fp16(interpreted):
    _assert_case(interpreted, "fp16_chunked_gqa4", tol=5e-3, lse_tol=5e-3)


@pytest.mark.parametrize("name", [n for n in _CASES if n.startswith("decode")])
def test_decode_attention_matches_reference(interpreted, name):
    _assert_case(interpreted, name)


def test_merge_states_equals_softmax_over_all_keys(interpreted):
    _assert_case(interpreted, "merge_states")


def test_merge_states_torch_fallback():
    # Run here, not interpreted: CPU tensors take the PyTorch path of the same helper.
    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] != "1"
    _assert_case({"merge": _check_merge()}, "merge")


def test_dispatch_routes_to_kernel(interpreted):
    _assert_case(interpreted, "dispatch_routes_to_kernel", tol=0.0)


def test_dispatch_reference_on_cpu(monkeypatch):
    import scout_mm.kernels as kernels
    from scout_mm.kernels import reference

    monkeypatch.setenv("SCOUT_MM_KERNELS", "auto")
    q, k, v = _inputs(1, 4, 2, 20, 20, 16)
    got = kernels.attention(q, k, v, scale=0.25, chunk_size=8)
    assert torch.equal(got, reference.attention(q, k, v, scale=0.25, chunk_size=8))


def test_prefer_sdpa_only_where_its_semantics_fit():
    from scout_mm.kernels.flash_attention import _SDPA_BACKEND, prefer_sdpa

    q = torch.empty(1, 8, 64, 16, device="meta")
    k = torch.empty(1, 2, 64, 16, device="meta")
    assert prefer_sdpa(q, k, None, 0, None) == _SDPA_BACKEND[("causal", "fwd")]
    assert prefer_sdpa(q, k, 16, 0, None) == _SDPA_BACKEND[("chunked", "fwd")]
    # Left padding, a cache offset, or fewer queries than keys: SDPA has no such mask; the kernel runs.
    assert prefer_sdpa(q, k, 16, 0, torch.zeros(1, dtype=torch.int32)) is None
    assert prefer_sdpa(q[:, :, :32], k, None, 32, None) is None


# ------------------------------------------------------------------------------------------- GPU (real)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BF16_TOL = 1e-2


def _gpu_case(q_len, *, chunk_size=None, pad=None, temperature=False, backward=False, dtype=torch.bfloat16,
              head_dim=128, n_heads=40, n_kv_heads=8, batch=1, q_start=None, kv_len=None):  # fmt: skip
    from scout_mm.kernels import reference
    from scout_mm.kernels.flash_attention import attention

    kv_len = kv_len or q_len
    q_start = kv_len - q_len if q_start is None else q_start
    dev = "cuda"
    q = torch.randn(batch, n_heads, q_len, head_dim, device=dev, dtype=dtype, requires_grad=backward)
    k = torch.randn(batch, n_kv_heads, kv_len, head_dim, device=dev, dtype=dtype, requires_grad=backward)
    v = torch.randn(batch, n_kv_heads, kv_len, head_dim, device=dev, dtype=dtype, requires_grad=backward)
    kv_start = torch.tensor(pad, device=dev, dtype=torch.int32) if pad is not None else None
    q_scale = 1 + torch.rand(batch, q_len, device=dev) if temperature else None
    kw = dict(
        scale=head_dim**-0.5, chunk_size=chunk_size, q_start=q_start, kv_start=kv_start, q_scale=q_scale
    )
    out = attention(q, k, v, **kw)
    q32, k32, v32 = (x.detach().float().requires_grad_(backward) for x in (q, k, v))
    ref = reference.attention(q32, k32, v32, **kw)
    real = _real_rows(batch, q_len, q_start, kv_start.cpu() if pad is not None else None).to(dev)
    assert torch.isfinite(out).all()
    assert _rel(out * real, ref * real) < BF16_TOL
    if backward:
        grad = torch.randn_like(out) * real
        got = torch.autograd.grad(out, (q, k, v), grad)
        want = torch.autograd.grad(ref, (q32, k32, v32), grad.float())
        for name, g, w in zip("qkv", got, want, strict=True):
            assert _rel(g, w) < BF16_TOL, f"d{name}: {_rel(g, w)}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("chunk_size", [None, 1024])
def test_gpu_prefill_scout_heads(chunk_size):
    _gpu_case(4096 + 77, chunk_size=chunk_size)


@pytest.mark.gpu
@gpu
def test_gpu_padding_temperature_cache_offset():
    _gpu_case(1500, kv_len=3000, chunk_size=1024, pad=[0, 333], temperature=True, batch=2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("chunk_size", [None, 512])
def test_gpu_backward(chunk_size):
    _gpu_case(2048 + 33, chunk_size=chunk_size, backward=True, pad=[0, 100], temperature=True, batch=2)


@pytest.mark.gpu
@gpu
def test_gpu_fp16_head_dim_64():
    _gpu_case(3000, chunk_size=1000, dtype=torch.float16, head_dim=64, n_heads=8, n_kv_heads=8, backward=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("paged_block", [None, 64])
def test_gpu_decode(paged_block):
    from scout_mm.kernels.flash_decode import decode_attention
    from scout_mm.kernels.reference import decode_attention as decode_reference

    batch, n_heads, n_kv_heads, head_dim, capacity = 2, 40, 8, 128, 70000
    dev = "cuda"
    q = torch.randn(batch, n_heads, 1, head_dim, device=dev, dtype=torch.bfloat16)
    lens = torch.tensor([capacity, 12345], device=dev, dtype=torch.int32)
    if paged_block:
        max_blocks = capacity // paged_block + 1
        n_blocks = batch * max_blocks
        k = torch.randn(n_blocks, paged_block, n_kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = torch.randperm(n_blocks, device=dev).view(batch, max_blocks).int()
    else:
        k = torch.randn(batch, n_kv_heads, capacity, head_dim, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        table = None
    kw = dict(scale=head_dim**-0.5, kv_lens=lens, block_table=table)
    out, lse = decode_attention(q, k, v, **kw)
    ref_out, ref_lse = decode_reference(q, k, v, **kw)
    assert _rel(out, ref_out) < BF16_TOL
    assert (lse - ref_lse).abs().max().item() < 1e-2


# Forward launch variants (BLOCK_M, BLOCK_N, warps, stages, K/V through tensor descriptors, diagonal block in
# the bulk loop): the shipped head_dim-128 configs are among these; each must compute the same function on
# ragged, padded inputs with a cache offset.
_FWD_VARIANTS = [(128, 128, 8, 3, True, False), (128, 128, 8, 3, True, True), (128, 64, 8, 3, True, True),
                 (128, 64, 8, 3, False, False)]  # fmt: skip


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("config", _FWD_VARIANTS)
@pytest.mark.parametrize("chunk_size", [None, 1000])
def test_gpu_forward_launch_variants(config, chunk_size):
    from scout_mm.kernels import reference
    from scout_mm.kernels.flash_attention import _forward

    batch, n_heads, n_kv_heads, head_dim, q_len, kv_len = 2, 10, 2, 128, 2500, 3100
    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(batch, n_heads, q_len, head_dim, device=dev, dtype=dtype)
    # K/V as a cache slice: keys past the last query hold NaN, which no query may ever read.
    k = torch.full((batch, n_kv_heads, kv_len + 300, head_dim), float("nan"), device=dev, dtype=dtype)
    v = torch.full_like(k, float("nan"))
    k[:, :, :kv_len].normal_()
    v[:, :, :kv_len].normal_()
    kv_start = torch.tensor([0, 217], device=dev, dtype=torch.int32)
    q_scale = 1 + torch.rand(batch, q_len, device=dev)
    q_start = kv_len - q_len
    out, lse = _forward(q, k, v, head_dim**-0.5, chunk_size, q_start, kv_start, q_scale, config=config)
    ref = reference.attention(q.float(), k[:, :, :kv_len].float(), v[:, :, :kv_len].float(), scale=head_dim**-0.5,
                              chunk_size=chunk_size, q_start=q_start, kv_start=kv_start, q_scale=q_scale)  # fmt: skip
    real = _real_rows(batch, q_len, q_start, kv_start.cpu()).to(dev)
    assert torch.isfinite(out).all()
    assert _rel(out * real, ref * real) < BF16_TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("paged_block", [None, 64])
def test_gpu_decode_cuda_graph(paged_block):
    # Decode runs captured in a CUDA graph during generation: replays on new inputs must match eager calls.
    from scout_mm.kernels.flash_decode import decode_attention

    n_heads, n_kv_heads, head_dim, capacity = 40, 8, 128, 9000
    dev = "cuda"
    q = torch.randn(2, n_heads, 1, head_dim, device=dev, dtype=torch.bfloat16)
    lens = torch.tensor([capacity, 777], device=dev, dtype=torch.int32)
    if paged_block:
        n_blocks = 2 * (capacity // paged_block + 1)
        k = torch.randn(n_blocks, paged_block, n_kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
        table = torch.randperm(n_blocks, device=dev).view(2, -1).int()
    else:
        k = torch.randn(2, n_kv_heads, capacity, head_dim, device=dev, dtype=torch.bfloat16)
        table = None
    v = torch.randn_like(k)
    kw = dict(scale=head_dim**-0.5, kv_lens=lens, block_table=table)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        decode_attention(q, k, v, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = decode_attention(q, k, v, **kw)
    for _ in range(2):
        q.normal_()
        lens[1] = int(torch.randint(1, capacity, ()))
        graph.replay()
        out, lse = decode_attention(q, k, v, **kw)
        assert _rel(out_g, out) < 1e-6 and torch.equal(torch.isinf(lse_g), torch.isinf(lse))


if __name__ == "__main__":  # the interpreted worker: python tests/test_kernels_attention.py CASE...
    _worker(sys.argv[1:])
