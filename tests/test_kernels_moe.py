"""Fused Triton MoE (``scout_mm.kernels.moe``) vs the PyTorch reference.

CPU: the kernels run under ``TRITON_INTERPRET=1`` at tiny shapes. Triton reads that variable when it is
imported (its own ``tl.*`` helpers are jit functions too), so those tests run in one subprocess started with
it set (``test_interpreter_suite``); in the parent they show as skipped, and no other test file ever sees
interpreted kernels. GPU tests (marked ``gpu``) run the compiled kernels at Scout shapes.
"""

from __future__ import annotations

import pytest
import torch

import scout_mm.kernels as kernels
from scout_mm.kernels import reference
from tests.helpers import INTERPRETED, interpreter_suite, require_interpreter

test_interpreter_suite = interpreter_suite(__file__)


@pytest.fixture(scope="module")
def moe():
    require_interpreter()
    pytest.importorskip("triton")
    from scout_mm.kernels import moe as module

    return module


@pytest.fixture(scope="module")
def gpu_moe():
    if not torch.cuda.is_available() or INTERPRETED:
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    from scout_mm.kernels import moe as module

    return module


def _problem(tokens, hidden, inter, n_experts, top_k, dtype, device="cpu", ids=None):
    """Random inputs, fresh each call: distinct experts per token unless ``ids`` is given."""
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    weights = torch.rand(tokens, top_k, device=device).to(dtype)
    if ids is None:
        ids = torch.rand(tokens, n_experts, device=device).argsort(dim=1)[:, :top_k]
    gate_up = (torch.randn(n_experts, hidden, 2 * inter, device=device) / hidden**0.5).to(dtype)
    down = (torch.randn(n_experts, inter, hidden, device=device) / inter**0.5).to(dtype)
    return x, weights, ids, gate_up, down


def _reference(x, weights, ids, gate_up, down, dtype=torch.float64):
    """Reference in higher precision; non-local slots (ids outside [0, E)) get weight 0, hence output 0."""
    n_experts = gate_up.shape[0]
    local = (ids >= 0) & (ids < n_experts)
    args = [t.detach().to(dtype).requires_grad_() for t in (x, weights, gate_up, down)]
    out = reference.moe_experts(args[0], args[1] * local, ids.clamp(0, n_experts - 1), args[2], args[3])
    return out, args, local


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (tokens, hidden, inter, n_experts, top_k): T=1, ragged dims (not multiples of the tiles), more experts
# than rows (most experts get no token), top-1 and top-2.
CPU_SHAPES = {
    "t1_top2": (1, 32, 32, 4, 2),
    "t7_top2": (7, 32, 32, 4, 2),
    "ragged_top1": (5, 48, 40, 4, 1),
    "ragged_top2": (19, 40, 24, 3, 2),
    "sparse_experts": (3, 32, 16, 8, 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", CPU_SHAPES.values(), ids=CPU_SHAPES.keys())
def test_forward_matches_reference(moe, shape, dtype):
    x, weights, ids, gate_up, down = _problem(*shape, dtype)
    out = moe.moe_experts(x, weights, ids, gate_up, down)
    ref, _, _ = _reference(x, weights, ids, gate_up, down)
    assert out.dtype == dtype and out.shape == x.shape
    assert _rel(out, ref) < TOL[dtype]


def test_skewed_routing_with_empty_experts(moe):
    # Every token on experts 1 and 3 (rows span several route blocks), experts 0 and 2 empty.
    tokens = 37
    ids = torch.stack([torch.ones(tokens, dtype=torch.long), torch.full((tokens,), 3)], dim=1)
    x, weights, ids, gate_up, down = _problem(tokens, 32, 32, 4, 2, torch.float32, ids=ids)
    ref, _, _ = _reference(x, weights, ids, gate_up, down)
    assert _rel(moe.moe_experts(x, weights, ids, gate_up, down), ref) < TOL[torch.float32]


def test_routing_layout(moe):
    tokens, top_k, n_experts, block = 29, 2, 5, 16
    ids = torch.randint(0, n_experts, (tokens, top_k))
    ids[3, 1] = -1  # a non-local slot
    route = moe.Routing(ids, n_experts, block)
    rows, block_expert, start = route.sorted_rows.long(), route.block_expert.long(), route.expert_start.long()
    flat = ids.reshape(-1)
    local = (flat >= 0) & (flat < n_experts)
    real = rows < route.n_rows
    # Every local (token, slot) row appears once; padding and the non-local slot do not.
    assert sorted(rows[real].tolist()) == torch.nonzero(local).flatten().tolist()
    for e in range(n_experts):
        mine = rows[start[e] : start[e + 1]]
        mine = mine[mine < route.n_rows]
        assert mine.tolist() == torch.nonzero(flat == e).flatten().tolist()  # stable (token, slot) order
        assert (start[e + 1] - start[e]) % block == 0
        assert (block_expert[start[e] // block : start[e + 1] // block] == e).all()
    used = int(start[n_experts])
    assert (block_expert[used // block :] == -1).all()
    assert (rows[used:] == route.n_rows).all()
    # Each row block holds rows of its own expert only.
    for b in range(used // block):
        blk = rows[b * block : (b + 1) * block]
        assert (flat[blk[blk < route.n_rows]] == block_expert[b]).all()


@pytest.mark.parametrize("top_k", [1, 2])
def test_non_local_slots_contribute_nothing(moe, top_k):
    # Expert parallelism: slots routed to experts of other ranks carry ids outside [0, local experts).
    x, weights, ids, gate_up, down = _problem(11, 32, 32, 4, top_k, torch.float32)
    ids[0, :] = -1  # a token with no local expert at all
    ids[5, -1] = 4
    ids[8, 0] = 100
    out = moe.moe_experts(x, weights, ids, gate_up, down)
    ref, _, _ = _reference(x, weights, ids, gate_up, down)
    assert (out[0] == 0).all()
    assert _rel(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((7, 32, 32, 4, 2), torch.float32),
        ((6, 48, 40, 3, 1), torch.float32),
        ((9, 32, 24, 6, 2), torch.float16),
    ],
    ids=["top2_fp32", "top1_ragged_fp32", "top2_fp16"],
)
def test_gradients_match_autograd(moe, shape, dtype):
    x, weights, ids, gate_up, down = _problem(*shape, dtype)
    ids[2, 0] = -1  # non-local slot: no output, zero routing-weight grad
    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    out = moe.moe_experts(leaves[0], leaves[1], ids, leaves[2], leaves[3])
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref, ref_leaves, local = _reference(x, weights, ids, gate_up, down)
    ref.backward(grad_out.double())
    names = ("hidden", "topk_weights", "gate_up_proj", "down_proj")
    for name, ours, theirs in zip(names, leaves, ref_leaves, strict=True):
        expected = theirs.grad * local if name == "topk_weights" else theirs.grad
        assert ours.grad.dtype == dtype, name
        assert _rel(ours.grad, expected) < TOL[dtype], name
    assert (leaves[1].grad[2, 0] == 0).all()


def test_partial_gradients(moe):
    # Only the expert weights train (frozen activations, e.g. a probe): no other grad is computed.
    x, weights, ids, gate_up, down = _problem(5, 32, 32, 4, 2, torch.float32)
    gate_up.requires_grad_()
    down.requires_grad_()
    moe.moe_experts(x, weights, ids, gate_up, down).sum().backward()
    ref, ref_leaves, _ = _reference(x, weights, ids, gate_up, down)
    ref.sum().backward()
    assert _rel(gate_up.grad, ref_leaves[2].grad) < TOL[torch.float32]
    assert _rel(down.grad, ref_leaves[3].grad) < TOL[torch.float32]


def test_dispatch_runs_triton_when_forced(moe, monkeypatch):
    monkeypatch.setenv("SCOUT_MM_KERNELS", "triton")
    x, weights, ids, gate_up, down = _problem(4, 32, 32, 4, 2, torch.float32)
    assert torch.equal(
        kernels.moe_experts(x, weights, ids, gate_up, down), moe.moe_experts(x, weights, ids, gate_up, down)
    )


def test_bad_shapes_name_the_values(moe):
    x, weights, ids, gate_up, down = _problem(4, 32, 32, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="gate_up_proj"):
        moe.moe_experts(x, weights, ids, gate_up[:, :16], down)


# ----------------------------------------------------------------------------------------------------------
# GPU: compiled kernels at Scout shapes (H=5120, I=8192, E=16)
# ----------------------------------------------------------------------------------------------------------

SCOUT = dict(hidden=5120, inter=8192, n_experts=16)


def _poison_allocator(n_bytes: int) -> None:
    """Leave NaN-filled blocks in the caching allocator, so outputs that reuse them show unwritten rows."""
    torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").fill_(float("nan"))
    torch.empty(n_bytes // 8, dtype=torch.float32, device="cuda").fill_(float("nan"))


def _scout_problem(tokens, top_k, dtype):
    return _problem(tokens, SCOUT["hidden"], SCOUT["inter"], SCOUT["n_experts"], top_k, dtype, device="cuda")


GPU_FORWARD = [
    (1, 2, "bf16"),
    (1, 1, "bf16"),
    (37, 2, "bf16"),
    (64, 1, "bf16"),
    (700, 2, "bf16"),
    (3000, 1, "bf16"),
]
GPU_FORWARD += [(37, 2, "fp16"), (3000, 2, "fp16")]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "tokens,top_k,dtype", GPU_FORWARD, ids=[f"t{t}_top{k}_{d}" for t, k, d in GPU_FORWARD]
)
def test_gpu_forward_scout_shapes(gpu_moe, tokens, top_k, dtype):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x, weights, ids, gate_up, down = _scout_problem(tokens, top_k, dtype)
    _poison_allocator(tokens * top_k * SCOUT["inter"] * 6 + (1 << 24))
    out = gpu_moe.moe_experts(x, weights, ids, gate_up, down)
    ref, _, _ = _reference(x, weights, ids, gate_up, down, dtype=torch.float32)
    assert not out.isnan().any()
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.gpu
def test_gpu_non_local_slots(gpu_moe):
    x, weights, ids, gate_up, down = _scout_problem(300, 2, torch.bfloat16)
    ids[::7, 1] = -1
    ids[::5, 0] = 16
    _poison_allocator(300 * 2 * SCOUT["inter"] * 6)
    out = gpu_moe.moe_experts(x, weights, ids, gate_up, down)
    ref, _, _ = _reference(x, weights, ids, gate_up, down, dtype=torch.float32)
    assert not out.isnan().any()
    assert _rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,top_k", [(1, 2), (300, 2), (700, 1)])
def test_gpu_gradients_scout_shapes(gpu_moe, tokens, top_k):
    dtype = torch.bfloat16
    x, weights, ids, gate_up, down = _scout_problem(tokens, top_k, dtype)
    ids[0, 0] = -1
    leaves = [t.clone().requires_grad_() for t in (x, weights, gate_up, down)]
    _poison_allocator(tokens * top_k * SCOUT["inter"] * 12 + (1 << 24))
    out = gpu_moe.moe_experts(leaves[0], leaves[1], ids, leaves[2], leaves[3])
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref, ref_leaves, local = _reference(x, weights, ids, gate_up, down, dtype=torch.float32)
    ref.backward(grad_out.float())
    names = ("hidden", "topk_weights", "gate_up_proj", "down_proj")
    for name, ours, theirs in zip(names, leaves, ref_leaves, strict=True):
        expected = theirs.grad * local if name == "topk_weights" else theirs.grad
        assert not ours.grad.isnan().any(), name
        assert _rel(ours.grad, expected) < TOL[dtype], name


@pytest.mark.gpu
def test_gpu_decode_captures_into_cuda_graph(gpu_moe):
    # No host sync in the forward: a decode step captures, and replays on new inputs copied in.
    x, weights, ids, gate_up, down = _scout_problem(1, 2, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gpu_moe.moe_experts(x, weights, ids, gate_up, down)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gpu_moe.moe_experts(x, weights, ids, gate_up, down)
    for _ in range(3):
        new_x, new_weights, new_ids, _, _ = _problem(
            1, SCOUT["hidden"], 8, 16, 2, torch.bfloat16, device="cuda"
        )
        x.copy_(new_x)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        ref, _, _ = _reference(x, weights, ids, gate_up, down, dtype=torch.float32)
        assert _rel(out, ref) < TOL[torch.bfloat16]


# ------------------------------------------------- reference path that a CUDA graph can capture (float32 models)
@pytest.mark.parametrize("shape", list(CPU_SHAPES.values()), ids=list(CPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_reference_matches_routed_reference(shape, dtype):
    tokens, hidden, inter, n_experts, top_k = shape
    x, weights, ids, gate_up, down = _problem(tokens, hidden, inter, n_experts, top_k, dtype)
    weights[0, 0] = 0  # a chosen slot with zero weight contributes nothing either way
    expected = reference.moe_experts(x, weights, ids, gate_up, down)
    out = reference.moe_experts_masked(x, weights, ids, gate_up, down)
    assert out.dtype == dtype and out.shape == expected.shape
    assert _rel(out, expected) < (1e-6 if dtype == torch.float32 else 1e-13)


@pytest.mark.gpu
def test_gpu_float32_reference_captures_into_cuda_graph():
    # A float32 model's MoE runs the reference, whose routed loop reads counts on the host; under capture it
    # switches to the masked form, so the decode step still captures and replays on new inputs.
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, weights, ids, gate_up, down = _problem(2, 64, 48, 8, 2, torch.float32, device="cuda")
    reference.moe_experts(x, weights, ids, gate_up, down)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = reference.moe_experts(x, weights, ids, gate_up, down)
    for _ in range(3):
        new_x, new_weights, new_ids, _, _ = _problem(2, 64, 48, 8, 2, torch.float32, device="cuda")
        x.copy_(new_x)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        ref, _, _ = _reference(x, weights, ids, gate_up, down)
        assert _rel(out, ref) < TOL[torch.float32]
