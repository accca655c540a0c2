"""Few-token Int4 MoE in ONE persistent launch: gate_up, SwiGLU and down, with no grid boundary in between.

The two-launch decode MoE (:func:`scout_mm.kernels.int4.int4_moe_experts` on the GEMV path) drains the GPU
between its gate_up and down grids: the down launch can read no weight until the last gate_up program has
finished, so each MoE layer pays a launch's ramp-up and tail twice. Here a grid of about as many programs as
the GPU holds at once takes work units from a ticket counter, gate_up units first (ticket order = column
order), then down units. A down unit needs only the SwiGLU columns of its own K split: it loads its first
weight tile, then waits on that split's readiness counter, which the gate_up units that finish those columns
raise. So the down weights start streaming while the last gate_up units (and their split-K epilogues) run.

Numerics are those of the two-launch path, bit for bit: the same K splits, the same split-order sums of the
fp32 partials, the same routing weight on the expert INPUT (``(w x) @ W = w (x @ W)``, applied as a scale of the
fp32 gate and up sums) and the same slot sum (splits, then slots) in the last down program of a column tile.

Progress without deadlock, whatever the number of programs resident: a program takes tickets in increasing
order, gate_up units never wait, and a down unit waits only on gate_up units with smaller tickets, which are
held by programs that are running them (a program holds at most the ticket it works on and the next one).
Under ``TRITON_INTERPRET=1`` the programs run one after another: the first takes every ticket in order.

Scratch (one buffer from :func:`scout_mm.kernels.launch.arrival_counters`, left at zero): the ticket, the
count of finished programs (the last resets the readiness counters and the ticket), the arrival counters of
the gate_up and down column tiles, and the readiness counters of the (row, down split) pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scout_mm.kernels.int4 import (
    _first_tile,
    _gemv_columns,
    _interpreting,
    _launch_opts,
    _n_sms,
    _split,
)
from scout_mm.kernels.launch import arrival_counters, pdl_enabled, pdl_wait_and_trigger


@triton.jit
def _slot_expert(ids_ptr, row, n_experts):
    """(expert, local) of (token, slot) row ``row``: a non-local slot (id outside [0, E)) reads expert 0 over an
    empty K range, so it still takes part in the arrival counts and contributes zero."""
    expert = tl.load(ids_ptr + row).to(tl.int64)
    local = (expert >= 0) & (expert < n_experts)
    return tl.where(local, expert, 0), local


@triton.jit
def _gate_up_unit(
    unit, x_ptr, qw_ptr, s_ptr, z_ptr, ids_ptr, routing_ptr, h_ptr, part_ptr, arrive_ptr, ready_ptr,
    n_rows, n_experts, inter, n_groups, per_split, split_k, down_span, down_split_k,
    stride_qe, stride_se,
    G: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UNPACK: tl.constexpr, PREFETCH: tl.constexpr, EVICT: tl.constexpr, SPLIT_MAX: tl.constexpr,
    TOP_K: tl.constexpr,
):  # fmt: skip
    """Gate and up columns of one (column tile, row, K split) unit; the last split of a (row, tile) sums the
    partials, applies the routing weight and SwiGLU, stores the h columns and raises the readiness counter of
    every down K split those columns fall in."""
    split = unit % split_k
    row = (unit // split_k) % n_rows
    tile = unit // (split_k * n_rows)
    expert, local = _slot_expert(ids_ptr, row, n_experts)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    k_begin = split * per_split * G
    k_end = tl.minimum(k_begin + per_split * G, n_groups * G)
    k_end = tl.where(local, k_end, k_begin)
    a_rows = (row // TOP_K + tl.arange(0, 1)).to(tl.int64)
    size_n = 2 * inter
    qw = qw_ptr + expert * stride_qe
    sp = s_ptr + expert * stride_se
    zp = z_ptr + expert * stride_se
    gate = _gemv_columns(x_ptr, qw, sp, zp, offs_n, n_ok, a_rows, k_begin, k_end, size_n, n_groups * G,
                         G, SYMMETRIC, 1, BLOCK_N, BLOCK_K, UNPACK, PREFETCH, EVICT,
                         qw_ptr, 0, 0, 0, 1, "")  # fmt: skip
    up = _gemv_columns(x_ptr, qw, sp, zp, offs_n + inter, n_ok, a_rows, k_begin, k_end, size_n, n_groups * G,
                       G, SYMMETRIC, 1, BLOCK_N, BLOCK_K, UNPACK, PREFETCH, EVICT,
                       qw_ptr, 0, 0, 0, 1, "")  # fmt: skip
    last = True
    if split_k > 1:
        stride_split = n_rows * size_n
        p_ptrs = part_ptr + row * size_n + offs_n[None, :]
        tl.store(p_ptrs + split * stride_split, gate, mask=n_ok[None, :])
        tl.store(p_ptrs + split * stride_split + inter, up, mask=n_ok[None, :])
        tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
        counter = arrive_ptr + row * tl.cdiv(inter, BLOCK_N) + tile
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        last = arrived == split_k - 1
        if last:
            gate = tl.zeros([1, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([1, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_MAX):  # split order, masked past split_k (as the two-launch path)
                in_split = n_ok[None, :] & (s < split_k)
                gate += tl.load(p_ptrs + s * stride_split, mask=in_split, other=0.0, cache_modifier=".cg")
                up += tl.load(
                    p_ptrs + s * stride_split + inter, mask=in_split, other=0.0, cache_modifier=".cg"
                )
            tl.atomic_xchg(counter, 0)  # ready for the next call (and the next replay of a CUDA graph)
    if last:
        weight = tl.where(local, tl.load(routing_ptr + row).to(tl.float32), 0.0)
        gate = gate * weight
        h = gate * tl.sigmoid(gate) * (up * weight)
        tl.store(h_ptr + row * inter + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])
        tl.debug_barrier()  # the h columns are written before the (release) readiness increments below
        first = (tile * BLOCK_N) // down_span
        final = (tl.minimum(tile * BLOCK_N + BLOCK_N, inter) - 1) // down_span
        for d in range(first, final + 1):
            tl.atomic_add(ready_ptr + row * down_split_k + d, 1, sem="release", scope="gpu")


@triton.jit
def _down_unit(
    unit, qw_ptr, s_ptr, z_ptr, ids_ptr, h_ptr, part_ptr, out_ptr, arrive_ptr, ready_ptr,
    n_rows, n_experts, hidden, inter, n_groups, per_split, split_k, stride_qe, stride_se,
    G: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UNPACK: tl.constexpr, PREFETCH: tl.constexpr, EVICT: tl.constexpr, TOP_K: tl.constexpr,
    GATE_BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Down columns of one (K split, row, column tile) unit: the first weight tile is loaded, then the unit waits
    until every gate_up tile of its K range has stored its h columns. The last unit of a column tile sums the
    splits and the slots of each token into the output."""
    tiles = tl.cdiv(hidden, BLOCK_N)
    tile = unit % tiles
    row = (unit // tiles) % n_rows
    split = unit // (tiles * n_rows)
    expert, local = _slot_expert(ids_ptr, row, n_experts)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    k_begin = split * per_split * G
    k_stop = tl.minimum(k_begin + per_split * G, n_groups * G)
    k_end = tl.where(local, k_stop, k_begin)
    qw = qw_ptr + expert * stride_qe
    first = None
    if PREFETCH:
        first = _first_tile(qw, offs_n, n_ok, k_begin, k_end, hidden, BLOCK_K, EVICT)
    if local:
        # gate_up tiles covering [k_begin, k_stop): each raised this counter once after storing its h columns
        expected = (k_stop - 1) // GATE_BLOCK_N - k_begin // GATE_BLOCK_N + 1
        counter = ready_ptr + row * split_k + split
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while seen < expected:
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    a_rows = (row + tl.arange(0, 1)).to(tl.int64)
    acc = _gemv_columns(h_ptr, qw, s_ptr + expert * stride_se, z_ptr + expert * stride_se, offs_n, n_ok, a_rows,
                        k_begin, k_end, hidden, inter, G, SYMMETRIC, 1, BLOCK_N, BLOCK_K, UNPACK, PREFETCH, EVICT,
                        qw_ptr, 0, 0, 0, 1, ".cg", first)  # fmt: skip
    stride_split = n_rows * hidden
    tl.store(part_ptr + split * stride_split + row * hidden + offs_n[None, :], acc, mask=n_ok[None, :])
    tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
    counter = arrive_ptr + tile
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == n_rows * split_k - 1:
        for token in range(n_rows // TOP_K):
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in range(split_k):
                for slot in tl.static_range(TOP_K):
                    r = token * TOP_K + slot
                    slot_id = tl.load(ids_ptr + r)
                    ok = n_ok & (slot_id >= 0) & (slot_id < n_experts)
                    total += tl.load(part_ptr + s * stride_split + r * hidden + offs_n, mask=ok, other=0.0,
                                     cache_modifier=".cg")  # fmt: skip
            tl.store(out_ptr + token * hidden + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)
        tl.atomic_xchg(counter, 0)


@triton.jit
def _moe_decode_kernel(
    x_ptr, gu_qw, gu_s, gu_z, dn_qw, dn_s, dn_z, ids_ptr, routing_ptr, h_ptr, part1_ptr, part2_ptr, out_ptr,
    sync_ptr, n_rows, n_experts, hidden, inter,
    groups1, per_split1, split1, groups2, per_split2, split2,
    stride_gu_e, stride_gu_se, stride_dn_e, stride_dn_se,
    G: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_K: tl.constexpr, UNPACK: tl.constexpr, PREFETCH: tl.constexpr, EVICT: tl.constexpr, PDL: tl.constexpr,
    SPLIT_MAX1: tl.constexpr, TOP_K: tl.constexpr,
):  # fmt: skip
    """Grid: persistent programs (see the module docstring); BLOCK_N1 / BLOCK_N2: column tiles of gate_up (of
    the SwiGLU output) and of down."""
    pdl_wait_and_trigger(PDL)
    tiles1 = tl.cdiv(inter, BLOCK_N1)
    tiles2 = tl.cdiv(hidden, BLOCK_N2)
    units1 = tiles1 * n_rows * split1
    units = units1 + tiles2 * n_rows * split2
    ticket_ptr = sync_ptr
    done_ptr = sync_ptr + 1
    ready_ptr = sync_ptr + 2
    arrive1_ptr = ready_ptr + n_rows * split2
    arrive2_ptr = arrive1_ptr + n_rows * tiles1
    ticket = tl.atomic_add(ticket_ptr, 1, sem="relaxed", scope="gpu")
    while ticket < units:
        following = tl.atomic_add(ticket_ptr, 1, sem="relaxed", scope="gpu")  # in flight during this unit
        if ticket < units1:
            _gate_up_unit(ticket, x_ptr, gu_qw, gu_s, gu_z, ids_ptr, routing_ptr, h_ptr, part1_ptr, arrive1_ptr,
                          ready_ptr, n_rows, n_experts, inter, groups1, per_split1, split1, per_split2 * G, split2,
                          stride_gu_e, stride_gu_se, G, SYMMETRIC, BLOCK_N1, BLOCK_K, UNPACK, PREFETCH, EVICT,
                          SPLIT_MAX1, TOP_K)  # fmt: skip
        else:
            _down_unit(ticket - units1, dn_qw, dn_s, dn_z, ids_ptr, h_ptr, part2_ptr, out_ptr, arrive2_ptr,
                       ready_ptr, n_rows, n_experts, hidden, inter, groups2, per_split2, split2, stride_dn_e,
                       stride_dn_se, G, SYMMETRIC, BLOCK_N2, BLOCK_K, UNPACK, PREFETCH, EVICT, TOP_K,
                       BLOCK_N1)  # fmt: skip
        ticket = following
    # The last program to finish leaves the ticket, the readiness counters and this count at zero.
    finished = tl.atomic_add(done_ptr, 1, sem="acq_rel", scope="gpu")
    if finished == tl.num_programs(0) - 1:
        for start in range(0, n_rows * split2, 128):
            offs = start + tl.arange(0, 128)
            tl.store(ready_ptr + offs, tl.zeros([128], dtype=tl.int32), mask=offs < n_rows * split2)
        tl.atomic_xchg(ticket_ptr, 0)
        tl.atomic_xchg(done_ptr, 0)


def moe_decode(hidden, topk_weights, topk_ids, gate_up, down, group_size: int, cfg: dict) -> torch.Tensor:
    """(tokens, H): the few-token Int4 MoE of :func:`scout_mm.kernels.int4.int4_moe_experts` (GEMV config
    ``cfg``, one row per program) in one launch. Inputs are already checked and contiguous."""
    (gu_qw, gu_s, gu_z), (dn_qw, dn_s, dn_z) = gate_up, down
    tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    n_rows = tokens * top_k
    n_experts, inter = gu_qw.shape[0], gu_qw.shape[2] // 2
    device = hidden.device
    block_k = cfg["BLOCK_K"]
    # column tiles as in the two-launch path (int4._launch_gemv), so the K splits and sums are the same
    block_n1 = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(inter)))
    block_n2 = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(hidden_size)))
    tiles1, tiles2 = triton.cdiv(inter, block_n1), triton.cdiv(hidden_size, block_n2)
    groups1, groups2 = gu_s.shape[1], dn_s.shape[1]
    cap = cfg.get("split_cap", False)
    split1, per_split1 = _split(groups1, n_rows * tiles1, cfg["occupancy"], block_k, group_size, device, cap)
    split2, per_split2 = _split(groups2, n_rows * tiles2, cfg["occupancy"], block_k, group_size, device, cap)
    units = n_rows * (tiles1 * split1 + tiles2 * split2)
    programs = max(1, min(units, int(cfg.get("persistent_per_sm", 4) * _n_sms(device))))
    h = torch.empty(n_rows, inter, dtype=hidden.dtype, device=device)
    part1 = torch.empty(split1 if split1 > 1 else 0, n_rows, 2 * inter, dtype=torch.float32, device=device)
    part2 = torch.empty(split2, n_rows, hidden_size, dtype=torch.float32, device=device)
    out = torch.empty(tokens, hidden_size, dtype=hidden.dtype, device=device)
    sync = arrival_counters(device, 2 + n_rows * (split2 + tiles1) + tiles2)
    unpack = cfg.get("unpack", 1)
    if unpack == 2 and hidden.dtype == torch.float32:
        unpack = 1  # the in-place FMA-only unpack keeps ~15 bits: too few for fp32 activations
    pdl = 0 if _interpreting() else int(cfg.get("pdl", 0)) or (2 if pdl_enabled(device) else 0)
    symmetric = gu_z is None
    opts = _launch_opts({**cfg, "pdl": pdl})
    _moe_decode_kernel[(programs,)](
        hidden, gu_qw, gu_s, gu_s if symmetric else gu_z, dn_qw, dn_s, dn_s if symmetric else dn_z,
        topk_ids.reshape(-1), topk_weights.reshape(-1), h, part1, part2, out, sync,
        n_rows, n_experts, hidden_size, inter, groups1, per_split1, split1, groups2, per_split2, split2,
        gu_qw.stride(0), gu_s.stride(0), dn_qw.stride(0), dn_s.stride(0),
        G=group_size, SYMMETRIC=symmetric, BLOCK_N1=block_n1, BLOCK_N2=block_n2, BLOCK_K=block_k, UNPACK=unpack,
        PREFETCH=cfg.get("prefetch", False), EVICT=cfg.get("evict", ""), PDL=pdl > 0,
        SPLIT_MAX1=triton.next_power_of_2(split1), TOP_K=top_k, **opts,
    )  # fmt: skip
    return out
