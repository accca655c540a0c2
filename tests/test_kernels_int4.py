"""Int4 W4A16 Triton kernels (``scout_mm.kernels.int4``) vs the dequantize-then-matmul references.

CPU: the kernels run under ``TRITON_INTERPRET=1`` at tiny shapes, in one subprocess (``test_interpreter_suite``,
as in test_kernels_moe.py: Triton reads the variable at import). GPU tests (marked ``gpu``) run the compiled
kernels at Scout shapes in bf16. Inputs are fresh random draws every run.
"""

from __future__ import annotations

import pytest
import torch

import scout_mm.kernels as kernels
from scout_mm.kernels import int4_reference as reference
from scout_mm.quant.format import pack_int4
from tests.helpers import INTERPRETED, interpreter_suite, require_interpreter

test_interpreter_suite = interpreter_suite(__file__, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def int4():
    require_interpreter()
    pytest.importorskip("triton")
    from scout_mm.kernels import int4 as module

    return module


@pytest.fixture(scope="module")
def gpu_int4():
    if not torch.cuda.is_available() or INTERPRETED:
        pytest.skip("needs CUDA")
    from scout_mm.kernels import int4 as module

    return module


def packed_weight(lead, size_k, size_n, group_size, symmetric, device="cpu", scale_dtype=torch.float16):
    """Random codes, scales and zero points in the packed layout (never all-equal codes)."""
    codes = torch.randint(0, 16, (*lead, size_k, size_n), device=device)
    scales = (torch.rand(*lead, size_k // group_size, size_n, device=device) * 0.1 + 0.01) / size_k**0.5
    zeros = None if symmetric else torch.randint(0, 16, scales.shape, device=device).to(scale_dtype)
    return pack_int4(codes), scales.to(scale_dtype), zeros


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (M, K, N, group): M=1/2 take the GEMV kernel, larger M the tl.dot kernel; N ragged (not a tile multiple);
# K tiles spanning several groups, and K splits over programs (the interpreter's config asks for them).
LINEAR_SHAPES = {
    "m1": (1, 64, 40, 32),
    "m1_tail": (1, 96, 40, 32),  # K tiles of 2 groups over 3 groups: a half-masked last tile
    "m2_g64": (2, 128, 24, 64),
    "m3": (3, 64, 48, 32),
    "m17_ragged": (17, 96, 40, 32),
    "m40_g128": (40, 128, 72, 128),
}


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES.values(), ids=LINEAR_SHAPES.keys())
def test_linear_matches_reference(int4, shape, dtype, symmetric):
    m_rows, size_k, size_n, group = shape
    weight = packed_weight((), size_k, size_n, group, symmetric)
    x = torch.randn(m_rows, size_k).to(dtype)
    out = int4.int4_linear(x, *weight, group)
    # The kernels round the dequantized weight to the activation dtype, as the reference does.
    ref = x.double() @ reference.dequantize(*weight, group, dtype).double()
    assert out.dtype == dtype and out.shape == (m_rows, size_n)
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("kind", ["gemv", "gemm_small", "gemm_large"])
def test_every_kernel_at_every_size(int4, kind):
    # Force each kernel on row counts it would not be picked for (a GEMV over 5 rows, a GEMM over 1).
    cfg = int4.INTERPRET[kind]
    for m_rows in (1, 5):
        weight = packed_weight((), 64, 40, 32, symmetric=False)
        x = torch.randn(m_rows, 64)
        ref = x.double() @ reference.dequantize(*weight, 32).double()
        assert rel(int4.int4_linear(x, *weight, 32, config=cfg), ref) < TOL[torch.float32]


@pytest.mark.parametrize("unpack", [0, 1, 2])
@pytest.mark.parametrize("prefetch", [False, True], ids=["load", "prefetch"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gemv_unpack_variants(int4, unpack, prefetch, symmetric):
    # Every code-unpacking form of the GEMV, with and without the register double buffer, over a ragged N,
    # a half-masked last K tile and K splits. unpack=2 keeps ~15 bits: fp16 activations (fp32 falls back to 1).
    cfg = dict(int4.INTERPRET["gemv"], unpack=unpack, prefetch=prefetch, occupancy=16)
    for dtype in (torch.float16, torch.float32):
        weight = packed_weight((), 160, 40, 32, symmetric)
        x = (torch.randn(1, 160) * 4).to(dtype)
        ref = x.double() @ reference.dequantize(*weight, 32, dtype).double()
        assert rel(int4.int4_linear(x, *weight, 32, config=cfg), ref) < TOL[dtype]


@pytest.mark.parametrize("loader", [1, 2], ids=["cp_async", "tma"])
@pytest.mark.parametrize("unpack", [0, 1, 2])
def test_gemv_pipelined_loaders(int4, loader, unpack):
    # The tl.range-pipelined weight loads (pointer loads / tensor descriptor): ragged N, a half-masked last K
    # tile (K = 5 groups in 2-group tiles), K splits, asymmetric and symmetric, and the MoE decode path (gate_up
    # with SwiGLU, down) whose descriptor spans all experts. N = 42 is no multiple of 4: no descriptor fits, the
    # TMA config falls back to the cp.async loads.
    cfg = dict(
        int4.INTERPRET["gemv"], loader=loader, num_stages=3, unpack=unpack, prefetch=False, occupancy=16
    )
    for size_n, symmetric in ((40, False), (42, True)):
        for dtype in (torch.float16, torch.float32):
            weight = packed_weight((), 160, size_n, 32, symmetric)
            x = (torch.randn(1, 160) * 4).to(dtype)
            ref = x.double() @ reference.dequantize(*weight, 32, dtype).double()
            assert rel(int4.int4_linear(x, *weight, 32, config=cfg), ref) < TOL[dtype]
    x, weights, ids, gate_up, down = _moe_problem(1, 160, 96, 4, 2, 32, False, torch.float16)
    out = int4.int4_moe_experts(x, weights, ids, gate_up, down, 32, config=cfg)
    assert rel(out, _moe_reference(x, weights, ids, gate_up, down, 32)) < TOL[torch.float16]


def test_split_rules(int4, monkeypatch):
    # occupancy as a floor (enough programs) or, split_cap, a ceiling (the most splits that stay under it); every
    # split is whole K tiles and the splits cover K.
    monkeypatch.setattr(int4, "_n_sms", lambda device: 132)
    for tiles, n_groups, block_k, group in (
        (256, 40, 256, 128),
        (80, 64, 256, 128),
        (128, 40, 256, 128),
        (7, 96, 64, 32),
    ):
        for occ in (2, 4, 4.25, 8):
            floor_split, floor_per = int4._split(n_groups, tiles, occ, block_k, group, None)
            cap_split, cap_per = int4._split(n_groups, tiles, occ, block_k, group, None, cap=True)
            for split, per in ((floor_split, floor_per), (cap_split, cap_per)):
                assert per % max(1, block_k // group) == 0 and (split - 1) * per < n_groups <= split * per
            assert tiles * cap_split <= max(occ * 132, tiles) and cap_split <= floor_split


def test_least_makespan_split_rule(int4):
    # With 4 programs resident per SM on 132 SMs: the program counts measured fastest on an H100 at the Scout
    # decode shapes (bench_int4.py --sections grid, session 6): q|k|v 448, o 400, gate_up 512, down 560, and
    # inside the decode MoE with 1 / 2 slots 512 + 560 / 512 + 480.
    slots = 4 * 132
    for n_groups, tiles, programs in ((40, 112, 448), (40, 80, 400), (40, 256, 512), (64, 80, 560),
                                      (40, 128, 512), (64, 160, 480)):  # fmt: skip
        split, per = int4._split(n_groups, tiles, 4.25, 256, 128, None, slots=slots)
        assert split * tiles == programs, (n_groups, tiles)
    for n_groups, tiles, step, n_slots in ((40, 7, 1, 8), (96, 3, 2, 16), (5, 1000, 1, 64), (1, 4, 1, 8)):
        split, per = int4._least_makespan_split(n_groups, tiles, step, n_slots, 2.0)
        assert per % step == 0 and (split - 1) * per < n_groups <= split * per
    # one program per slot and equal work: no split of K beats filling every slot once
    assert int4._least_makespan_split(64, 8, 1, 64, 2.0) == (8, 8)


def test_row_dispatch_rules(int4):
    # Shipped GPU configs: the FMA GEMV runs one row per program (its multi-row form measured 4.6-6.5x slower at
    # 2 rows), dense up to GEMV_MAX_ROWS rows; an Int4 MoE takes it only at ~1 row per touched expert (decode),
    # the nibble-dot kernel from 2 rows per expert (32 tokens top-1 measured faster there).
    tuned = int4.TUNED
    assert tuned["gemv"]["rows_per_program"] == 1
    assert int4._moe_route_block(1.0, tuned["gemv"]) == 1 and int4._moe_route_block(4.0, tuned["gemv"]) == 1
    assert int4._moe_route_block(4.0, int4._gemv(16, 64, 4, 1, 4)) == 4  # the multi-row form, when asked for
    for rows, moe, kind in ((1, False, "gemv"), (2, False, "gemv"), (3, False, "gemm"), (1.0, True, "gemv"),
                            (1.4, True, "gemv"), (2.0, True, "gemm"), (8, True, "gemm")):  # fmt: skip
        assert int4.pick_config(rows, moe=moe)["kind"] == kind, (rows, moe)


def test_gemv_by_shape_dispatch_and_fixed_splits(int4, monkeypatch):
    # One-row dense GEMVs at a recorded (N, K) take that shape's overrides of the GEMV config (shipped: 8 warps,
    # no K split at the Scout q|k|v, o and 16384x5120 shapes); two rows, the MoE and other shapes keep the rule.
    table = {(40, 64): {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 2, "split_k": 3}}
    monkeypatch.setitem(int4.INTERPRET, "gemv_by_shape", table)
    picked = int4.pick_config(1, shape=(40, 64))
    assert picked == dict(int4.INTERPRET["gemv"], **table[(40, 64)])
    assert "split_k" not in int4.pick_config(1, shape=(40, 96)) and "split_k" not in int4.pick_config(1)
    assert "split_k" not in int4.pick_config(2, shape=(40, 64))
    assert "split_k" not in int4.pick_config(1.0, moe=True, shape=(40, 64))
    for shape, overrides in int4.TUNED["gemv_by_shape"].items():
        assert set(overrides) <= set(int4.TUNED["gemv"]) | {"split_k", "tail_split", "tail_full_per_sm"}, (
            shape
        )
        assert overrides["BLOCK_K"] % 128 == 0 and shape[1] % overrides["BLOCK_K"] == 0  # whole K tiles
    # a fixed split: whole K tiles, every group in exactly one split, never more splits than asked for
    for n_groups, splits, block_k, group in ((40, 1, 1024, 128), (40, 3, 512, 128), (7, 4, 64, 32), (5, 8, 32, 32),
                                             (64, 6, 256, 128)):  # fmt: skip
        split, per = int4._split(n_groups, 1, 0, block_k, group, None, fixed=splits)
        step = max(1, block_k // group)
        assert per % step == 0 and split <= splits and (split - 1) * per < n_groups <= split * per
    # the kernel with the recorded override, against the reference (ragged N, a masked last K tile)
    for size_k, size_n in ((64, 40), (96, 40)):
        monkeypatch.setitem(int4.INTERPRET, "gemv_by_shape", {(size_n, size_k): table[(40, 64)]})
        for dtype in (torch.float32, torch.float16):
            weight = packed_weight((), size_k, size_n, 32, symmetric=dtype == torch.float16)
            x = torch.randn(1, size_k).to(dtype)
            ref = x.double() @ reference.dequantize(*weight, 32, dtype).double()
            assert rel(int4.int4_linear(x, *weight, 32), ref) < TOL[dtype]


def test_tma_fit_rules(int4):
    weight = packed_weight((), 64, 40, 32, symmetric=True)[0]
    assert int4._tma_fits(weight, 64, 16)
    assert not int4._tma_fits(
        packed_weight((), 64, 42, 32, symmetric=True)[0], 64, 16
    )  # rows not 16-byte aligned
    assert not int4._tma_fits(weight, 4096, 16)  # a tile side over 256 words
    shifted = torch.zeros(weight.numel() + 1, dtype=torch.int32)[1:].view(weight.shape)
    assert not int4._tma_fits(shifted, 64, 16)  # base 4 bytes past a 16-byte boundary


@pytest.mark.parametrize("unrolled", [False, True], ids=["loop", "unrolled"])
@pytest.mark.parametrize("mode", ["linear", "moe"])
def test_gemv_split_k_is_one_launch_and_leaves_counters_at_zero(int4, mode, unrolled):
    from scout_mm.kernels import launch

    # K split over many programs: the last one to finish a tile sums the splits (and, for the MoE gate_up,
    # runs SwiGLU), in a loop or unrolled to a power of two (masked). Two calls in a row: the second sees the
    # counters the first left behind.
    cfg = dict(int4.INTERPRET["gemv"], occupancy=64, reduce_unrolled=unrolled, split_cap=unrolled)
    if unrolled:
        cfg["resident_per_sm"] = 8  # the least-makespan rule: 32 slots on the interpreter's 4 "SMs"
    for _ in range(2):
        if mode == "linear":
            weight = packed_weight((), 256, 40, 32, symmetric=False)
            x = torch.randn(1, 256)
            out = int4.int4_linear(x, *weight, 32, config=cfg)
            ref = x.double() @ reference.dequantize(*weight, 32).double()
        else:
            x, weights, ids, gate_up, down = _moe_problem(2, 128, 96, 4, 2, 32, False, torch.float32)
            out = int4.int4_moe_experts(x, weights, ids, gate_up, down, 32, config=cfg)
            ref = _moe_reference(x, weights, ids, gate_up, down, 32)
        assert rel(out, ref) < TOL[torch.float32]
        assert all(int(buf.abs().sum()) == 0 for buf in launch._COUNTERS.values())


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "size_n,full_per_sm,tail_split", [(200, 1, 3), (200, 1, 4), (40, 0.25, 2), (56, 0.5, 8)]
)
def test_gemv_tail_split(int4, monkeypatch, size_n, full_per_sm, tail_split, dtype, symmetric):
    # One-row dense GEMV with the column tiles past the first wave (tail_full_per_sm whole tiles a "SM", 4 SMs
    # under the interpreter) K-split tail_split ways: whole tiles store directly, tail tiles sum their partials in
    # split order. Ragged N (200 and 56 over 16-wide tiles), K of 8 groups in 2 or 4 splits of whole 2-group K
    # tiles (3 asked gives 2, 8 gives 4), counters left at zero, the same bits on a second call.
    from scout_mm.kernels import launch

    weight = packed_weight((), 256, size_n, 32, symmetric)
    x = torch.randn(1, 256).to(dtype)
    cfg = dict(int4.INTERPRET["gemv"], tail_split=tail_split, tail_full_per_sm=full_per_sm)
    launched = []
    kernel = int4._gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(int4, "_gemv_kernel", Spy())
    outs = [int4.int4_linear(x, *weight, 32, config=cfg) for _ in range(2)]
    full = int(full_per_sm * 4)
    splits = {3: 2, 4: 4, 2: 2, 8: 4}[tail_split]  # whole K tiles (2 groups each): at most 4 splits
    assert launched[0] == (full + (-(-size_n // 16) - full) * splits, 1, 1)  # the TAIL grid ran
    ref = x.double() @ reference.dequantize(*weight, 32, dtype).double()
    assert rel(outs[0], ref) < TOL[dtype]
    assert torch.equal(outs[0], outs[1])
    assert all(int(buf.abs().sum()) == 0 for buf in launch._COUNTERS.values())


def test_gather_rows_kernel(int4):
    table = torch.randn(50, 24)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(int4.gather_rows(table, ids, torch.device("cpu")), table[ids])


def test_dequantize_kernel_is_exact(int4):
    for symmetric in (True, False):
        weight = packed_weight((3,), 64, 40, 32, symmetric)
        assert torch.equal(int4.dequantize(*weight, 32, torch.float32), reference.dequantize(*weight, 32))


def _moe_problem(tokens, hidden, inter, n_experts, top_k, group, symmetric, dtype, device="cpu", ids=None):
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    # Routing weights in [0.25, 1): the weight multiplies the expert INPUT, so a tiny one (rand gave 0.010 in a CI
    # run) puts this small problem's fp16 SwiGLU output (~1e-6) among fp16 subnormals, where one-ulp rounding
    # differences between two correct computations are ~10% of a value (t1_top1-fp16: 1.3% error at w = 0.010,
    # 0.6% at 0.017, <= 0.09% over 60 seeds with w >= 0.25); bf16 has no such range problem.
    weights = (0.25 + 0.75 * torch.rand(tokens, top_k, device=device)).to(dtype)
    if ids is None:
        ids = torch.rand(tokens, n_experts, device=device).argsort(dim=1)[:, :top_k]
    gate_up = packed_weight((n_experts,), hidden, 2 * inter, group, symmetric, device)
    down = packed_weight((n_experts,), inter, hidden, group, symmetric, device)
    return x, weights, ids, gate_up, down


def _moe_reference(x, weights, ids, gate_up, down, group):
    """float64 reference over dequantized weights (rounded to the activation dtype like the kernels), routing
    weight on the expert input; the SwiGLU output is rounded to the activation dtype before the down
    projection, where the kernels store it (without that rounding point a tiny fp16 problem whose output
    norm happens to be small can differ by ~1% with both sides right)."""
    n_experts = gate_up[0].shape[0]
    gu = reference.dequantize(*gate_up, group, x.dtype).double()
    dn = reference.dequantize(*down, group, x.dtype).double()
    inter = dn.shape[1]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            if not 0 <= e < n_experts:  # a slot owned by another rank: contributes nothing here
                continue
            gate, up = ((weights[t, slot].double() * x[t].double()) @ gu[e]).split(inter)
            h = (torch.nn.functional.silu(gate) * up).to(x.dtype).double()
            out[t] += h @ dn[e]
    return out


# (tokens, hidden, inter, n_experts, top_k, group): decode sizes (GEMV path), prefill sizes (tl.dot path).
MOE_SHAPES = {
    "t1_top1": (1, 64, 32, 4, 1, 32),
    "t1_top2": (1, 64, 32, 4, 2, 32),
    "t5_top2_g64": (5, 64, 64, 4, 2, 64),
    "t37_top2": (37, 64, 32, 4, 2, 32),
    "t40_top1_sparse": (40, 32, 32, 8, 1, 32),
}


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", MOE_SHAPES.values(), ids=MOE_SHAPES.keys())
def test_moe_matches_reference(int4, shape, dtype, symmetric):
    *dims, group = shape
    x, weights, ids, gate_up, down = _moe_problem(*dims, group, symmetric, dtype)
    out = int4.int4_moe_experts(x, weights, ids, gate_up, down, group)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel(out, _moe_reference(x, weights, ids, gate_up, down, group)) < TOL[dtype] * 3


def test_moe_routing_weight_scales_the_input(int4):
    # Llama 4: silu(w * x @ gate) * (w * x @ up), not w * expert(x). With w = 0.5 the two differ by far.
    x, weights, ids, gate_up, down = _moe_problem(3, 64, 32, 4, 1, 32, True, torch.float32)
    weights.fill_(0.5)
    out = int4.int4_moe_experts(x, weights, ids, gate_up, down, 32)
    on_output = 0.5 * int4.int4_moe_experts(x, torch.ones_like(weights), ids, gate_up, down, 32)
    assert rel(out, _moe_reference(x, weights, ids, gate_up, down, 32)) < 1e-5
    assert rel(out, on_output) > 0.05


def test_moe_skewed_routing_and_non_local_slots(int4):
    tokens = 21
    ids = torch.stack([torch.ones(tokens, dtype=torch.long), torch.full((tokens,), 3)], dim=1)
    ids[0, :] = -1  # a token routed to no local expert (expert parallelism)
    ids[4, 1] = 9
    x, weights, ids, gate_up, down = _moe_problem(tokens, 32, 32, 4, 2, 32, False, torch.float32, ids=ids)
    out = int4.int4_moe_experts(x, weights, ids, gate_up, down, 32)
    assert (out[0] == 0).all()
    assert rel(out, _moe_reference(x, weights, ids, gate_up, down, 32)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("per_pass,sizes", [(1, [1] * 5), (2, [2, 2, 1]), (3, [3, 2]), (4, [3, 2])])
def test_moe_dequant_in_passes_of_experts(int4, monkeypatch, per_pass, sizes, top_k, dtype):
    # The budget set to ``per_pass`` experts' bytes: the fewest passes, of even size, against one pass over all
    # 5: equal bit for bit up to two slots per token, within rounding with three. Non-local slots (expert
    # parallelism: ids < 0 or >= E) stay non-local in every pass.
    tokens, hidden, inter, n_experts, group = 23, 64, 32, 5, 32
    x, weights, ids, gate_up, down = _moe_problem(
        tokens, hidden, inter, n_experts, top_k, group, False, dtype
    )
    ids[0, 0], ids[1, -1] = -1, n_experts + 2
    one_pass = int4.int4_moe_experts(x, weights, ids, gate_up, down, group, config={"kind": "dequant"})
    expert_bytes = (hidden * 2 * inter + inter * hidden) * torch.finfo(dtype).bits // 8
    monkeypatch.setattr(int4, "MOE_DEQUANT_MAX_BYTES", per_pass * expert_bytes)
    from scout_mm.kernels import moe

    calls = []
    fused = moe.moe_experts
    monkeypatch.setattr(moe, "moe_experts", lambda *args: calls.append(args[3].shape[0]) or fused(*args))
    passes = int4.int4_moe_experts(x, weights, ids, gate_up, down, group, config={"kind": "dequant"})
    assert calls == sizes
    assert passes.dtype == dtype and passes.shape == x.shape
    if top_k <= 2:
        assert torch.equal(passes, one_pass)
    else:
        assert rel(passes, one_pass) < TOL[dtype]
    assert rel(passes, _moe_reference(x, weights, ids, gate_up, down, group)) < TOL[dtype] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 3), (2, 2), (3, 3)])
def test_moe_direct_decode_layout_equals_the_sorted_layout(int4, monkeypatch, tokens, top_k, dtype):
    # Few tokens: rows straight from the routing ids (no routing kernel) and the slot sum inside the down
    # launch must give exactly what the sorted layout + _sum_rows gives (same fp32 order), including a slot
    # owned by another rank, two slots on one expert, K split over programs, and counters left at zero.
    from scout_mm.kernels import launch

    x, weights, ids, gate_up, down = _moe_problem(tokens, 64, 96, 8, top_k, 32, False, dtype)
    if top_k > 1:
        ids[0, 1] = -1 if tokens == 1 else 11  # non-local slot
    if tokens > 1:
        ids[1, :] = ids[0, 0]  # every slot of token 1 on one expert
    cfg = dict(int4.INTERPRET["gemv"], occupancy=16)
    assert int4._moe_route_block(tokens * top_k / min(8, tokens * top_k), cfg) == 1  # the direct path runs
    for _ in range(2):
        direct = int4.int4_moe_experts(x, weights, ids, gate_up, down, 32, config=cfg)
        assert all(int(buf.abs().sum()) == 0 for buf in launch._COUNTERS.values())
    monkeypatch.setattr(int4, "DIRECT_DECODE_MOE", False)
    sorted_layout = int4.int4_moe_experts(x, weights, ids, gate_up, down, 32, config=cfg)
    assert torch.equal(direct, sorted_layout)
    assert rel(direct, _moe_reference(x, weights, ids, gate_up, down, 32)) < TOL[dtype] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 2), (2, 3)])
def test_moe_decode_gate_up_as_one_tile_and_unrolled_slot_sum(int4, tokens, top_k, dtype):
    # The decode gate_up launch streams gate and up columns as ONE tile ("dual") or in two loops, and the down
    # launch's last-arriving program sums the K splits x slots unrolled (reduce_unrolled) or in a loop: every form
    # matches the reference, and the two slot sums are bit-identical (same fp32 order). Ragged column tiles (inter
    # 48 over 32-wide tiles), a masked last K tile in down (K = 48), K split in both launches, a non-local slot.
    x, weights, ids, gate_up, down = _moe_problem(tokens, 64, 48, 5, top_k, 16, dtype == torch.float32, dtype)
    if top_k > 1:
        ids[0, 1] = 7  # owned by another rank
    base = dict(int4.INTERPRET["gemv"], BLOCK_N=32, BLOCK_K=32, split_k=2)
    ref = _moe_reference(x, weights, ids, gate_up, down, 16)
    outs = {}
    for dual in (True, False):
        for unrolled in (True, False):
            cfg = dict(base, dual=dual, reduce_unrolled=unrolled)
            outs[dual, unrolled] = int4.int4_moe_experts(x, weights, ids, gate_up, down, 16, config=cfg)
            assert rel(outs[dual, unrolled], ref) < TOL[dtype] * 3, (dual, unrolled)
    assert torch.equal(outs[True, True], outs[True, False]) and torch.equal(
        outs[False, True], outs[False, False]
    )


def test_moe_gemv_by_shape_dispatch(int4, monkeypatch):
    # The decode MoE takes the overrides recorded for each launch's (N, K, rows); a forced config and other
    # shapes or row counts do not; the recorded Scout table holds whole K tiles of known keys.
    x, weights, ids, gate_up, down = _moe_problem(1, 64, 64, 5, 2, 32, True, torch.float16)
    table = {(128, 64, 2): {"BLOCK_N": 16, "BLOCK_K": 64, "split_k": 1, "dual": False},
             (64, 64, 2): {"BLOCK_N": 16, "BLOCK_K": 32, "split_k": 3}}  # fmt: skip
    monkeypatch.setitem(int4.INTERPRET, "moe_gemv_by_shape", table)
    rule = int4.INTERPRET["gemv"]
    assert int4.moe_gemv_config(rule, gate_up[0], 2) == dict(rule, **table[(128, 64, 2)])
    assert int4.moe_gemv_config(rule, down[0], 2) == dict(rule, **table[(64, 64, 2)])
    assert (
        int4.moe_gemv_config(rule, gate_up[0], 1) is rule and int4.moe_gemv_config(rule, down[0], 3) is rule
    )
    launched = []
    launch_gemv = int4._launch_gemv
    monkeypatch.setattr(int4, "_launch_gemv", lambda *a, **k: launched.append(a[6]) or launch_gemv(*a, **k))
    out = int4.int4_moe_experts(x, weights, ids, gate_up, down, 32)
    assert launched == [dict(rule, **table[(128, 64, 2)]), dict(rule, **table[(64, 64, 2)])]
    assert rel(out, _moe_reference(x, weights, ids, gate_up, down, 32)) < TOL[torch.float16] * 3
    launched.clear()
    int4.int4_moe_experts(x, weights, ids, gate_up, down, 32, config=rule)
    assert launched == [rule, rule]
    for (_, size_k, rows), over in int4.TUNED["moe_gemv_by_shape"].items():
        assert set(over) <= set(int4.TUNED["gemv"]) | {"split_k", "dual"} and rows >= 1
        assert over["BLOCK_K"] % 128 == 0 and size_k % over["BLOCK_K"] == 0  # whole K tiles at group 128


def test_dispatch_runs_triton_when_forced(int4, monkeypatch):
    monkeypatch.setenv("SCOUT_MM_KERNELS", "triton")
    weight = packed_weight((), 64, 40, 32, True)
    x = torch.randn(2, 64)
    assert torch.equal(kernels.int4_linear(x, *weight, 32), int4.int4_linear(x, *weight, 32))


def test_bad_inputs_name_the_values(int4):
    qweight, scales, zeros = packed_weight((), 64, 40, 32, False)
    with pytest.raises(ValueError, match="x shape"):
        int4.int4_linear(torch.randn(2, 32), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match="scales shape"):
        int4.int4_linear(torch.randn(2, 64), qweight, scales, zeros, 64)
    with pytest.raises(ValueError, match="int32"):
        int4.int4_linear(torch.randn(2, 64), qweight.to(torch.int64), scales, zeros, 32)


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("m_rows", [1, 2, 5, 16, 64, 300, 2048])
@pytest.mark.parametrize("size_n, size_k", [(16384, 5120), (5120, 8192)])
def test_gpu_linear_scout_shapes(gpu_int4, m_rows, size_n, size_k):
    weight = packed_weight((), size_k, size_n, 128, symmetric=True, device="cuda", scale_dtype=torch.bfloat16)
    x = torch.randn(m_rows, size_k, device="cuda", dtype=torch.bfloat16)
    out = gpu_int4.int4_linear(x, *weight, 128)
    ref = x.float() @ reference.dequantize(*weight, 128, torch.bfloat16).float()
    assert rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_gemv_recorded_shapes(gpu_int4):
    # Every (N, K) of TUNED["gemv_by_shape"] through the shipped dispatch (one row), plus a ragged N sharing K
    # (the rule's config), against the float reference.
    for size_n, size_k in [*gpu_int4.TUNED["gemv_by_shape"], (5000, 5120)]:
        weight = packed_weight(
            (), size_k, size_n, 128, symmetric=True, device="cuda", scale_dtype=torch.bfloat16
        )
        x = torch.randn(1, size_k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ reference.dequantize(*weight, 128, torch.bfloat16).float()
        assert rel(gpu_int4.int4_linear(x, *weight, 128), ref) < TOL[torch.bfloat16], (size_n, size_k)


GEMV_VARIANTS = {
    "unpack0": dict(unpack=0),
    "unpack1": dict(unpack=1),
    "unpack2": dict(unpack=2),
    "unpack2_prefetch_evict_pdl": dict(unpack=2, prefetch=True, evict="evict_first", pdl=True),
    "unpack1_prefetch_pdl": dict(unpack=1, prefetch=True, pdl=True),
    "tma_unpack2": dict(unpack=2, prefetch=False, loader=2, num_stages=4),
    "tma_unpack1_wide": dict(unpack=1, prefetch=False, loader=2, num_stages=3, BLOCK_N=128, BLOCK_K=256),
    "cp_async_unpack2": dict(unpack=2, prefetch=False, loader=1, num_stages=4),
    "reduce_loop": dict(unpack=2, prefetch=True, reduce_unrolled=False),
    "pdl2_reduce_unrolled": dict(unpack=2, prefetch=True, pdl=2, reduce_unrolled=True),
    "tail_split3": dict(unpack=2, prefetch=True, tail_split=3),
    "tail_split5_32x1024_w8": dict(BLOCK_N=32, BLOCK_K=1024, num_warps=8, split_k=1, tail_split=5),
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", GEMV_VARIANTS.values(), ids=GEMV_VARIANTS.keys())
def test_gpu_gemv_variants(gpu_int4, variant):
    cfg = dict(gpu_int4.TUNED["gemv"], **variant)
    for size_n, size_k, group, symmetric, dtype in [(16384, 5120, 128, True, torch.bfloat16),
                                                    (5120, 8192, 128, True, torch.bfloat16),
                                                    (776, 1024, 64, False, torch.float16),
                                                    (200, 384, 32, False, torch.float32),
                                                    (202, 640, 64, True, torch.float16)]:  # fmt: skip
        scale_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        weight = packed_weight((), size_k, size_n, group, symmetric, device="cuda", scale_dtype=scale_dtype)
        x = torch.randn(1, size_k, device="cuda", dtype=dtype)
        ref = x.double() @ reference.dequantize(*weight, group, dtype).double()
        assert rel(gpu_int4.int4_linear(x, *weight, group, config=cfg), ref) < TOL[dtype]
    x, weights, ids, gate_up, down = _moe_problem(1, 1024, 512, 8, 2, 128, True, torch.bfloat16, "cuda")
    out = gpu_int4.int4_moe_experts(x, weights, ids, gate_up, down, 128, config=cfg)
    assert rel(out, _moe_reference(x.float(), weights.float(), ids, gate_up, down, 128)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("halve", [True, False], ids=["with_kernel_between", "gemv_after_gemv"])
@pytest.mark.parametrize("pdl", [1, 2], ids=["pdl_trigger_first", "pdl_wait_first"])
def test_gpu_gemv_pdl_chain_in_a_graph(gpu_int4, pdl, halve):
    # Programmatic dependent launch: each GEMV reads the previous one's output, so its early start must still
    # wait for it; checked inside a CUDA graph (how decode runs) against the reference chain, with an
    # elementwise kernel between the GEMVs and GEMV straight after GEMV (pdl 1 triggers the next launch before its
    # wait, pdl 2 after it).
    cfg = dict(gpu_int4.TUNED["gemv"], pdl=pdl, prefetch=True)
    factor = 0.5 if halve else 1.0
    weights = [packed_weight((), 2048, 2048, 128, True, device="cuda", scale_dtype=torch.bfloat16)
               for _ in range(4)]  # fmt: skip
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)

    def chain():
        h = x
        for w in weights:
            h = gpu_int4.int4_linear(h, *w, 128, config=cfg)
            h = h * factor if halve else h
        return h

    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        ref = x.float()
        for w in weights:
            ref = (ref @ reference.dequantize(*w, 128, torch.bfloat16).float()).to(
                torch.bfloat16
            ).float() * factor
        assert rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("rows_per_program", [1, 4])
def test_gpu_gemv_rows_per_program(gpu_int4, rows_per_program):
    # Both forms of the FMA GEMV at 2 and 3 rows (dense) and at 2-3 rows per expert (MoE, sorted route blocks
    # and, with one-row blocks, the direct layout), asymmetric fp16 and symmetric bf16.
    cfg = dict(gpu_int4.TUNED["gemv"], rows_per_program=rows_per_program)
    for m_rows, dtype, symmetric in ((2, torch.bfloat16, True), (3, torch.float16, False)):
        weight = packed_weight((), 1024, 776, 64, symmetric, device="cuda", scale_dtype=dtype)
        x = torch.randn(m_rows, 1024, device="cuda", dtype=dtype)
        ref = x.double() @ reference.dequantize(*weight, 64, dtype).double()
        assert rel(gpu_int4.int4_linear(x, *weight, 64, config=cfg), ref) < TOL[dtype]
    for tokens, top_k in ((12, 1), (8, 2)):
        x, weights, ids, gate_up, down = _moe_problem(
            tokens, 1024, 512, 4, top_k, 128, True, torch.bfloat16, "cuda"
        )
        out = gpu_int4.int4_moe_experts(x, weights, ids, gate_up, down, 128, config=cfg)
        ref = _moe_reference(x.float(), weights.float(), ids, gate_up, down, 128)
        assert rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gemv", "gemm_small", "gemm_medium", "gemm_large", "dequant"])
def test_gpu_every_path_asymmetric_fp16(gpu_int4, kind):
    cfg = {"kind": "dequant"} if kind == "dequant" else gpu_int4.TUNED[kind]
    for m_rows in (1, 7, 130):
        weight = packed_weight((), 1024, 776, 64, symmetric=False, device="cuda")
        x = torch.randn(m_rows, 1024, device="cuda", dtype=torch.float16)
        ref = x.float() @ reference.dequantize(*weight, 64, torch.float16).float()
        assert rel(gpu_int4.int4_linear(x, *weight, 64, config=cfg), ref) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["auto", "gemv", "gemm_small", "gemm_medium", "gemm_large", "dequant"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_every_path_with_subnormal_fp16_scales(gpu_int4, kind, dtype):
    """fp16 scales below fp16's smallest normal, as quantizing a group of max |w| < ~4e-4 now stores them (the
    quantizer floored them at 6.1e-5 before): every path still equals the reference."""
    cfg = None if kind == "auto" else {"kind": "dequant"} if kind == "dequant" else gpu_int4.TUNED[kind]
    for m_rows in (1, 2, 7, 16, 130, 300):
        for symmetric in (True, False):
            qweight, _, zeros = packed_weight((), 1024, 776, 64, symmetric=symmetric, device="cuda")
            scales = (torch.rand(1024 // 64, 776, device="cuda") * 5e-5 + 1e-7).half()
            assert (scales < torch.finfo(torch.float16).tiny).float().mean() > 0.9
            x = torch.randn(m_rows, 1024, device="cuda", dtype=dtype)
            ref = x.float() @ reference.dequantize(qweight, scales, zeros, 64, dtype).float()
            out = gpu_int4.int4_linear(x, qweight, scales, zeros, 64, config=cfg)
            assert rel(out, ref) < TOL[dtype], (m_rows, symmetric)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, top_k", [(1, 1), (1, 2), (16, 1), (32, 1), (64, 2), (512, 1), (4096, 1)])
def test_gpu_moe_scout_shapes(gpu_int4, tokens, top_k):
    hidden, inter, n_experts, group = 5120, 8192, 16, 128
    x, weights, ids, gate_up, down = _moe_problem(tokens, hidden, inter, n_experts, top_k, group, True,
                                                  torch.bfloat16, "cuda")  # fmt: skip
    out = gpu_int4.int4_moe_experts(x, weights, ids, gate_up, down, group)
    gu = reference.dequantize(*gate_up, group, torch.bfloat16)
    dn = reference.dequantize(*down, group, torch.bfloat16)
    from scout_mm.kernels.reference import moe_experts

    ref = moe_experts(x.float(), weights.float(), ids, gu.float(), dn.float())
    assert rel(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_moe_dequant_path_and_graph_capture(gpu_int4):
    x, weights, ids, gate_up, down = _moe_problem(4, 1024, 512, 8, 2, 64, False, torch.bfloat16, "cuda")
    ref = _moe_reference(x.float(), weights.float(), ids, gate_up, down, 64)
    forced = gpu_int4.int4_moe_experts(x, weights, ids, gate_up, down, 64, config={"kind": "dequant"})
    assert rel(forced, ref) < TOL[torch.bfloat16]
    # Decode step: no host sync, so it captures into a CUDA graph and replays with new inputs.
    step = lambda: gpu_int4.int4_moe_experts(x, weights, ids, gate_up, down, 64)
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    ids.copy_(torch.rand(4, 8, device="cuda").argsort(dim=1)[:, :2])
    graph.replay()
    assert rel(out, _moe_reference(x.float(), weights.float(), ids, gate_up, down, 64)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("top_k", [1, 2])
def test_gpu_moe_dequant_passes_equal_one_pass(gpu_int4, monkeypatch, top_k):
    # The long-prompt path as Scout runs it (17 experts, >= 256 rows per expert, bf16, the tuned fused-MoE
    # configs): passes of 6 + 6 + 5 experts give the same bits as one pass.
    tokens, hidden, inter, n_experts, group = 8192, 512, 1024, 17, 128
    x, weights, ids, gate_up, down = _moe_problem(
        tokens, hidden, inter, n_experts, top_k, group, True, torch.bfloat16, "cuda"
    )
    ids[:5, 0] = -1  # non-local slots stay non-local in every pass
    assert tokens * top_k / n_experts >= gpu_int4.TUNED["MOE_DEQUANT_MIN_ROWS_PER_EXPERT"]
    monkeypatch.setattr(gpu_int4, "MOE_DEQUANT_MAX_BYTES", 1 << 62)
    one_pass = gpu_int4.int4_moe_experts(x, weights, ids, gate_up, down, group)
    expert_bytes = 3 * hidden * inter * 2
    monkeypatch.setattr(gpu_int4, "MOE_DEQUANT_MAX_BYTES", 6 * expert_bytes)
    passes = gpu_int4.int4_moe_experts(x, weights, ids, gate_up, down, group)
    assert torch.equal(passes, one_pass)
    # the reference takes local ids only: a non-local slot is a slot of weight 0 (SwiGLU(0) = 0)
    local_weights = weights.float().masked_fill(ids < 0, 0.0)
    expected = reference.int4_moe_experts(x.float(), local_weights, ids.clamp(min=0), gate_up, down, group)
    assert rel(passes, expected) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_gather_rows_from_pinned_host_table_in_a_graph(gpu_int4):
    # The table stays in pinned host memory; the kernel reads it over the bus, also inside a CUDA graph.
    table = torch.randn(1000, 5120, dtype=torch.bfloat16).pin_memory()
    ids = torch.randint(0, 1000, (1, 1), device="cuda")
    assert torch.equal(gpu_int4.gather_rows(table, ids, ids.device).cpu(), table[ids.cpu()])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gpu_int4.gather_rows(table, ids, ids.device)
    ids.copy_(torch.randint(0, 1000, (1, 1), device="cuda"))
    graph.replay()
    assert torch.equal(out.cpu(), table[ids.cpu()])
    prompt = torch.randint(0, 1000, (2, 333), device="cuda")
    assert torch.equal(gpu_int4.gather_rows(table, prompt, prompt.device).cpu(), table[prompt.cpu()])
    with pytest.raises(ValueError, match="pinned"):
        gpu_int4.gather_rows(torch.randn(10, 8), ids, ids.device)
