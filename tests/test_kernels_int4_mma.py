"""Tensor-core W4A16 kernel for few rows (``scout_mm.kernels.int4_mma``) vs the references.

The kernel is Gluon (explicit register layouts), which the Triton interpreter cannot run: on CPU the register
chain it relies on (words -> operand fragments, activations gathered in the same K order) is checked through
:func:`emulate_operands`, which applies the kernel's own reshape / permute constants to random words. The GPU
tests (marked ``gpu``) run the compiled kernel against the dequantize-then-matmul reference on fresh random
inputs: symmetric + asymmetric, groups 32/64/128, M 1..16, ragged N and K, bf16 + fp16, every config knob.
"""

from __future__ import annotations

import pytest
import torch

from scout_mm.kernels import int4_reference as reference
from scout_mm.quant.format import pack_int4

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")
int4_mma = pytest.importorskip("scout_mm.kernels.int4_mma")


def _weight(size_k, size_n, group, symmetric, device="cpu", scale_dtype=torch.bfloat16):
    codes = torch.randint(0, 16, (size_k, size_n), device=device)
    scales = (torch.rand(size_k // group, size_n, device=device) * 0.1 + 0.01) / size_k**0.5
    zeros = None if symmetric else torch.randint(0, 16, scales.shape, device=device).to(scale_dtype)
    return pack_int4(codes), scales.to(scale_dtype), zeros


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("warps,blocks,block_m", [(1, 1, 8), (2, 4, 8), (4, 2, 16), (8, 4, 16)])
def test_register_chain_is_a_k_permutation(warps, blocks, block_m):
    """The kernel's operand order (ROWS_PERM / COLS_PERM / X_PERM) computes the same product as the plain
    layout: operand rows are a permutation of the tile's columns, operand columns of K."""
    size_k, block_n = 32 * blocks, 32 * warps
    words = torch.randint(-(2**31), 2**31 - 1, (size_k // 8, block_n), dtype=torch.int32)
    x = torch.randn(block_m, size_k, dtype=torch.float64)
    codes, xt, col = int4_mma.emulate_operands(words, x, warps)
    assert sorted(col.tolist()) == list(range(block_n))
    expected = reference.unpack_int4(words).double()[:, col].T @ x.T
    torch.testing.assert_close(codes.double() @ xt, expected, rtol=1e-12, atol=1e-9)


def test_split_rules(monkeypatch):
    # The most K splits under the per-SM ceiling, at least min_splits (capped by the steps K has); the splits
    # are whole steps and cover K. Scout at 16 rows, 2 warps: 16384x5120 has 256 column tiles (2 splits under
    # ~4 per SM, 4 with min_splits 4), 5120x8192 has 80 (6 splits either way).
    monkeypatch.setattr(int4_mma, "_n_sms", lambda device: 132)
    assert int4_mma._split(40, 256, 4.0, 1, None)[0] == 2
    assert int4_mma._split(40, 256, 4.0, 1, None, min_splits=4)[0] == 4
    assert int4_mma._split(64, 80, 4.0, 1, None, min_splits=4)[0] == 6
    assert int4_mma._split(3, 256, 4.0, 1, None, min_splits=4)[0] == 3  # no more splits than steps
    for n_groups, tiles, occ, step, least in ((40, 256, 4.0, 2, 4), (64, 80, 8.0, 1, 1), (7, 9, 2.0, 2, 3)):
        split, per = int4_mma._split(n_groups, tiles, occ, step, None, min_splits=least)
        assert per % step == 0 and (split - 1) * per < n_groups <= split * per
    assert int4_mma.config_for_rows(16)["min_splits"] == 4
    # up to 8 rows: the two-group program with the activations prefetched fits 3 to an SM, and the split aims
    # at 3 (16384x5120 at 4 warps: 128 column tiles, 3 splits)
    few = int4_mma.config_for_rows(8)
    assert few["prefetch_x"] and few["step"] == 2 and few is int4_mma.config_for_rows(2)
    assert int4_mma._split(40, 128, few["occupancy"], few["step"], None)[0] == 3


def test_bad_inputs_name_the_values():
    weight = _weight(128, 64, 32, True)
    with pytest.raises(ValueError, match="rows"):
        int4_mma.int4_linear_mma(torch.randn(17, 128, dtype=torch.bfloat16), *weight, 32)
    with pytest.raises(ValueError, match="dtype"):
        int4_mma.int4_linear_mma(torch.randn(2, 128), *weight, 32)
    with pytest.raises(ValueError, match=r"expected \(M, 128\)"):
        int4_mma.int4_linear_mma(torch.randn(2, 96, dtype=torch.bfloat16), *weight, 32)
    with pytest.raises(ValueError, match="CUDA"):
        int4_mma.int4_linear_mma(torch.randn(2, 128, dtype=torch.bfloat16), *weight, 32)
    assert not int4_mma.supported(torch.randn(2, 128, dtype=torch.bfloat16), 32)


# ----------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------

TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}  # as test_kernels_int4.py, vs the reference


def _check(x, weight, group, config=None):
    out = int4_mma.int4_linear_mma(x, *weight, group, config=config)
    assert out.shape == (x.shape[0], weight[0].shape[1]) and out.dtype == x.dtype
    # exact product of the dequantized weight (fp64): the kernel keeps (q - z) exact and scales fp32 group sums
    exact = x.double() @ reference.dequantize(*weight, group, torch.float64)
    ref = reference.int4_linear(x, *weight, group)
    err_exact, err_ref = _rel(out, exact), _rel(out, ref)
    assert err_exact < TOL[x.dtype] / 2, (err_exact, err_ref)
    assert err_ref < TOL[x.dtype], (err_exact, err_ref)
    return out


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs a CUDA sm_80+ GPU")
    return torch.device("cuda")


# (M, K, N, group): ragged N (not a multiple of a program's 32 W columns), group counts that step 2 does not
# divide (odd), K splits over programs (large K at small N) and none (small K).
SHAPES = {
    "m1_g128": (1, 1024, 200, 128),
    "m3_g32_oddgroups": (3, 96, 136, 32),
    "m8_g64": (8, 640, 72, 64),
    "m9_g128_split": (9, 4096, 96, 128),
    "m16_g32": (16, 512, 264, 32),
    "m16_g64_wide": (16, 256, 1000, 64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gpu_matches_reference(cuda, shape, dtype, symmetric):
    m_rows, size_k, size_n, group = shape
    weight = _weight(size_k, size_n, group, symmetric, cuda, scale_dtype=dtype)
    _check(torch.randn(m_rows, size_k, device=cuda).to(dtype), weight, group)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        dict(warps=1, step=1, occupancy=64.0, prefetch=False),
        dict(warps=2, step=2, occupancy=8.0, prefetch=True),
        dict(warps=4, step=2, occupancy=2.0, prefetch=False),
        dict(warps=8, step=1, occupancy=1.0, prefetch=True),
        dict(warps=2, step=1, occupancy=0.5, prefetch=True, min_splits=8),
        dict(warps=2, step=1, occupancy=4.0, prefetch=True, prefetch_x=True),
        dict(warps=4, step=2, occupancy=8.0, prefetch=True, prefetch_x=True),
        dict(warps=1, step=2, occupancy=64.0, prefetch=False, prefetch_x=True),
    ],
    ids=["w1s1", "w2s2pf", "w4s2", "w8s1pf", "w2_min_splits8", "w2s1pfx", "w4s2pfx", "w1s2nopf_x"],
)
@pytest.mark.parametrize("m_rows", [1, 5, 16])
def test_gpu_every_config(cuda, config, m_rows):
    weight = _weight(2048, 328, 64, False, cuda)
    _check(
        torch.randn(m_rows, 2048, device=cuda, dtype=torch.bfloat16),
        weight,
        64,
        int4_mma.mma_config(**config),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("m_rows", [1, 16])
def test_gpu_scout_shapes_and_counters(cuda, m_rows):
    """Scout shapes with the shipped config (K split over programs, fused last-arriver reduction); repeated
    calls reuse the arrival counters (left at zero) and give identical results (fixed summation order)."""
    for size_n, size_k in ((16384, 5120), (5120, 8192)):
        weight = _weight(size_k, size_n, 128, True, cuda)
        x = torch.randn(m_rows, size_k, device=cuda, dtype=torch.bfloat16)
        first = _check(x, weight, 128)
        torch.testing.assert_close(int4_mma.int4_linear_mma(x, *weight, 128), first, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_strided_rows_and_graph_capture(cuda):
    weight = _weight(1024, 256, 128, True, cuda)
    x = torch.randn(4, 2048, device=cuda, dtype=torch.bfloat16)[:, ::2]  # non-contiguous rows
    _check(x, weight, 128)
    static_x = torch.randn(2, 1024, device=cuda, dtype=torch.bfloat16)
    int4_mma.int4_linear_mma(static_x, *weight, 128)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int4_mma.int4_linear_mma(static_x, *weight, 128)
    static_x.copy_(torch.randn_like(static_x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, int4_mma.int4_linear_mma(static_x, *weight, 128), rtol=0, atol=0)
