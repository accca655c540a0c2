"""Fused MoE experts in Triton (Llama 4 semantics): forward and backward, no host sync.

Same function as :func:`scout_mm.kernels.reference.moe_experts`: the routing weight scales the expert
INPUT, experts are SwiGLU ``down(silu(gate) * up)`` with a fused ``[gate | up]`` projection, the output is
summed over the top-k slots. Ids outside ``[0, n_experts)`` mark slots routed to experts that are not local
(expert parallelism): they contribute nothing and get zero gradient.

Forward, four launches whose grids depend on shapes only (so decode steps capture into CUDA graphs):
1. ``_route_kernel``: one program per expert counts the rows of every expert and writes its own (token, slot)
   rows, in order, into a padded sorted layout where each expert's rows are padded to a multiple of
   ``route_block``; so every block of rows belongs to one expert (``block_expert``, -1 past the end).
2. ``_gate_up_kernel``: grouped GEMM of the token rows, gathered through the sorted layout (no permuted
   copy), with the routing-weight scaling and SwiGLU in the epilogue -> ``h`` (sorted rows, inter).
3. ``_rows_gemm_kernel``: grouped GEMM ``h @ down[e]``, each row stored at its (token, slot) position.
4. ``_combine_kernel``: per-token sum over slots in a fixed order (deterministic); skipped for top-1.

Backward: ``_down_bwd_kernel`` (grad of h, SwiGLU backward and the routing-weight grad in its epilogue),
``_rows_gemm_kernel`` again for the input grad, ``_expert_grad_kernel`` for both expert weight grads.
Few tokens (decode) use the same kernels with small row blocks and narrow, deep-pipelined weight tiles,
so each touched expert weight is read once, spread over many programs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from scout_mm.kernels import moe_configs

# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row blocks run over the same column tiles together (L2 reuse)."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _expert_tile(block_expert_ptr, num_row_blocks, size_n, ROUTE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    """This program's tile of a grouped GEMM over the sorted rows: (expert (int64; < 0 for a block past the
    used rows: the caller returns), its BLOCK_M sorted rows, its column tile)."""
    pid_m, pid_n = _tile(tl.program_id(0), num_row_blocks, tl.cdiv(size_n, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m * BLOCK_M // ROUTE_BLOCK).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return expert, rows, pid_n


@triton.jit
def _route_kernel(
    ids_ptr,  # (n_rows,) expert of each (token, slot), row = token * top_k + slot
    sorted_rows_ptr,  # (max_rows,) out: (token, slot) row of each sorted row; n_rows marks padding
    block_expert_ptr,  # (max_rows // ROUTE_BLOCK,) out: expert of each row block, -1 past the last
    expert_start_ptr,  # (n_experts + 1,) out: first sorted row of each expert; last entry = rows used
    n_rows,
    n_experts,
    max_rows,
    ROUTE_BLOCK: tl.constexpr,
    EXPERTS_POW2: tl.constexpr,
    CHUNK: tl.constexpr,
):
    expert = tl.program_id(0)
    experts = tl.arange(0, EXPERTS_POW2)
    counts = tl.zeros([EXPERTS_POW2], dtype=tl.int32)
    for start in range(0, n_rows, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n_rows, other=-1)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    counts = tl.where(experts < n_experts, counts, 0)
    padded = (counts + ROUTE_BLOCK - 1) // ROUTE_BLOCK * ROUTE_BLOCK
    first_row = tl.sum(tl.where(experts < expert, padded, 0), axis=0)
    n_mine = tl.sum(tl.where(experts == expert, counts, 0), axis=0)
    n_mine_padded = tl.sum(tl.where(experts == expert, padded, 0), axis=0)
    tl.store(expert_start_ptr + expert, first_row)

    seen = n_mine * 0
    for start in range(0, n_rows, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n_rows, other=-1)
        mine = (ids == expert).to(tl.int32)
        rank = seen + tl.cumsum(mine, axis=0) - 1  # stable: rows keep (token, slot) order
        tl.store(sorted_rows_ptr + first_row + rank, offs, mask=mine != 0)
        seen += tl.sum(mine, axis=0)
    pad = tl.arange(0, ROUTE_BLOCK)
    tl.store(sorted_rows_ptr + first_row + n_mine + pad, n_rows + pad * 0, mask=pad < n_mine_padded - n_mine)
    first_block = first_row // ROUTE_BLOCK
    end_block = (first_row + n_mine_padded) // ROUTE_BLOCK
    for b in range(first_block, end_block, CHUNK):
        blocks = b + tl.arange(0, CHUNK)
        tl.store(block_expert_ptr + blocks, expert + blocks * 0, mask=blocks < end_block)

    if expert == 0:
        # The tail past the used rows: blocks marked empty, rows marked padding (read by the weight-grad
        # reduction), so no buffer needs a separate fill.
        used = tl.sum(padded, axis=0)
        tl.store(expert_start_ptr + n_experts, used)
        max_blocks = max_rows // ROUTE_BLOCK
        for b in range(used // ROUTE_BLOCK, max_blocks, CHUNK):
            blocks = b + tl.arange(0, CHUNK)
            tl.store(block_expert_ptr + blocks, blocks * 0 - 1, mask=blocks < max_blocks)
        for r in range(used, max_rows, CHUNK):
            rows = r + tl.arange(0, CHUNK)
            tl.store(sorted_rows_ptr + rows, rows * 0 + n_rows, mask=rows < max_rows)


@triton.jit
def _gate_up_kernel(
    x_ptr,  # (tokens, hidden)
    routing_ptr,  # (n_rows,) routing weight of each (token, slot)
    sorted_rows_ptr,
    block_expert_ptr,
    w_ptr,  # (n_experts, hidden, 2 * inter)
    h_ptr,  # (max_rows, inter) out: silu(gate) * up, zero on padding rows
    preact_ptr,  # (max_rows, 2 * inter) out if SAVE_PREACT: [x @ gate | x @ up] before the weight scaling
    n_rows,
    top_k,
    hidden_size,
    inter_size,
    stride_x,
    stride_we,
    stride_wk,
    stride_wn,
    stride_h,
    stride_p,
    num_row_blocks,
    ROUTE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    SAVE_PREACT: tl.constexpr,
):
    expert, rows, pid_n = _expert_tile(
        block_expert_ptr, num_row_blocks, inter_size, ROUTE_BLOCK, BLOCK_M, BLOCK_N, GROUP_M
    )
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    flat = tl.load(sorted_rows_ptr + rows)
    valid = flat < n_rows
    token = (flat // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < inter_size
    a_ptrs = x_ptr + token[:, None] * stride_x + offs_k[None, :]
    gate_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    up_ptrs = gate_ptrs + inter_size * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            b_gate = tl.load(gate_ptrs, mask=n_ok[None, :], other=0.0)
            b_up = tl.load(up_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < hidden_size - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            b_gate = tl.load(gate_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            b_up = tl.load(up_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_gate = tl.dot(a, b_gate, acc_gate)
        acc_up = tl.dot(a, b_up, acc_up)
        a_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk

    # (w * x) @ W == w * (x @ W): scaling the fp32 accumulator is exact and cheaper than scaling inputs.
    weight = tl.load(routing_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    gate = acc_gate * weight[:, None]
    up = acc_up * weight[:, None]
    h = gate * tl.sigmoid(gate) * up
    rows64 = rows.to(tl.int64)
    tl.store(
        h_ptr + rows64[:, None] * stride_h + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=n_ok[None, :]
    )
    if SAVE_PREACT:
        p_ptrs = preact_ptr + rows64[:, None] * stride_p + offs_n[None, :]
        tl.store(p_ptrs, acc_gate.to(preact_ptr.dtype.element_ty), mask=n_ok[None, :])
        tl.store(p_ptrs + inter_size, acc_up.to(preact_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _rows_gemm_kernel(
    a_ptr,  # (max_rows, K) sorted rows
    sorted_rows_ptr,
    block_expert_ptr,
    w_ptr,  # per expert (K, N) through strides: down (forward) or gate_up transposed (backward)
    out_ptr,  # (n_rows, N): row = token * top_k + slot
    n_rows,
    size_k,
    size_n,
    stride_a,
    stride_we,
    stride_wk,
    stride_wn,
    stride_out,
    num_row_blocks,
    ROUTE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    expert, rows, pid_n = _expert_tile(
        block_expert_ptr, num_row_blocks, size_n, ROUTE_BLOCK, BLOCK_M, BLOCK_N, GROUP_M
    )
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < size_n
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_a + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, size_k, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < size_k - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    flat = tl.load(sorted_rows_ptr + rows)
    o_ptrs = out_ptr + flat.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(flat < n_rows)[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(
    rows_ptr,  # (tokens * TOP_K, hidden)
    ids_ptr,  # (tokens * TOP_K,)
    out_ptr,  # (tokens, hidden)
    hidden_size,
    n_experts,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < hidden_size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + token * TOP_K + slot)
        local = (expert >= 0) & (expert < n_experts)  # rows of non-local slots were never written
        acc += tl.load(rows_ptr + (token * TOP_K + slot) * hidden_size + offs, mask=ok & local, other=0.0)
    tl.store(out_ptr + token * hidden_size + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _down_bwd_kernel(
    grad_out_ptr,  # (tokens, hidden)
    routing_ptr,
    sorted_rows_ptr,
    block_expert_ptr,
    w_ptr,  # (n_experts, inter, hidden): read transposed
    preact_ptr,  # (max_rows, 2 * inter) from the forward
    grad_preact_ptr,  # (max_rows, 2 * inter) out: grads of [x @ gate | x @ up]
    partial_ptr,  # (max_rows, cdiv(inter, BLOCK_N)) fp32 out: routing-weight grad, per column tile
    n_rows,
    top_k,
    hidden_size,
    inter_size,
    stride_g,
    stride_we,
    stride_wk,
    stride_wn,
    stride_p,
    stride_partial,
    num_row_blocks,
    ROUTE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    expert, rows, pid_n = _expert_tile(
        block_expert_ptr, num_row_blocks, inter_size, ROUTE_BLOCK, BLOCK_M, BLOCK_N, GROUP_M
    )
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    flat = tl.load(sorted_rows_ptr + rows)
    valid = flat < n_rows
    token = (flat // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < inter_size
    a_ptrs = grad_out_ptr + token[:, None] * stride_g + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    grad_h = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < hidden_size - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        grad_h = tl.dot(a, b, grad_h)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk

    rows64 = rows.to(tl.int64)
    p_ptrs = preact_ptr + rows64[:, None] * stride_p + offs_n[None, :]
    gate0 = tl.load(p_ptrs, mask=n_ok[None, :], other=0.0).to(tl.float32)
    up0 = tl.load(p_ptrs + inter_size, mask=n_ok[None, :], other=0.0).to(tl.float32)
    weight = tl.load(routing_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    gate = gate0 * weight[:, None]
    up = up0 * weight[:, None]
    sig = tl.sigmoid(gate)
    grad_up = grad_h * gate * sig
    grad_gate = grad_h * up * sig * (1.0 + gate * (1.0 - sig))
    # h = silu(w * gate0) * (w * up0), so dh/dw = silu'(gate) * gate0 * up + silu(gate) * up0.
    partial = tl.sum(grad_gate * gate0 + grad_up * up0, axis=1)
    tl.store(partial_ptr + rows64 * stride_partial + pid_n, partial)
    g_ptrs = grad_preact_ptr + rows64[:, None] * stride_p + offs_n[None, :]
    tl.store(g_ptrs, (grad_gate * weight[:, None]).to(grad_preact_ptr.dtype.element_ty), mask=n_ok[None, :])
    tl.store(
        g_ptrs + inter_size,
        (grad_up * weight[:, None]).to(grad_preact_ptr.dtype.element_ty),
        mask=n_ok[None, :],
    )


@triton.jit
def _expert_grad_kernel(
    a_ptr,  # rows of A: the sorted rows themselves, or token rows gathered through them (GATHER_A)
    b_ptr,  # rows of B: likewise (GATHER_B)
    sorted_rows_ptr,
    expert_start_ptr,
    out_ptr,  # (n_experts, P, Q) = per expert sum over its rows of A[row, :]^T B[row, :]
    n_rows,
    top_k,
    size_p,
    size_q,
    stride_a,
    stride_b,
    stride_oe,
    stride_op,
    GATHER_A: tl.constexpr,
    GATHER_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    expert = tl.program_id(1)
    pid_p, pid_q = _tile(tl.program_id(0), tl.cdiv(size_p, BLOCK_P), tl.cdiv(size_q, BLOCK_Q), GROUP_M)
    start = tl.load(expert_start_ptr + expert)
    end = tl.load(expert_start_ptr + expert + 1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < size_p
    q_ok = offs_q < size_q
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    # An expert's padded row range is a multiple of the route block, which BLOCK_R divides: no row mask
    # is needed; padding rows hold zeros (contiguous operands) or are masked (gathered ones).
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        flat = tl.load(sorted_rows_ptr + rows)
        valid = flat < n_rows
        token = (flat // top_k).to(tl.int64)
        if GATHER_A:
            a = tl.load(
                a_ptr + token[None, :] * stride_a + offs_p[:, None],
                mask=p_ok[:, None] & valid[None, :],
                other=0.0,
            )
        else:
            a = tl.load(
                a_ptr + rows.to(tl.int64)[None, :] * stride_a + offs_p[:, None], mask=p_ok[:, None], other=0.0
            )
        if GATHER_B:
            b = tl.load(
                b_ptr + token[:, None] * stride_b + offs_q[None, :],
                mask=valid[:, None] & q_ok[None, :],
                other=0.0,
            )
        else:
            b = tl.load(
                b_ptr + rows.to(tl.int64)[:, None] * stride_b + offs_q[None, :], mask=q_ok[None, :], other=0.0
            )
        acc = tl.dot(a, b, acc)
    o_ptrs = (
        out_ptr + expert.to(tl.int64) * stride_oe + offs_p[:, None].to(tl.int64) * stride_op + offs_q[None, :]
    )
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fit(block: int, size: int) -> int:
    """Shrink a block to the problem (power of two, at least 16: the smallest tl.dot tile)."""
    return max(16, min(block, triton.next_power_of_2(size)))


def _launch_opts(cfg: dict) -> dict:
    return {} if _interpreting() else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


class Routing:
    """Sorted, padded row layout of one MoE call (see ``_route_kernel``)."""

    def __init__(self, topk_ids: torch.Tensor, n_experts: int, route_block: int):
        tokens, top_k = topk_ids.shape
        self.n_rows = tokens * top_k
        self.top_k = top_k
        self.n_experts = n_experts
        self.route_block = route_block
        # Shape-only bound on the padded rows: each non-empty expert adds under one block of padding.
        max_rows = self.n_rows + min(n_experts, self.n_rows) * (route_block - 1)
        self.max_rows = triton.cdiv(max_rows, route_block) * route_block
        device = topk_ids.device
        self.ids = topk_ids.reshape(-1)
        # One allocation for the three index arrays: decode is host-bound, every allocation counts.
        n_blocks = self.max_rows // route_block
        meta = torch.empty(self.max_rows + n_blocks + n_experts + 1, dtype=torch.int32, device=device)
        self.sorted_rows = meta[: self.max_rows]
        self.block_expert = meta[self.max_rows : self.max_rows + n_blocks]
        self.expert_start = meta[self.max_rows + n_blocks :]
        experts_pow2 = triton.next_power_of_2(n_experts)
        chunk = max(16, min(1024, 8192 // experts_pow2, triton.next_power_of_2(self.n_rows)))
        _route_kernel[(n_experts,)](
            self.ids,
            self.sorted_rows,
            self.block_expert,
            self.expert_start,
            self.n_rows,
            n_experts,
            self.max_rows,
            ROUTE_BLOCK=route_block,
            EXPERTS_POW2=experts_pow2,
            CHUNK=chunk,
        )


def _pick_configs(n_rows: int, n_experts: int, hidden_size: int, inter_size: int) -> dict:
    if _interpreting():
        return moe_configs.INTERPRET
    return moe_configs.pick(n_rows / n_experts)


def _gate_up(hidden, routing_weights, route: Routing, gate_up_proj, cfg: dict, save_preact: bool):
    hidden_size = hidden.shape[1]
    inter_size = gate_up_proj.shape[2] // 2
    block_m = cfg["BLOCK_M"]
    block_n = _fit(cfg["BLOCK_N"], inter_size)
    block_k = _fit(cfg["BLOCK_K"], hidden_size)
    h = torch.empty(route.max_rows, inter_size, dtype=hidden.dtype, device=hidden.device)
    preact = torch.empty(
        route.max_rows if save_preact else 1, 2 * inter_size, dtype=hidden.dtype, device=hidden.device
    )
    num_row_blocks = route.max_rows // block_m
    grid = (num_row_blocks * triton.cdiv(inter_size, block_n),)
    _gate_up_kernel[grid](
        hidden,
        routing_weights,
        route.sorted_rows,
        route.block_expert,
        gate_up_proj,
        h,
        preact,
        route.n_rows,
        route.top_k,
        hidden_size,
        inter_size,
        hidden.stride(0),
        *gate_up_proj.stride(),
        h.stride(0),
        preact.stride(0),
        num_row_blocks,
        ROUTE_BLOCK=route.route_block,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=cfg["GROUP_M"],
        EVEN_K=hidden_size % block_k == 0,
        SAVE_PREACT=save_preact,
        **_launch_opts(cfg),
    )
    return h, preact


def _rows_gemm(rows, route: Routing, weight, weight_strides, size_n, out, cfg: dict):
    """out[(token, slot)] = rows[sorted row] @ weight[expert]; weight_strides = (expert, k, n)."""
    size_k = rows.shape[1]
    block_m = cfg["BLOCK_M"]
    block_n = _fit(cfg["BLOCK_N"], size_n)
    block_k = _fit(cfg["BLOCK_K"], size_k)
    num_row_blocks = route.max_rows // block_m
    grid = (num_row_blocks * triton.cdiv(size_n, block_n),)
    _rows_gemm_kernel[grid](
        rows,
        route.sorted_rows,
        route.block_expert,
        weight,
        out,
        route.n_rows,
        size_k,
        size_n,
        rows.stride(0),
        *weight_strides,
        out.stride(0),
        num_row_blocks,
        ROUTE_BLOCK=route.route_block,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=cfg["GROUP_M"],
        EVEN_K=size_k % block_k == 0,
        **_launch_opts(cfg),
    )


def _scatter_rows_and_sum(rows, route: Routing, weight, weight_strides, tokens, size_n, dtype, cfg: dict):
    """Per token, the sum over its local slots of ``rows @ weight[expert]`` (tokens, size_n)."""
    device = rows.device
    if route.top_k == 1:
        # Top-1 writes straight into the output; zeros first, for tokens routed to no local expert.
        out = torch.zeros(tokens, size_n, dtype=dtype, device=device)
        _rows_gemm(rows, route, weight, weight_strides, size_n, out, cfg)
        return out
    per_slot = torch.empty(route.n_rows, size_n, dtype=dtype, device=device)
    _rows_gemm(rows, route, weight, weight_strides, size_n, per_slot, cfg)
    out = torch.empty(tokens, size_n, dtype=dtype, device=device)
    block = min(1024, triton.next_power_of_2(size_n))
    _combine_kernel[(tokens, triton.cdiv(size_n, block))](
        per_slot, route.ids, out, size_n, route.n_experts, TOP_K=route.top_k, BLOCK=block
    )
    return out


def _down_bwd(grad_out, routing_weights, route: Routing, down_proj, preact, cfg: dict):
    hidden_size = grad_out.shape[1]
    inter_size = down_proj.shape[1]
    block_m = cfg["BLOCK_M"]
    block_n = _fit(cfg["BLOCK_N"], inter_size)
    block_k = _fit(cfg["BLOCK_K"], hidden_size)
    n_tiles = triton.cdiv(inter_size, block_n)
    grad_preact = torch.empty_like(preact)
    partial = torch.empty(route.max_rows, n_tiles, dtype=torch.float32, device=grad_out.device)
    num_row_blocks = route.max_rows // block_m
    stride_we, stride_wi, stride_wh = down_proj.stride()
    _down_bwd_kernel[(num_row_blocks * n_tiles,)](
        grad_out,
        routing_weights,
        route.sorted_rows,
        route.block_expert,
        down_proj,
        preact,
        grad_preact,
        partial,
        route.n_rows,
        route.top_k,
        hidden_size,
        inter_size,
        grad_out.stride(0),
        stride_we,
        stride_wh,  # k runs over hidden
        stride_wi,  # n runs over inter
        preact.stride(0),
        partial.stride(0),
        num_row_blocks,
        ROUTE_BLOCK=route.route_block,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=cfg["GROUP_M"],
        EVEN_K=hidden_size % block_k == 0,
        **_launch_opts(cfg),
    )
    return grad_preact, partial


def _expert_grad(a, gather_a, b, gather_b, route: Routing, out, cfg: dict):
    size_p, size_q = out.shape[1], out.shape[2]
    block_p = _fit(cfg["BLOCK_P"], size_p)
    block_q = _fit(cfg["BLOCK_Q"], size_q)
    block_r = min(cfg["BLOCK_R"], route.route_block)
    grid = (triton.cdiv(size_p, block_p) * triton.cdiv(size_q, block_q), route.n_experts)
    _expert_grad_kernel[grid](
        a,
        b,
        route.sorted_rows,
        route.expert_start,
        out,
        route.n_rows,
        route.top_k,
        size_p,
        size_q,
        a.stride(0),
        b.stride(0),
        out.stride(0),
        out.stride(1),
        GATHER_A=gather_a,
        GATHER_B=gather_b,
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        BLOCK_R=block_r,
        GROUP_M=cfg["GROUP_M"],
        **_launch_opts(cfg),
    )


# ----------------------------------------------------------------------------------------------------------
# Forward / backward and the autograd wrapper
# ----------------------------------------------------------------------------------------------------------


def _check(hidden, topk_weights, topk_ids, gate_up_proj, down_proj):
    tokens, hidden_size = hidden.shape
    n_experts, inter_size, _ = down_proj.shape
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != tokens:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)}; expected both "
            f"({tokens}, top_k)"
        )
    if gate_up_proj.shape != (n_experts, hidden_size, 2 * inter_size):
        raise ValueError(
            f"gate_up_proj {tuple(gate_up_proj.shape)}; expected {(n_experts, hidden_size, 2 * inter_size)} "
            f"from hidden {tuple(hidden.shape)} and down_proj {tuple(down_proj.shape)}"
        )
    if gate_up_proj.stride(2) != 1 or down_proj.stride(2) != 1:
        raise ValueError("expert weights need a contiguous last dim")


def _forward(hidden, topk_weights, topk_ids, gate_up_proj, down_proj, save: bool):
    tokens, hidden_size = hidden.shape
    n_experts, inter_size, _ = down_proj.shape
    cfg = _pick_configs(topk_ids.numel(), n_experts, hidden_size, inter_size)
    route = Routing(topk_ids, n_experts, cfg["route_block"])
    h, preact = _gate_up(hidden, topk_weights, route, gate_up_proj, cfg["gate_up"], save)
    out = _scatter_rows_and_sum(
        h, route, down_proj, down_proj.stride(), tokens, hidden_size, hidden.dtype, cfg["down"]
    )
    return out, route, h, preact, cfg


def _backward(grad_out, hidden, topk_weights, gate_up_proj, down_proj, route, h, preact, cfg, needs):
    need_hidden, need_weights, need_gate_up, need_down = needs
    tokens = hidden.shape[0]
    grad_hidden = grad_weights = grad_gate_up = grad_down = None
    if need_down:
        grad_down = torch.empty_like(down_proj)
        _expert_grad(h, False, grad_out, True, route, grad_down, cfg["wgrad"])
    if need_hidden or need_weights or need_gate_up:
        grad_preact, partial = _down_bwd(grad_out, topk_weights, route, down_proj, preact, cfg["down_bwd"])
        if need_weights:
            # Deterministic: per-tile partial sums reduced in a fixed order, then placed per (token, slot);
            # padding rows all land on the spare last entry.
            per_row = torch.zeros(route.n_rows + 1, dtype=torch.float32, device=hidden.device)
            per_row.scatter_(0, route.sorted_rows.long(), partial.sum(dim=1))
            grad_weights = per_row[: route.n_rows].view(topk_weights.shape).to(topk_weights.dtype)
        if need_hidden:
            stride_we, stride_wh, stride_wj = gate_up_proj.stride()
            grad_hidden = _scatter_rows_and_sum(
                grad_preact,
                route,
                gate_up_proj,
                (stride_we, stride_wj, stride_wh),  # transposed: k runs over 2 * inter, n over hidden
                tokens,
                hidden.shape[1],
                hidden.dtype,
                cfg["dx"],
            )
        if need_gate_up:
            grad_gate_up = torch.empty_like(gate_up_proj)
            _expert_grad(hidden, True, grad_preact, False, route, grad_gate_up, cfg["wgrad"])
    return grad_hidden, grad_weights, grad_gate_up, grad_down


class MoEExperts(torch.autograd.Function):
    """Routed SwiGLU experts; backward gives grads of hidden, routing weights and both expert weights."""

    @staticmethod
    def forward(ctx, hidden, topk_weights, topk_ids, gate_up_proj, down_proj):
        save = any(ctx.needs_input_grad)
        out, route, h, preact, cfg = _forward(hidden, topk_weights, topk_ids, gate_up_proj, down_proj, save)
        if save:
            ctx.save_for_backward(hidden, topk_weights, gate_up_proj, down_proj, h, preact)
            ctx.route, ctx.cfg = route, cfg
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, topk_weights, gate_up_proj, down_proj, h, preact = ctx.saved_tensors
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            ctx.needs_input_grad[3],
            ctx.needs_input_grad[4],
        )
        grads = _backward(
            grad_out.contiguous(),
            hidden,
            topk_weights,
            gate_up_proj,
            down_proj,
            ctx.route,
            h,
            preact,
            ctx.cfg,
            needs,
        )
        grad_hidden, grad_weights, grad_gate_up, grad_down = grads
        return grad_hidden, grad_weights, None, grad_gate_up, grad_down


def moe_experts(
    hidden: torch.Tensor,  # (tokens, hidden)
    topk_weights: torch.Tensor,  # (tokens, top_k)
    topk_ids: torch.Tensor,  # (tokens, top_k); ids outside [0, n_experts) are non-local slots
    gate_up_proj: torch.Tensor,  # (n_experts, hidden, 2 * inter)
    down_proj: torch.Tensor,  # (n_experts, inter, hidden)
) -> torch.Tensor:  # (tokens, hidden)
    """Fused Triton version of :func:`scout_mm.kernels.reference.moe_experts` (forward and backward)."""
    _check(hidden, topk_weights, topk_ids, gate_up_proj, down_proj)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(hidden.shape)
    hidden = hidden.contiguous()
    topk_weights = topk_weights.contiguous()
    topk_ids = topk_ids.contiguous()
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, topk_weights, gate_up_proj, down_proj)
    ):
        return MoEExperts.apply(hidden, topk_weights, topk_ids, gate_up_proj, down_proj)
    return _forward(hidden, topk_weights, topk_ids, gate_up_proj, down_proj, save=False)[0]
