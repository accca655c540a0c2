"""Gluon (Hopper) flash attention forward vs the PyTorch reference and the Triton kernel.

GPU tests run only on an sm_90 device (the kernel is Hopper-only); on CPU only the input checks run.
Outputs are compared with the fp32 reference on fresh random inputs; the LSE with the Triton forward's
(itself tested against a dense LSE in test_kernels_attention.py), and the Triton backward is run on the
Gluon forward's (out, lse) to show that it consumes them.
"""

from __future__ import annotations

import pytest
import torch

gluon_mod = pytest.importorskip("triton.experimental.gluon", reason="Triton without Gluon")

from scout_mm.kernels import flash_attention_gluon as fg  # noqa: E402

BF16_TOL = 1e-2
hopper = pytest.mark.skipif(not fg.available(), reason="needs an sm_90 (Hopper) GPU")


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_cpu_inputs_not_supported_and_rejected():
    q = torch.randn(1, 4, 8, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    assert not fg.supports(q, k, k)
    with pytest.raises(ValueError, match="needs Hopper"):
        fg.forward(q, k, k, scale=0.125)


@pytest.mark.gpu
@hopper
def test_unsupported_inputs_rejected():
    dev = "cuda"
    q = torch.randn(1, 4, 8, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 8, 64, device=dev, dtype=torch.bfloat16)
    assert fg.supports(q, k, k)
    assert not fg.supports(q.float(), k.float(), k.float())  # fp32
    assert not fg.supports(q[..., :32], k[..., :32], k[..., :32])  # head_dim 32
    assert not fg.supports(q[:, :3], k, k)  # 3 q heads over 2 kv heads
    with pytest.raises(ValueError, match="exceeds kv_len"):
        fg.forward(q, k[:, :, :4], k[:, :, :4], scale=0.125)


def _case(q_len, *, n_heads=40, n_kv_heads=8, head_dim=128, dtype=torch.bfloat16, chunk_size=None, batch=1,
          kv_len=None, pad=None, temperature=False, layout="bhsd", check_backward=False):  # fmt: skip
    from scout_mm.kernels import reference
    from scout_mm.kernels.flash_attention import _backward, attention_with_lse

    kv_len = kv_len or q_len
    q_start = kv_len - q_len
    dev = "cuda"

    def make(heads, seq):
        if layout == "bshd":  # (batch, seq, heads, dim) storage seen as (batch, heads, seq, dim): no copy
            return torch.randn(batch, seq, heads, head_dim, device=dev, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, seq, head_dim, device=dev, dtype=dtype)

    q, k, v = make(n_heads, q_len), make(n_kv_heads, kv_len), make(n_kv_heads, kv_len)
    kv_start = torch.tensor(pad, device=dev, dtype=torch.int32) if pad is not None else None
    q_scale = 1 + torch.rand(batch, q_len, device=dev) if temperature else None
    kw = dict(
        scale=head_dim**-0.5, chunk_size=chunk_size, q_start=q_start, kv_start=kv_start, q_scale=q_scale
    )
    out, lse = fg.forward(q, k, v, **kw)
    ref = reference.attention(q.float(), k.float(), v.float(), **kw)
    t = q_start + torch.arange(q_len, device=dev)
    kv0 = kv_start.long() if kv_start is not None else torch.zeros(batch, dtype=torch.long, device=dev)
    real = (t[None, :] >= kv0[:, None])[:, None, :, None]  # not a left-padding query row
    assert torch.isfinite(out).all()
    err = _rel(out * real, ref * real)
    assert err < BF16_TOL, f"out rel err {err}"
    tri_out, tri_lse = attention_with_lse(q, k, v, **kw)
    lse_real = real[..., 0].expand_as(lse)
    assert (lse[~lse_real] == float("-inf")).all()  # padding rows: -inf, as the Triton kernel writes
    lse_err = (lse - tri_lse)[lse_real].abs().max().item() if lse_real.any() else 0.0
    assert lse_err < 2e-2, f"lse max abs err {lse_err}"
    if check_backward:
        dout = torch.randn_like(out) * real
        prep = dict(scale=kw["scale"], chunk_size=chunk_size, q_start=q_start, kv_start=kv_start,
                    q_scale=q_scale.contiguous() if q_scale is not None else None)  # fmt: skip
        got = _backward(dout, q, k, v, out, lse, **prep)
        want = _backward(dout, q, k, v, tri_out, tri_lse, **prep)
        for name, g, w in zip("qkv", got, want, strict=True):
            assert _rel(g, w) < BF16_TOL, f"d{name}: {_rel(g, w)}"


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("q_len", [1, 7, 64, 129, 200, 4096 + 77])
def test_causal_scout_heads_odd_lengths(q_len):
    _case(q_len)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("chunk_size", [128, 333, 1000, 2048])
def test_chunked(chunk_size):
    _case(3000 + 5, chunk_size=chunk_size)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 8), (32, 8), (40, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gqa_groups_and_dtypes(n_heads, n_kv_heads, dtype):
    _case(1500, n_heads=n_heads, n_kv_heads=n_kv_heads, dtype=dtype, chunk_size=512)


@pytest.mark.gpu
@hopper
def test_temperature_padding_cache_offset_batch():
    _case(1500, kv_len=3000, chunk_size=1024, pad=[0, 333], temperature=True, batch=2)


@pytest.mark.gpu
@hopper
def test_head_dim_64_fp16_transposed_layout():
    _case(2000 + 3, head_dim=64, n_heads=8, n_kv_heads=2, dtype=torch.float16, chunk_size=700, layout="bshd")


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("config", [dict(pingpong=False), dict(stages=3)])
def test_launch_variants(config):
    q, k, v = (torch.randn(1, h, 2500, 128, device="cuda", dtype=torch.bfloat16) for h in (40, 8, 8))
    for chunk_size in (None, 1024):
        want, want_lse = fg.forward(q, k, v, scale=0.088, chunk_size=chunk_size)
        got, got_lse = fg.forward(q, k, v, scale=0.088, chunk_size=chunk_size, config=config)
        assert _rel(got, want) < 1e-3
        assert (got_lse - want_lse).abs().max().item() < 1e-3


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("chunk_size", [None, 1000])
def test_triton_backward_consumes_gluon_lse(chunk_size):
    _case(2048 + 33, chunk_size=chunk_size, pad=[0, 100], temperature=True, batch=2, check_backward=True)


# ------------------------------------------------------------------------------------------------ dispatch


def test_dispatch_conditions_cpu(monkeypatch):
    from scout_mm.kernels.flash_attention import _SDPA_BACKEND, prefer_sdpa, use_gluon_forward

    q = torch.randn(1, 4, 8, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    assert not use_gluon_forward(q, k, k)  # CPU tensors never take the Gluon kernel
    assert prefer_sdpa(q, k, None, 0, None) == _SDPA_BACKEND[("causal", "fwd")]
    monkeypatch.setenv("SCOUT_MM_GLUON", "sometimes")
    with pytest.raises(ValueError, match="SCOUT_MM_GLUON"):
        use_gluon_forward(q, k, k)


@pytest.mark.gpu
@hopper
def test_dispatch_runs_gluon_forward(monkeypatch):
    from scout_mm import kernels
    from scout_mm.kernels import reference
    from scout_mm.kernels.flash_attention import (
        _SDPA_BACKEND_GLUON,
        attention,
        prefer_sdpa,
        use_gluon_forward,
    )

    monkeypatch.setenv("SCOUT_MM_KERNELS", "auto")
    dev = "cuda"
    q = torch.randn(2, 40, 1000, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 8, 1000, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    assert use_gluon_forward(q, k, v)
    assert prefer_sdpa(q, k, None, 0, None) == _SDPA_BACKEND_GLUON[("causal", "fwd")]
    assert prefer_sdpa(q, k, 256, 0, None) == _SDPA_BACKEND_GLUON[("chunked", "fwd")]
    monkeypatch.setenv("SCOUT_MM_GLUON", "off")
    assert not use_gluon_forward(q, k, v)
    monkeypatch.setenv("SCOUT_MM_GLUON", "auto")
    # Left padding: no SDPA path, so dispatch runs the kernel, which must be the Gluon forward, bit for bit.
    kw = dict(scale=128**-0.5, chunk_size=256, kv_start=torch.tensor([0, 77], device=dev, dtype=torch.int32))
    with torch.no_grad():
        got = kernels.attention(q, k, v, **kw)
    want, _ = fg.forward(q, k, v, **kw)
    assert torch.equal(got, want)
    # Training: Gluon forward + Triton backward through autograd, gradients vs the fp32 reference's.
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out = attention(q, k, v, **kw)
    ref32 = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    ref = reference.attention(*ref32, **kw)
    real = (torch.arange(1000, device=dev)[None, :] >= kw["kv_start"][:, None])[:, None, :, None]
    assert _rel(out * real, ref * real) < BF16_TOL
    grad = torch.randn_like(out) * real
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, ref32, grad.float())
    for name, g, w in zip("qkv", got, want, strict=True):
        assert _rel(g, w) < BF16_TOL, f"d{name}: {_rel(g, w)}"


# ------------------------------------------------------------------------------------------------ backward


def _grad_case(q_len, *, n_heads=40, n_kv_heads=8, head_dim=128, dtype=torch.bfloat16, chunk_size=None,
               batch=1, kv_len=None, pad=None, temperature=False, layout="bhsd", config=None):  # fmt: skip
    """Gluon backward's (dq, dk, dv) vs autograd of the fp32 PyTorch reference on fresh random inputs."""
    from scout_mm.kernels import flash_attention_gluon_bwd as gb
    from scout_mm.kernels import reference

    kv_len = kv_len or q_len
    q_start = kv_len - q_len
    dev = "cuda"

    def make(heads, seq):
        if layout == "bshd":
            return torch.randn(batch, seq, heads, head_dim, device=dev, dtype=dtype).transpose(1, 2)
        return torch.randn(batch, heads, seq, head_dim, device=dev, dtype=dtype)

    q, k, v = make(n_heads, q_len), make(n_kv_heads, kv_len), make(n_kv_heads, kv_len)
    kv_start = torch.tensor(pad, device=dev, dtype=torch.int32) if pad is not None else None
    q_scale = 1 + torch.rand(batch, q_len, device=dev) if temperature else None
    kw = dict(
        scale=head_dim**-0.5, chunk_size=chunk_size, q_start=q_start, kv_start=kv_start, q_scale=q_scale
    )
    out, lse = fg.forward(q, k, v, **kw)
    t = q_start + torch.arange(q_len, device=dev)
    kv0 = kv_start.long() if kv_start is not None else torch.zeros(batch, dtype=torch.long, device=dev)
    real = (t[None, :] >= kv0[:, None])[:, None, :, None]  # not a left-padding query row
    dout = torch.randn_like(out) * real
    got = gb.backward(dout, q, k, v, out, lse, config=config, **kw)
    ref32 = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    ref = reference.attention(*ref32, **kw)
    want = torch.autograd.grad(ref, ref32, dout.float())
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.shape == w.shape and g.dtype == dtype
        assert torch.isfinite(g).all(), f"d{name} not finite"
        err = _rel(g.float(), w)
        assert err < BF16_TOL, f"d{name} rel err {err}"


@pytest.mark.gpu
@hopper
# (q_len 1 has an exactly zero dq under a causal mask: one visible key, dS = 0; relative error is meaningless.)
@pytest.mark.parametrize("q_len", [2, 63, 128, 200, 1000 + 7, 4096 + 77])
def test_backward_causal_odd_lengths(q_len):
    _grad_case(q_len)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("chunk_size", [64, 128, 333, 1000, 2048])
def test_backward_chunked(chunk_size):
    _grad_case(3000 + 5, chunk_size=chunk_size)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, 8), (32, 8), (40, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_gqa_groups_and_dtypes(n_heads, n_kv_heads, dtype):
    _grad_case(1500, n_heads=n_heads, n_kv_heads=n_kv_heads, dtype=dtype, chunk_size=512)


@pytest.mark.gpu
@hopper
def test_backward_temperature_padding_cache_offset_batch():
    _grad_case(1500, kv_len=3000, chunk_size=1024, pad=[0, 333], temperature=True, batch=2)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("chunk_size", [None, 700])
def test_backward_head_dim_64_fp16_transposed_layout(chunk_size):
    _grad_case(2000 + 3, head_dim=64, n_heads=8, n_kv_heads=2, dtype=torch.float16, chunk_size=chunk_size,
               layout="bshd", temperature=True)  # fmt: skip


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize(
    "config",
    [
        dict(dq="gluon"),
        dict(dq="gluon", dq_block_n=64),
        dict(dkdv_overlap=True),
        dict(dkdv_stages=3),
        dict(dkdv="triton"),
    ],
)
def test_backward_launch_variants(config):
    _grad_case(2500, chunk_size=1024, config=config, temperature=True, pad=[0, 100], batch=2)
