"""Plain-PyTorch references for every kernel op. They define the semantics the Triton kernels must match,
and they are what runs on CPU. They are still written to scale: attention never builds a (seq x seq)
mask for long sequences, and the MoE computes only routed (token, expert) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Query rows per block on the masked (padded / offset) attention path: bounds the mask to
# (batch, block, keys) instead of (batch, seq, seq).
_QUERY_BLOCK = 1024


def attention(
    q: torch.Tensor,  # (batch, n_heads, q_len, head_dim)
    k: torch.Tensor,  # (batch, n_kv_heads, kv_len, head_dim)
    v: torch.Tensor,  # (batch, n_kv_heads, kv_len, head_dim)
    *,
    scale: float,
    chunk_size: int | None = None,
    q_start: int = 0,
    kv_start: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # (batch, n_heads, q_len, head_dim)
    """Causal attention, optionally chunked-local, with grouped-query heads.

    Query ``i`` sits at sequence index ``q_start + i`` of the key sequence (``q_start = kv_len - q_len``
    when earlier keys come from a cache). ``kv_start[b]`` is the index of sequence ``b``'s first real token:
    keys before it are left padding and never attended to, and positions (hence chunk boundaries) count
    from it, as HF does for left-padded batches. With ``chunk_size`` a query sees only earlier keys whose
    position lies in the same ``chunk_size``-aligned chunk. ``q_scale`` (batch, q_len) multiplies the
    queries (NoPE temperature tuning) before the softmax scale. Padding query rows return finite garbage.
    """
    batch, n_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if n_heads % k.shape[1]:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={k.shape[1]}")
    if q_start + q_len > kv_len:
        raise ValueError(f"q_start={q_start} + q_len={q_len} exceeds kv_len={kv_len}")
    if q_scale is not None:
        q = (q * q_scale[:, None, :, None]).to(q.dtype)
    gqa = k.shape[1] != n_heads
    if kv_start is None and q_start == 0 and q_len == kv_len:
        if chunk_size is None or chunk_size >= q_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return _chunked_by_reshape(q, k, v, scale, chunk_size, gqa)
    return _blockwise_masked(q, k, v, scale, chunk_size, q_start, kv_start, gqa)


def _chunked_by_reshape(q, k, v, scale, chunk_size, gqa):
    """Chunked-local attention as plain causal attention over (batch * n_chunks) short sequences."""
    batch, n_heads, seq, head_dim = q.shape
    n_chunks = -(-seq // chunk_size)
    pad = n_chunks * chunk_size - seq

    def fold(x):  # (batch, h, seq, d) -> (batch * n_chunks, h, chunk, d)
        # Padding goes at the end, so under the causal mask no real query ever sees a padded key.
        x = F.pad(x, (0, 0, 0, pad))
        h = x.shape[1]
        return (
            x.view(batch, h, n_chunks, chunk_size, head_dim)
            .transpose(1, 2)
            .reshape(-1, h, chunk_size, head_dim)
        )

    out = F.scaled_dot_product_attention(
        fold(q), fold(k), fold(v), is_causal=True, scale=scale, enable_gqa=gqa
    )
    out = out.view(batch, n_chunks, n_heads, chunk_size, head_dim).transpose(1, 2)
    return out.reshape(batch, n_heads, n_chunks * chunk_size, head_dim)[:, :, :seq]


def _blockwise_masked(q, k, v, scale, chunk_size, q_start, kv_start, gqa):
    batch, n_heads, q_len, head_dim = q.shape
    device = q.device
    if kv_start is None:
        kv_start = torch.zeros(batch, dtype=torch.long, device=device)
    kv_start = kv_start.to(device=device, dtype=torch.long)
    block = min(_QUERY_BLOCK, chunk_size or _QUERY_BLOCK)
    outputs = []
    for i0 in range(0, q_len, block):
        i1 = min(i0 + block, q_len)
        q_idx = torch.arange(q_start + i0, q_start + i1, device=device)  # (block,)
        hi = q_start + i1  # causal: no key past the last query of the block
        lo = 0
        if chunk_size is not None:
            # Earliest key any query of the block can see: the start of its chunk, over the batch.
            first_pos = (q_start + i0 - kv_start).clamp(min=0)
            lo = int((kv_start + first_pos // chunk_size * chunk_size).min())
        k_idx = torch.arange(lo, hi, device=device)  # (keys,)
        allowed = k_idx[None, None, :] <= q_idx[None, :, None]  # (1, block, keys)
        allowed = allowed & (k_idx[None, None, :] >= kv_start[:, None, None])
        if chunk_size is not None:
            q_chunk = (q_idx[None, :] - kv_start[:, None]).div(chunk_size, rounding_mode="floor")
            k_chunk = (k_idx[None, :] - kv_start[:, None]).div(chunk_size, rounding_mode="floor")
            allowed = allowed & (q_chunk[:, :, None] == k_chunk[:, None, :])
        # A padding query has nothing to see; let it see itself so its (ignored) row stays finite.
        allowed = allowed | (k_idx[None, None, :] == q_idx[None, :, None])
        outputs.append(
            F.scaled_dot_product_attention(
                q[:, :, i0:i1],
                k[:, :, lo:hi],
                v[:, :, lo:hi],
                attn_mask=allowed[:, None],
                scale=scale,
                enable_gqa=gqa,
            )
        )
    return torch.cat(outputs, dim=2)


def moe_experts(
    hidden: torch.Tensor,  # (tokens, hidden)
    topk_weights: torch.Tensor,  # (tokens, top_k) routing weights (sigmoid of the chosen router logits)
    topk_ids: torch.Tensor,  # (tokens, top_k) expert index per slot
    gate_up_proj: torch.Tensor,  # (n_experts, hidden, 2 * inter): [gate | up] along the last dim
    down_proj: torch.Tensor,  # (n_experts, inter, hidden)
) -> torch.Tensor:  # (tokens, hidden)
    """Sum over slots of ``expert[id](hidden * weight)``: the routing weight scales the expert INPUT
    (Llama 4), experts are SwiGLU ``down(silu(gate) * up)``. Only routed (token, slot) rows are computed:
    rows are sorted by expert, run as one grouped GEMM (``torch._grouped_mm`` on CUDA) or a loop over
    experts, and un-permuted back; the per-token sum runs in a fixed order (deterministic).
    """
    tokens, hidden_size = hidden.shape
    top_k = topk_ids.shape[1]
    n_experts = gate_up_proj.shape[0]
    if (
        hidden.is_cuda
        and torch.cuda.is_current_stream_capturing()
        and not _grouped_mm_ok(hidden, gate_up_proj, down_proj)
    ):
        # The loop below reads expert counts on the host, which a CUDA graph cannot capture (e.g. a float32
        # model's decode step): run every expert on every token instead, with no data-dependent shapes.
        return moe_experts_masked(hidden, topk_weights, topk_ids, gate_up_proj, down_proj)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # (tokens * top_k,) rows grouped by expert
    token_of_row = order // top_k
    rows = hidden[token_of_row] * topk_weights.reshape(-1)[order, None].to(hidden.dtype)
    # scatter_add rather than bincount: bincount syncs with the host on CUDA, which breaks CUDA graphs.
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat_ids.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    if _grouped_mm_ok(rows, gate_up_proj, down_proj):
        offsets = counts.cumsum(0).to(torch.int32)
        gate_up = torch._grouped_mm(rows, gate_up_proj, offs=offsets)
        gate, up = gate_up.chunk(2, dim=-1)
        expert_out = torch._grouped_mm(F.silu(gate) * up, down_proj, offs=offsets)
    else:
        pieces = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = (rows[start : start + n] @ gate_up_proj[e]).chunk(2, dim=-1)
                pieces.append((F.silu(gate) * up) @ down_proj[e])
            start += n
        expert_out = torch.cat(pieces) if pieces else rows.new_zeros(0, hidden_size)
    unsorted = torch.empty_like(expert_out)
    unsorted[order] = expert_out
    return unsorted.view(tokens, top_k, hidden_size).sum(dim=1)


def moe_experts_masked(hidden, topk_weights, topk_ids, gate_up_proj, down_proj) -> torch.Tensor:
    """:func:`moe_experts` with shapes that do not depend on the routing (CUDA-graph capturable): each expert
    runs on all tokens, whose inputs are scaled by their routing weight for that expert (0 where it was not
    chosen, so those rows contribute exactly 0: SwiGLU has no bias). Costs n_experts x the routed FLOPs; used
    for the few tokens of a captured decode step only. Sums experts in expert order, not slot order."""
    out = torch.zeros_like(hidden)
    for e in range(gate_up_proj.shape[0]):
        weight = (topk_weights * (topk_ids == e)).sum(dim=1, keepdim=True).to(hidden.dtype)
        gate, up = ((hidden * weight) @ gate_up_proj[e]).chunk(2, dim=-1)
        out += (F.silu(gate) * up) @ down_proj[e]
    return out


def _grouped_mm_ok(rows, gate_up_proj, down_proj) -> bool:
    return (
        hasattr(torch, "_grouped_mm")
        and rows.is_cuda
        and rows.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(rows.device) >= (9, 0)
        and all(d % 16 == 0 for d in (*gate_up_proj.shape[1:], down_proj.shape[1]))
    )


# FP8 KV cache (e4m3, the global layers' optional storage; scout_mm.cache): one power-of-two scale per stored row
# (a token's key or value of one kv head). A power of two keeps dequantisation exact (an e4m3 value times 2^e is
# exact in fp32 and bf16), so every path that reads the cache sees the same dequantised keys and values.
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = 448.0  # largest finite e4m3fn value, 1.75 * 2^8
FP8_KV_EXP_RANGE = (-110, 120)  # the scale's exponent is clamped here (an all-zero row gets 2^-110)


def fp8_kv_scale(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``s`` with ``max|x| <= 448 s`` per row (last dim), as fp32 ``(*x.shape[:-1])``.

    Computed on the bits of ``max|x|`` (no division, so the Triton write kernel gets the same scale): with
    ``max|x| = m 2^E``, ``m`` in [1, 2), the exponent is ``E - 8``, one more when ``m > 1.75``."""
    amax = x.float().abs().amax(-1)
    bits = amax.view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    exp = exp.clamp(*FP8_KV_EXP_RANGE)
    return ((exp + 127) << 23).view(torch.float32)


def check_kv_scales(k, v, k_scale, v_scale, names=("k_scale", "v_scale"), contiguous: bool = False) -> bool:
    """True for an FP8 cache: e4m3 ``k`` and ``v`` with fp32 scales shaped as them without the last dim (and
    contiguous, if asked); False for a cache of any other dtype, which takes no scales. Raises otherwise, naming
    the argument (``names``: what the caller calls the two scales)."""
    fp8 = k.dtype == FP8_KV_DTYPE
    given = (k_scale is not None, v_scale is not None)
    if v.dtype != k.dtype or given != (fp8, fp8):
        raise ValueError(
            f"k {k.dtype}, v {v.dtype} with {names[0]} / {names[1]} given: {given[0]} / {given[1]}; an {FP8_KV_DTYPE}"
            f" cache needs {names[0]} and {names[1]} (pass both {names[0]} and {names[1]} with it, neither with "
            "any other cache)"
        )
    for name, scale in zip(names, (k_scale, v_scale), strict=True) if fp8 else ():
        if (
            scale.dtype != torch.float32
            or scale.shape != k.shape[:-1]
            or (contiguous and not scale.is_contiguous())
        ):
            raise ValueError(
                f"KV scales: {name} {tuple(scale.shape)} {scale.dtype}; expected {'contiguous ' * contiguous}float32 "
                f"{tuple(k.shape)[:-1]}"
            )
    return fp8


def quantize_kv_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., head_dim)`` -> (e4m3 values, fp32 scales ``(...)``): ``x / scale`` rounded to nearest even."""
    scale = fp8_kv_scale(x)
    return (x.float() / scale[..., None]).to(FP8_KV_DTYPE), scale


def dequantize_kv(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 values times their row's scale (exact in fp32), cast to ``dtype`` (exact for bf16)."""
    if dtype in (torch.bfloat16, torch.float32):
        # the same numbers without an fp32 temporary (a long prompt's gathered keys are gigabytes): a 4-bit
        # significand times a power of two in fp32's exponent range is exact in either dtype
        return values.to(dtype) * scale.to(dtype)[..., None]
    return (values.float() * scale[..., None]).to(dtype)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    kv_lens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of :func:`scout_mm.kernels.flash_decode.decode_attention` (layouts there): gathers the
    paged blocks, then a masked softmax in fp32. An FP8 cache (``k_scale`` / ``v_scale``: its rows' scales, the
    layout of ``k`` / ``v`` without the last dim) is first dequantised to q's dtype (:func:`dequantize_kv`)."""
    batch, n_heads, q_len, head_dim = q.shape
    if check_kv_scales(k, v, k_scale, v_scale):
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    if block_table is not None:
        # (batch, max_blocks, block_size, n_kv_heads, d) -> (batch, n_kv_heads, capacity, d)
        k = k[block_table.long()].flatten(1, 2).transpose(1, 2)
        v = v[block_table.long()].flatten(1, 2).transpose(1, 2)
    capacity = k.shape[2]
    if q_scale is not None:
        q = (q * q_scale[:, None, :, None]).to(q.dtype)  # fp32 product, rounded once (as HF and prefill)
    lens = kv_lens.long() if kv_lens is not None else torch.full((batch,), capacity, device=q.device)
    starts = (
        kv_start.long() if kv_start is not None else torch.zeros(batch, dtype=torch.long, device=q.device)
    )
    group = n_heads // k.shape[1]
    keys = torch.arange(capacity, device=q.device)
    t = lens[:, None] - q_len + torch.arange(q_len, device=q.device)  # (batch, q_len)
    visible = (keys[None, None, :] <= t[:, :, None]) & (keys[None, None, :] >= starts[:, None, None])
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", probs, vf)
    return out.to(q.dtype), lse
