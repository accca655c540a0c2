"""Inference-only fused kernels (``scout_mm.kernels.fused``) vs their PyTorch references
(``scout_mm.kernels.fused_reference``, the model's own math), and the model with them on vs off.

CPU: the kernels run under ``TRITON_INTERPRET=1`` in one subprocess (``test_interpreter_suite``), fp32 and fp16.
GPU tests (marked ``gpu``) run the compiled kernels at Scout shapes in bf16. Inputs are fresh random draws.

Rounding: the kernels round where the references round (residual sum, norm before the weight, RoPE before the
QK-norm, silu before the product), so in half precision almost every element is bit-identical; the rest differ
by an ulp through fp32 summation order / rsqrt. ``assert_rounds_like`` checks both.
"""

from __future__ import annotations

import pytest
import torch

import scout_mm.kernels as kernels
from scout_mm.kernels import fused_reference as reference
from tests.helpers import INTERPRETED, interpreter_suite, max_rel_err, require_interpreter, tiny_config

test_interpreter_suite = interpreter_suite(__file__, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def fused():
    require_interpreter()
    from scout_mm.kernels import fused as module

    return module


@pytest.fixture(scope="module")
def gpu_fused():
    if not torch.cuda.is_available() or INTERPRETED:
        pytest.skip("needs CUDA")
    from scout_mm.kernels import fused as module

    return module


DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]


def assert_rounds_like(out, ref, min_equal=0.97):
    """fp32: within 1e-5 relative. Half precision: within 2 ulps, and nearly every element bit-identical (a
    missing or extra rounding step would make a large share differ by one ulp): at most 3% of the elements differ,
    or 2 of a small tensor (the decode case has 32 per head group; a legitimate 1-ulp tie-break difference in 2
    of them is 6%, while a missing rounding step changes about half)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    if out.dtype == torch.float32:
        assert max_rel_err(out, ref) < 1e-5
        return
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=2 * eps * float(ref.abs().max()))
    differ = int((out != ref).sum())
    allowed = max(2, int((1 - min_equal) * out.numel()))
    assert differ <= allowed, f"{differ} of {out.numel()} elements are not bit-identical (at most {allowed})"


# ---------------------------------------------------------------------------------------------------- norms
NORM_SHAPES = {"one_token": (1, 1, 64), "ragged": (3, 7, 80), "wide": (2, 3, 1000)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", NORM_SHAPES.values(), ids=NORM_SHAPES.keys())
def test_add_rms_norm_matches_reference(fused, shape, dtype):
    x = torch.randn(shape).to(dtype)
    delta = torch.randn(shape).to(dtype)
    weight = (1 + 0.3 * torch.randn(shape[-1])).to(dtype)
    summed, normed = fused.add_rms_norm(x, delta, weight, 1e-5)
    ref_summed, ref_normed = reference.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(summed, ref_summed)  # one add, one rounding: exact
    assert_rounds_like(normed, ref_normed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
def test_rms_norm_matches_reference_on_strided_rows(fused, dtype, with_weight):
    # rows of a wider tensor (a non-unit row stride), as the fused projections' outputs are
    full = torch.randn(5, 3, 100).to(dtype) * 3
    x = full[..., 10:90]
    weight = (1 + 0.3 * torch.randn(80)).to(dtype) if with_weight else None
    assert_rounds_like(fused.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 1500)])
def test_add_residual_matches_reference(fused, shape, dtype):
    x, a, b = (torch.randn(shape).to(dtype) * scale for scale in (4, 1, 0.1))
    assert torch.equal(
        fused.add_residual(x, a, b), reference.add_residual(x, a, b)
    )  # two adds, two roundings


# ----------------------------------------------------------------------------------------------------- RoPE
ROPE_SHAPES = {  # (batch, seq, n_heads, n_kv_heads, head_dim)
    "decode": (1, 1, 4, 2, 16),
    "batch_ragged_heads": (3, 5, 3, 1, 32),
    "odd_half": (2, 4, 2, 2, 34),  # head_dim // 2 = 17 pairs: a masked tail
}


def _rope_inputs(batch, seq, n_heads, n_kv_heads, head_dim, dtype, shared_table=False, device="cpu"):
    # q, k as views of one fused q|k|v output (a row stride wider than the heads), as the model passes them
    qkv = torch.randn(batch, seq, (n_heads + 2 * n_kv_heads) * head_dim, device=device).to(dtype)
    q = qkv[..., : n_heads * head_dim].view(batch, seq, n_heads, head_dim)
    k = qkv[..., n_heads * head_dim : (n_heads + n_kv_heads) * head_dim].view(
        batch, seq, n_kv_heads, head_dim
    )
    positions = torch.randint(0, 10000, (1 if shared_table else batch, seq), device=device)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = positions[..., None].float() * inv_freq
    return q, k, torch.cos(angles), torch.sin(angles)


@pytest.mark.parametrize("eps", [None, 1e-5], ids=["rope", "rope_qk_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", ROPE_SHAPES.values(), ids=ROPE_SHAPES.keys())
def test_rope_qk_norm_matches_reference(fused, shape, dtype, eps):
    q, k, cos, sin = _rope_inputs(*shape, dtype)
    out_q, out_k = fused.rope_qk_norm(q, k, cos, sin, eps)
    ref_q, ref_k = reference.rope_qk_norm(q, k, cos, sin, eps)
    assert_rounds_like(out_q, ref_q)
    assert_rounds_like(out_k, ref_k)


def test_rope_with_one_table_for_the_batch(fused):
    q, k, cos, sin = _rope_inputs(3, 4, 2, 1, 16, torch.float32, shared_table=True)
    for out, ref in zip(
        fused.rope_qk_norm(q, k, cos, sin, None), reference.rope_qk_norm(q, k, cos, sin, None)
    ):
        assert_rounds_like(out, ref)


# ---------------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows, inter", [(1, 48), (3, 1500), (17, 40)])
def test_silu_mul_matches_reference(fused, rows, inter, dtype):
    gate_up = (torch.randn(rows, 2 * inter) * 3).to(dtype)  # gate and up: halves of one fused output
    gate, up = gate_up.split(inter, dim=-1)
    assert_rounds_like(fused.silu_mul(gate, up), reference.silu_mul(gate, up))


# ---------------------------------------------------------------------------------------------------- router
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "tokens, hidden, n_experts, top_k", [(1, 64, 16, 1), (3, 300, 5, 2), (17, 128, 16, 4)]
)
def test_router_topk_matches_reference(fused, tokens, hidden, n_experts, top_k, dtype):
    x = torch.randn(tokens, hidden).to(dtype)
    weight = (torch.randn(n_experts, hidden) * hidden**-0.5).to(dtype)
    weights, ids, logits = fused.router_topk(x, weight, top_k)
    ref_weights, ref_ids, ref_logits = reference.router_topk(x, weight, top_k)
    assert ids.dtype == torch.int64 and weights.dtype == dtype and logits.dtype == dtype
    from scout_mm.kernels import launch

    assert all(
        int(buf.abs().sum()) == 0 for buf in launch._COUNTERS.values()
    )  # left at zero for the next call
    assert_rounds_like(logits, ref_logits, min_equal=0.9)
    # Where the reference's k-th and (k+1)-th logits are clearly apart, the same experts in the same order.
    ordered = ref_logits.float().sort(-1, descending=True).values
    clear = (ordered[:, top_k - 1] - ordered[:, top_k] if top_k < n_experts else ordered[:, -1]) > 1e-2
    distinct = (ordered[:, :top_k].diff(dim=-1).abs() > 1e-2).all(-1)
    sure = clear & distinct  # (a 1-token draw may have none: the check below covers every token)
    assert torch.equal(ids[sure], ref_ids[sure])
    torch.testing.assert_close(weights[sure].float(), ref_weights[sure].float(), rtol=2e-3, atol=2e-3)
    # Everywhere: the chosen logits are the top-k values.
    torch.testing.assert_close(logits.gather(-1, ids), ref_logits.float().topk(top_k).values.to(dtype),
                               rtol=2e-3, atol=2e-3)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens, n_experts, top_k", [(1, 16, 1), (5, 5, 2), (3, 1, 1)])
def test_router_shared_slot_appends_expert_e_with_weight_one(fused, tokens, n_experts, top_k, dtype):
    # scout_mm.fusion.fuse_shared_expert: one more slot per token, expert n_experts, weight exactly 1.0
    x = torch.randn(tokens, 96).to(dtype)
    weight = (torch.randn(n_experts, 96) * 96**-0.5).to(dtype)
    weights, ids, logits = fused.router_topk(x, weight, top_k)
    w_slot, ids_slot, logits_slot = fused.router_topk(x, weight, top_k, shared_slot=True)
    assert ids_slot.shape == w_slot.shape == (tokens, top_k + 1) and ids_slot.is_contiguous()
    assert torch.equal(ids_slot[:, :top_k], ids) and torch.equal(w_slot[:, :top_k], weights)
    assert torch.equal(logits_slot, logits)
    assert (ids_slot[:, top_k] == n_experts).all() and (w_slot[:, top_k] == 1.0).all()


def _norm_router_inputs(tokens, hidden, n_experts, dtype, device="cpu"):
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    delta = torch.randn(tokens, hidden, device=device).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    weight = (torch.randn(n_experts, hidden, device=device) * hidden**-0.5).to(dtype)
    return x, delta, norm_weight, weight


def _same_choice(ids, ref_ids, ref_logits, top_k, margin):
    # where the reference's k-th and (k+1)-th logits are clearly apart (and the top k distinct): same experts
    ordered = ref_logits.float().sort(-1, descending=True).values
    clear = (
        ordered[:, top_k - 1] - ordered[:, top_k] if top_k < ordered.shape[1] else ordered[:, -1]
    ) > margin
    sure = clear & (ordered[:, :top_k].diff(dim=-1).abs() > margin).all(-1)
    assert torch.equal(ids[sure, :top_k], ref_ids[sure, :top_k])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "tokens, hidden, n_experts, top_k, shared",
    [(1, 64, 16, 1, True), (3, 300, 5, 2, False), (17, 1000, 16, 1, True)],
    ids=["decode_shared", "ragged_top2", "wide_17_tokens"],
)
def test_add_rms_norm_router_matches_the_two_steps(fused, tokens, hidden, n_experts, top_k, shared, dtype):
    # One launch = add_rms_norm then router_topk: the sum and the norm bit-identical to the norm kernel's (same
    # roundings, same one-row sum), the logits as the router kernel's on that norm, the reference within rounding.
    x, delta, norm_weight, weight = _norm_router_inputs(tokens, hidden, n_experts, dtype)
    summed, h, weights, ids, logits = fused.add_rms_norm_router(
        x, delta, norm_weight, 1e-5, weight, top_k, shared
    )
    want_sum, want_h = fused.add_rms_norm(x, delta, norm_weight, 1e-5)
    assert torch.equal(summed, want_sum) and torch.equal(h, want_h)
    k_weights, k_ids, k_logits = fused.router_topk(h, weight, top_k, shared_slot=shared)
    assert_rounds_like(logits, k_logits, min_equal=0.9)
    _same_choice(ids, k_ids, k_logits, top_k, 1e-2)
    chosen = torch.sigmoid(logits.gather(-1, ids[:, :top_k]).float()).to(dtype)
    torch.testing.assert_close(weights[:, :top_k].float(), chosen.float(), rtol=2e-3, atol=2e-3)
    ref = reference.add_rms_norm_router(x, delta, norm_weight, 1e-5, weight, top_k, shared_slot=shared)
    assert_rounds_like(summed, ref[0])
    assert_rounds_like(h, ref[1])
    assert_rounds_like(logits, ref[4], min_equal=0.9)
    _same_choice(ids, ref[3], ref[4], top_k, 1e-2)
    assert ids.shape == weights.shape == (tokens, top_k + shared)
    if shared:
        assert (ids[:, -1] == n_experts).all() and (weights[:, -1] == 1.0).all()
    from scout_mm.kernels import launch

    assert all(int(buf.abs().sum()) == 0 for buf in launch._COUNTERS.values())


def test_router_ties_pick_the_lowest_expert(fused):
    # Experts 1, 3 and 6 share one weight row, and every token's logit for it is the largest: three equal
    # top logits, chosen in index order. Seeded, and x is shifted along the shared row so that x . shared is
    # exactly 0.5 |shared|^2 (~32) for every token, far above the other experts' ~0.01 whatever the draw.
    gen = torch.Generator().manual_seed(7)
    shared = torch.randn(64, generator=gen)
    x = torch.randn(4, 64, generator=gen)
    x += (0.5 - (x @ shared) / shared.dot(shared))[:, None] * shared
    weight = torch.randn(8, 64, generator=gen) * 1e-3
    weight[[1, 3, 6]] = shared
    weights, ids, logits = fused.router_topk(x, weight, 3)
    assert (logits[:, [1, 3, 6]] == logits.max(-1, keepdim=True).values).all()
    assert ids.tolist() == [[1, 3, 6]] * 4
    assert torch.equal(weights, torch.sigmoid(logits.gather(-1, ids)))
    # top-4: the tied three first, then the largest of the rest
    ids4 = fused.router_topk(x, weight, 4)[1]
    assert torch.equal(ids4[:, 3], torch.tensor([0, 2, 4, 5, 7])[logits[:, [0, 2, 4, 5, 7]].argmax(-1)])


# ---------------------------------------------------------------------------------------------- KV writes
@pytest.mark.parametrize("layout", ["ring", "paged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_write_kv_decode_matches_reference(fused, layout, dtype):
    batch, n_kv_heads, head_dim, ring, block_size = 3, 2, 24, 8, 4
    kv = torch.randn(batch, 1, 2 * n_kv_heads, head_dim).to(dtype)  # k and v: views of one tensor
    k, v = kv[:, :, :n_kv_heads], kv[:, :, n_kv_heads:]
    positions = torch.randint(0, 30, (batch, 2))[:, -1]  # a strided view, as the cache passes it
    if layout == "ring":
        store = (torch.randn(batch, ring, n_kv_heads, head_dim).to(dtype) for _ in range(2))
        kwargs = dict(ring_size=ring)
    else:
        n_blocks = batch * 8
        store = (torch.randn(n_blocks, block_size, n_kv_heads, head_dim).to(dtype) for _ in range(2))
        kwargs = dict(
            block_table=torch.randperm(n_blocks).view(batch, 8).to(torch.int32), block_size=block_size
        )
    k_store, v_store = store
    ref_k, ref_v = k_store.clone(), v_store.clone()
    lens = fused.write_kv_decode(k, v, k_store, v_store, positions, **kwargs)
    ref_lens = reference.write_kv_decode(k, v, ref_k, ref_v, positions, **kwargs)
    assert lens.dtype == torch.int32 and torch.equal(lens, ref_lens)
    assert torch.equal(k_store, ref_k) and torch.equal(v_store, ref_v)


def _kv_store(layout, batch, n_kv_heads, head_dim, dtype, device="cpu", ring=8, block_size=4, blocks=8):
    if layout == "ring":
        shape, kwargs = (batch, ring, n_kv_heads, head_dim), dict(ring_size=ring)
    else:
        table = torch.randperm(batch * blocks, device=device).view(batch, blocks).to(torch.int32)
        shape, kwargs = (
            (batch * blocks, block_size, n_kv_heads, head_dim),
            dict(block_table=table, block_size=block_size),
        )
    return [torch.randn(shape, device=device).to(dtype) for _ in range(2)], kwargs


@pytest.mark.parametrize("eps", [None, 1e-5], ids=["rope", "rope_qk_norm"])
@pytest.mark.parametrize("layout", ["ring", "paged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", [16, 34], ids=["dim16", "dim34_masked_tail"])
def test_rope_write_kv_decode_matches_the_two_kernels(fused, head_dim, dtype, layout, eps):
    """One launch (RoPE + QK-norm of q and k, the rotated keys and the values into the cache) writes exactly what
    rope_qk_norm then write_kv_decode write, and its q and keys round like the PyTorch reference's."""
    batch, n_heads, n_kv_heads = 3, 4, 2
    q, k, cos, sin = _rope_inputs(batch, 1, n_heads, n_kv_heads, head_dim, dtype)
    v = torch.randn_like(k)
    positions = torch.randint(0, 30, (batch, 2))[:, -1]  # a strided view, as the cache passes it
    (k_store, v_store), kwargs = _kv_store(layout, batch, n_kv_heads, head_dim, dtype)
    two_k, two_v = k_store.clone(), v_store.clone()
    ref_k, ref_v = k_store.clone(), v_store.clone()
    out_q, lens = fused.rope_write_kv_decode(q, k, v, cos, sin, eps, k_store, v_store, positions, **kwargs)
    rot_q, rot_k = fused.rope_qk_norm(q, k, cos, sin, eps)
    two_lens = fused.write_kv_decode(rot_k, v, two_k, two_v, positions, **kwargs)
    assert torch.equal(out_q, rot_q) and torch.equal(lens, two_lens) and lens.dtype == torch.int32
    assert torch.equal(k_store, two_k) and torch.equal(v_store, two_v)
    ref_q, ref_lens = reference.rope_write_kv_decode(
        q, k, v, cos, sin, eps, ref_k, ref_v, positions, **kwargs
    )
    assert_rounds_like(out_q, ref_q)
    assert_rounds_like(k_store, ref_k)
    assert torch.equal(v_store, ref_v) and torch.equal(lens, ref_lens)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_paged_writes_past_the_table_width_stay_in_the_rows_own_last_entry(fused, dtype):
    """An unchecked write past every reservation (e.g. a graph replayed too often) must not reach another
    sequence's blocks: the kernels read the row's last table entry, not the next row's first ones."""
    batch, n_kv_heads, head_dim, block_size, width = 3, 2, 16, 4, 5
    q, k, cos, sin = _rope_inputs(batch, 1, 4, n_kv_heads, head_dim, dtype)
    v = torch.randn_like(k)
    positions = torch.tensor(
        [width * block_size, 3 * width * block_size + 1, 7]
    )  # two past the width, one in
    table = torch.randperm(batch * width).view(batch, width).to(torch.int32)
    for launch in ("write", "rope_write"):
        k_store, v_store = (
            torch.randn(batch * width, block_size, n_kv_heads, head_dim).to(dtype) for _ in "kv"
        )
        before_k, before_v = k_store.clone(), v_store.clone()
        ref_k, ref_v = k_store.clone(), v_store.clone()
        kwargs = dict(block_table=table, block_size=block_size)
        if launch == "write":
            lens = fused.write_kv_decode(k, v, k_store, v_store, positions, **kwargs)
            ref_lens = reference.write_kv_decode(k, v, ref_k, ref_v, positions, **kwargs)
        else:
            lens = fused.rope_write_kv_decode(q, k, v, cos, sin, None, k_store, v_store, positions, **kwargs)[
                1
            ]
            ref_lens = reference.rope_write_kv_decode(
                q, k, v, cos, sin, None, ref_k, ref_v, positions, **kwargs
            )[1]
        assert torch.equal(lens, ref_lens) and lens.tolist() == (positions + 1).tolist()
        assert_rounds_like(k_store, ref_k)
        assert torch.equal(v_store, ref_v)
        # exactly one row of each sequence's own block changed: the last entry's block for the two past the width
        changed = (v_store != before_v).flatten(2).any(-1).nonzero().tolist()
        expected = (
            [table[0, -1].item(), (positions[0] % block_size).item()],
            [table[1, -1].item(), (positions[1] % block_size).item()],
            [table[2, 1].item(), 3],
        )
        assert sorted(changed) == sorted(expected)
        assert torch.equal((k_store != before_k).flatten(2).any(-1), (v_store != before_v).flatten(2).any(-1))


# ------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs_name_the_values(fused):
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"weight \(32,\)"):
        fused.rms_norm(x, torch.ones(32), 1e-5)
    with pytest.raises(ValueError, match="delta"):
        fused.add_rms_norm(x, torch.randn(2, 32), torch.ones(64), 1e-5)
    with pytest.raises(ValueError, match="cos"):
        q, k, cos, sin = _rope_inputs(1, 2, 2, 1, 16, torch.float32)
        fused.rope_qk_norm(q, k, cos[:, :1], sin[:, :1], None)
    with pytest.raises(ValueError, match="top_k"):
        fused.router_topk(x, torch.randn(4, 64), 5)
    with pytest.raises(ValueError, match=r"router weight \(4, 32\)"):
        fused.add_rms_norm_router(x, x, torch.ones(64), 1e-5, torch.randn(4, 32), 1)
    with pytest.raises(ValueError, match=r"expected \(tokens, hidden\)"):
        fused.add_rms_norm_router(x[None], x[None], torch.ones(64), 1e-5, torch.randn(4, 64), 1)
    with pytest.raises(ValueError, match="ring_size"):
        store = torch.zeros(2, 4, 1, 8)
        fused.write_kv_decode(torch.randn(2, 1, 1, 8), torch.randn(2, 1, 1, 8), store, store, torch.zeros(2))
    with pytest.raises(ValueError, match="expected one token"):
        q, k, cos, sin = _rope_inputs(2, 2, 2, 1, 8, torch.float32)
        store = torch.zeros(2, 4, 1, 8)
        fused.rope_write_kv_decode(q, k, k, cos, sin, None, store, store, torch.zeros(2), ring_size=4)


# ------------------------------------------------------------------------------------------- dispatch
def test_dispatch_modes_and_autograd(fused, monkeypatch):
    x = torch.randn(3, 64)
    weight = torch.ones(64, requires_grad=True)
    monkeypatch.setenv("SCOUT_MM_FUSED", "on")
    assert not kernels.use_fused(x, weight)  # autograd needs the graph: the reference runs
    out = kernels.rms_norm(x, weight, 1e-5)
    out.sum().backward()
    assert weight.grad is not None
    with torch.no_grad():
        assert kernels.use_fused(x, weight)
    monkeypatch.setenv("SCOUT_MM_FUSED", "off")
    assert not kernels.use_fused(x)
    monkeypatch.setenv("SCOUT_MM_FUSED", "auto")
    assert not kernels.use_fused(x)  # CPU tensors, auto backend
    monkeypatch.setenv("SCOUT_MM_FUSED", "sometimes")
    with pytest.raises(ValueError, match="SCOUT_MM_FUSED='sometimes'"):
        kernels.use_fused(x)


# ------------------------------------------------------------------------------------------- the model
def _model(dtype, seed):
    from scout_mm.model import ScoutForConditionalGeneration

    torch.manual_seed(seed)
    # top-2 + shared expert, chunk 8, NoPE every 2nd layer with temperature, QK-norm: every fused path
    cfg = tiny_config(vision=False, num_experts_per_tok=2, max_position_embeddings=256)
    return ScoutForConditionalGeneration(cfg).to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_model_logits_with_fused_kernels_match_the_pytorch_path(fused, dtype, monkeypatch):
    from scout_mm.fusion import fuse_projections

    model = _model(dtype, seed=torch.seed() % 2**31)
    ids = torch.randint(3, 290, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        monkeypatch.setenv("SCOUT_MM_FUSED", "off")
        ref = model(ids, attention_mask=mask).logits
        monkeypatch.setenv("SCOUT_MM_FUSED", "on")
        out = model(ids, attention_mask=mask).logits
        fuse_projections(model)
        out_fused_proj = model(ids, attention_mask=mask).logits
    real = mask.bool()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert max_rel_err(out[real], ref[real]) < tol
    assert max_rel_err(out_fused_proj[real], ref[real]) < tol


def test_cached_generation_with_fused_kernels_equals_the_pytorch_path(fused, monkeypatch):
    # Decode steps: router kernel, KV writes into ring (RoPE layers, with the rotation) and paged (NoPE layers)
    # caches.
    from scout_mm import cache as cache_module
    from scout_mm.fusion import fuse_projections

    model = _model(torch.float32, seed=torch.seed() % 2**31)
    ids = torch.randint(3, 290, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    monkeypatch.setenv("SCOUT_MM_FUSED", "off")
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    monkeypatch.setenv("SCOUT_MM_FUSED", "on")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out, ref)
    fuse_projections(model)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]), ref)
    monkeypatch.setattr(cache_module, "ROPE_WRITES_KV", False)  # RoPE, then the KV write: two launches
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]), ref)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 7, 4096])
def test_gpu_norms_scout_shapes(gpu_fused, rows):
    x = torch.randn(rows, 5120, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn(rows, 5120, device="cuda", dtype=torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(5120, device="cuda")).to(torch.bfloat16)
    summed, normed = gpu_fused.add_rms_norm(x, delta, weight, 1e-5)
    ref_summed, ref_normed = reference.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(summed, ref_summed)
    assert_rounds_like(normed, ref_normed)
    assert_rounds_like(gpu_fused.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [1, 300])
@pytest.mark.parametrize("eps", [None, 1e-5], ids=["rope", "rope_qk_norm"])
def test_gpu_rope_qk_norm_scout_shapes(gpu_fused, seq, eps):
    q, k, cos, sin = _rope_inputs(1, seq, 40, 8, 128, torch.bfloat16, device="cuda")
    for out, ref in zip(
        gpu_fused.rope_qk_norm(q, k, cos, sin, eps), reference.rope_qk_norm(q, k, cos, sin, eps)
    ):
        assert_rounds_like(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 37])
def test_gpu_silu_mul_scout_shapes(gpu_fused, rows):
    gate_up = torch.randn(rows, 2 * 8192, device="cuda", dtype=torch.bfloat16) * 3
    gate, up = gate_up.split(8192, dim=-1)
    assert_rounds_like(gpu_fused.silu_mul(gate, up), reference.silu_mul(gate, up))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k", [(1, 1), (16, 2), (64, 1)])
def test_gpu_router_scout_shapes(gpu_fused, tokens, top_k):
    x = torch.randn(tokens, 5120, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(16, 5120, device="cuda") * 5120**-0.5).to(torch.bfloat16)
    weights, ids, logits = gpu_fused.router_topk(x, weight, top_k)
    ref_weights, ref_ids, ref_logits = reference.router_topk(x, weight, top_k)
    # cuBLAS sums in another order: logits within a bf16 ulp or two
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=1.6e-2, atol=1.6e-2)
    ordered = ref_logits.float().sort(-1, descending=True).values
    sure = (ordered[:, top_k - 1] - ordered[:, top_k] > 0.05) & (
        ordered[:, :top_k].diff(dim=-1).abs() > 0.05
    ).all(-1)
    assert torch.equal(ids[sure], ref_ids[sure])
    torch.testing.assert_close(weights[sure].float(), ref_weights[sure].float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(weights, torch.sigmoid(logits.gather(-1, ids).float()).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_gpu_add_rms_norm_router_scout_shapes(gpu_fused, tokens):
    x, delta, norm_weight, weight = _norm_router_inputs(tokens, 5120, 16, torch.bfloat16, "cuda")
    summed, h, weights, ids, logits = gpu_fused.add_rms_norm_router(
        x, delta, norm_weight, 1e-5, weight, 1, True
    )
    want_sum, want_h = gpu_fused.add_rms_norm(x, delta, norm_weight, 1e-5)
    assert torch.equal(summed, want_sum) and torch.equal(h, want_h)
    k_weights, k_ids, k_logits = gpu_fused.router_topk(h, weight, 1, shared_slot=True)
    torch.testing.assert_close(logits.float(), k_logits.float(), rtol=1.6e-2, atol=1.6e-2)
    _same_choice(ids, k_ids, k_logits, 1, 0.05)
    assert (ids[:, -1] == 16).all() and (weights[:, -1] == 1.0).all()
    ref = reference.add_rms_norm_router(x, delta, norm_weight, 1e-5, weight, 1, shared_slot=True)
    torch.testing.assert_close(h.float(), ref[1].float(), rtol=1.6e-2, atol=1.6e-2)
    _same_choice(ids, ref[3], ref[4], 1, 0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["ring", "paged"])
def test_gpu_rope_write_kv_decode_scout_shapes(gpu_fused, layout):
    batch, n_heads, n_kv_heads, head_dim = 4, 40, 8, 128
    q, k, cos, sin = _rope_inputs(batch, 1, n_heads, n_kv_heads, head_dim, torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    positions = torch.randint(0, 20000, (batch,), device="cuda")
    (k_store, v_store), kwargs = _kv_store(
        layout, batch, n_kv_heads, head_dim, torch.bfloat16, "cuda", 8192, 256, 80
    )
    two_k, two_v = k_store.clone(), v_store.clone()
    out_q, lens = gpu_fused.rope_write_kv_decode(
        q, k, v, cos, sin, 1e-5, k_store, v_store, positions, **kwargs
    )
    rot_q, rot_k = gpu_fused.rope_qk_norm(q, k, cos, sin, 1e-5)
    assert torch.equal(lens, gpu_fused.write_kv_decode(rot_k, v, two_k, two_v, positions, **kwargs))
    assert torch.equal(out_q, rot_q) and torch.equal(k_store, two_k) and torch.equal(v_store, two_v)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["ring", "paged"])
def test_gpu_write_kv_decode(gpu_fused, layout):
    batch, n_kv_heads, head_dim = 4, 8, 128
    k = torch.randn(batch, 1, n_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    positions = torch.randint(0, 20000, (batch,), device="cuda")
    if layout == "ring":
        shape, kwargs = (batch, 8192, n_kv_heads, head_dim), dict(ring_size=8192)
    else:
        table = torch.randperm(batch * 80, device="cuda").view(batch, 80).to(torch.int32)
        shape, kwargs = (batch * 80, 256, n_kv_heads, head_dim), dict(block_table=table, block_size=256)
    k_store = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_store = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    ref_k, ref_v = k_store.clone(), v_store.clone()
    lens = gpu_fused.write_kv_decode(k, v, k_store, v_store, positions, **kwargs)
    assert torch.equal(lens, reference.write_kv_decode(k, v, ref_k, ref_v, positions, **kwargs))
    assert torch.equal(k_store, ref_k) and torch.equal(v_store, ref_v)
