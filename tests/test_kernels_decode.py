"""Decode attention (``scout_mm.kernels.flash_decode``) options of the decode step, on CPU under
``TRITON_INTERPRET=1`` (one subprocess, ``test_interpreter_suite``): the NoPE query scale applied inside the split
kernel and the optional split merge inside the split kernel (``FUSED_MERGE``), against the PyTorch reference and
the separate merge kernel, contiguous and paged caches, ragged lengths, fp32 and fp16. Fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import interpreter_suite, require_interpreter

test_interpreter_suite = interpreter_suite(__file__, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def flash_decode():
    require_interpreter()
    from scout_mm.kernels import flash_decode as module

    return module


def _problem(batch, n_heads, n_kv_heads, q_len, capacity, head_dim, paged_block, dtype):
    q = torch.randn(batch, n_heads, q_len, head_dim).to(dtype)
    lens = torch.randint(q_len, capacity + 1, (batch,), dtype=torch.int32)
    q_scale = 1 + torch.rand(batch, q_len)
    if paged_block:
        max_blocks = -(-capacity // paged_block)
        n_blocks = batch * max_blocks + 2
        k = torch.randn(n_blocks, paged_block, n_kv_heads, head_dim).to(dtype)
        table = torch.randperm(n_blocks)[: batch * max_blocks].view(batch, max_blocks).int()
    else:
        k = torch.randn(batch, n_kv_heads, capacity, head_dim).to(dtype)
        table = None
    v = torch.randn_like(k)
    return q, k, v, dict(scale=head_dim**-0.5, kv_lens=lens, block_table=table, q_scale=q_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("paged_block", [None, 8], ids=["contiguous", "paged"])
@pytest.mark.parametrize("shape", [(1, 4, 2, 1, 70, 16), (3, 6, 2, 2, 45, 32)], ids=["b1_q1", "b3_q2"])
@pytest.mark.parametrize(
    "n_splits", [3, 20], ids=["unrolled_merge", "looped_merge"]
)  # the in-kernel merge's forms
def test_merge_in_split_kernel_and_q_scale(flash_decode, monkeypatch, shape, paged_block, dtype, n_splits):
    from scout_mm.kernels.reference import decode_attention as reference

    q, k, v, kw = _problem(*shape, paged_block, dtype)
    outs = {}
    for merge in (True, False):
        monkeypatch.setattr(flash_decode, "FUSED_MERGE", merge)
        outs[merge] = flash_decode.decode_attention(q, k, v, n_splits=n_splits, **kw)
    # the reference on the query times the fp32 scale, rounded once to the activation dtype (as HF rounds it)
    q_scaled = (q * kw["q_scale"][:, None, :, None]).to(dtype).double()
    ref_out, ref_lse = reference(q_scaled, k.double(), v.double(), **{**kw, "q_scale": None})
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for out, lse in outs.values():
        assert out.dtype == dtype
        assert float((out.double() - ref_out).norm() / ref_out.norm()) < tol
        assert float((lse.double() - ref_lse).abs().max()) < 1e-4
    (fused, fused_lse), (separate, separate_lse) = outs[True], outs[False]
    assert float((fused.double() - separate.double()).abs().max()) <= tol * float(separate.abs().max())
    assert float((fused_lse - separate_lse).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_scales_the_query_in_fp32_and_rounds_once(dtype):
    """HF and the prefill path round q * scale (fp32) once; the decode path rounded the scale first (2-3 bf16 ulps
    off at Scout's scales, e.g. 1.0693 -> 1.0703)."""
    from scout_mm.kernels.reference import decode_attention as reference

    q, k, v, kw = _problem(2, 4, 2, 1, 40, 16, None, dtype)
    kw["q_scale"] = 1 + torch.log1p(torch.tensor([[1.0], [2.0]])) * 0.1  # 1.0693, 1.1099: not bf16 values
    expected = (q * kw["q_scale"][:, None, :, None]).to(dtype)
    out, lse = reference(q, k, v, **kw)
    ref_out, ref_lse = reference(expected, k, v, **{**kw, "q_scale": None})
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_bad_q_scale_shape_names_it(flash_decode):
    q, k, v, kw = _problem(2, 4, 2, 1, 20, 16, None, torch.float32)
    with pytest.raises(ValueError, match="q_scale shape"):
        flash_decode.decode_attention(q, k, v, **{**kw, "q_scale": torch.ones(3, 1)})


@pytest.mark.parametrize("paged_block", [None, 8], ids=["contiguous", "paged"])
@pytest.mark.parametrize("n_splits", [None, 5], ids=["auto_splits", "five_splits"])
def test_splits_cover_the_live_keys_of_a_large_reservation(flash_decode, monkeypatch, paged_block, n_splits):
    # A cache reserved for 600 keys holding 1..300 (one sequence's window starting past 0): every split that
    # should hold keys does, the empty ones add nothing, and the result is the reference's.
    from scout_mm.kernels.reference import decode_attention as reference

    monkeypatch.setattr(flash_decode, "MIN_SPLIT_KEYS_BY_LAYOUT", {"contiguous": 40, "paged": 40})
    q, k, v, kw = _problem(4, 4, 2, 1, 600, 16, paged_block, torch.float32)
    kw["kv_lens"] = torch.tensor([1, 37, 300, 290], dtype=torch.int32)
    kw["kv_start"] = torch.tensor([0, 5, 0, 130], dtype=torch.int32)
    seen = {}
    real_merge = flash_decode.merge_states

    def spy(part_out, part_lse, **kwargs):
        seen["lse"] = part_lse.view(part_lse.shape[0], 4, 4)  # (split, batch, heads)
        return real_merge(part_out, part_lse, **kwargs)

    monkeypatch.setattr(flash_decode, "merge_states", spy)
    out, lse = flash_decode.decode_attention(q, k, v, n_splits=n_splits, **kw)
    ref_out, ref_lse = reference(q.double(), k.double(), v.double(), **kw)
    assert float((out.double() - ref_out).norm() / ref_out.norm()) < 1e-5
    assert float((lse.double() - ref_lse).abs().max()) < 1e-4
    # splits holding keys, per sequence: tiles of 16 keys (the interpreter's BLOCK_N) from kv_start's tile
    splits = seen["lse"].shape[0]
    min_split = 40 if n_splits is None else 1
    for b, (length, start) in enumerate(zip([1, 37, 300, 290], [0, 5, 0, 130], strict=True)):
        live = length - start // 16 * 16
        split_len = -(-max(-(-live // splits), min_split) // 16) * 16
        used = torch.isfinite(seen["lse"][:, b]).all(-1)
        assert used.tolist() == [i * split_len < live for i in range(splits)]
