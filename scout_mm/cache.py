"""KV caches built for iRoPE.

- Chunked (RoPE) layers only ever attend within their current ``attention_chunk_size`` chunk, so they keep
  a ring of at most one chunk per sequence, ``(batch, ring_rows, n_kv_heads, head_dim)``: position ``p`` lives
  in slot ``p % chunk``. Chunks are aligned to positions, so the keys a token can see are always the
  prefix ``[0, p % chunk]`` of its ring. This memory does not grow with the prompt. A request shorter than a chunk
  needs fewer rows: ``ring_rows`` is ``min(chunk, max_tokens)`` in whole blocks of ``block_size`` (``max_tokens``:
  what the cache is built for), and :meth:`KVCache.reserve` grows the rings, up to a chunk, when a sequence needs
  more. While ``ring_rows < chunk`` every stored position is below ``ring_rows``, so its slot ``p % chunk`` is ``p``.
- Global (NoPE) layers keep every position in a shared pool of fixed-size blocks
  ``(n_blocks, block_size, n_kv_heads, head_dim)`` with a block table per sequence, so later work can
  add CPU offload and top-k block selection without changing this interface. The pool is
  preallocated for what :meth:`KVCache.reserve` asks and grows when a reservation does not fit. Its last block is
  a scratch block that is never handed out: the block-table entries past a sequence's blocks point at it, so a
  write past what a sequence reserved never lands in another sequence's keys (past the table's width, the
  longest reservation, the decode write kernels take the row's last entry: its own block or the scratch).
  ``kv_dtype="fp8"`` stores it as e4m3 with one fp32 power-of-two scale per (token, kv head) row
  (:func:`scout_mm.kernels.reference.quantize_kv_fp8`): half the bytes of bf16 (plus 1/32 for the scales),
  so a long prompt needs about half the memory and decode reads about half as much. Reads dequantise
  exactly (:func:`scout_mm.kernels.reference.dequantize_kv`); the cost is the rounding of every cached key
  and value to 3 mantissa bits: relative error at most 1/16 for entries down to 2**-13 of their row's largest
  |value|; smaller ones (the row shares one scale) have an absolute error under 1e-5 of the row's largest (the
  tiniest round to 0). The chunked layers' rings (at most one chunk)
  stay in the model's dtype.

Positions are per sequence (no padding inside the cache): a batch of prompts of different lengths is
prefilled sequence by sequence, then decoded together, each sequence at its own position. The caller reserves
every position a sequence will hold (:meth:`KVCache.reserve`); :meth:`KVCache.check_reserved` names a decode step
that would write past it.

Attention asks the cache for its keys and values through :meth:`KVCache.update` (RoPE layers:
:meth:`KVCache.update_rope`, which also rotates q and k) and never touches the storage itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scout_mm import kernels
from scout_mm.config import TextConfig, is_int
from scout_mm.kernels.reference import FP8_KV_DTYPE, dequantize_kv, quantize_kv_fp8

# Decode on RoPE layers: the rotation of q and k and the cache write in one kernel (kernels.rope_write_kv_decode);
# False: RoPE, then the write (two launches). A switch for benchmarks (bench_int4.py --sections ropewrite).
ROPE_WRITES_KV = True

_FP8_NAMES = ("fp8", "float8", "float8_e4m3fn", "fp8_e4m3")


def resolve_kv_dtype(kv_dtype, dtype: torch.dtype) -> torch.dtype:
    """The global layers' storage dtype for ``kv_dtype``: None / ``"auto"`` / the model's ``dtype`` -> ``dtype``;
    ``"fp8"`` (or ``torch.float8_e4m3fn``) -> e4m3. Anything else raises, naming what is accepted."""
    if kv_dtype is None or kv_dtype == "auto" or kv_dtype == dtype:
        return dtype
    name = str(kv_dtype).removeprefix("torch.").lower() if isinstance(kv_dtype, (str, torch.dtype)) else None
    if name in _FP8_NAMES:
        return FP8_KV_DTYPE
    model_dtype = str(dtype).removeprefix("torch.")
    raise ValueError(
        f"kv_cache_dtype={kv_dtype!r}; expected None or 'auto' (the model's {model_dtype}) or 'fp8' (e4m3, per-row "
        "scales, the global layers only)"
    )


@dataclass
class KVView:
    """What attention needs to attend over the cache after writing the new keys.

    Prefill (one sequence, ``q_len`` new tokens): ``k``/``v`` (1, n_kv_heads, q_start + q_len, head_dim),
    all visible causally, the new queries at key index ``q_start``. Decode: ``k``/``v`` in the
    :func:`scout_mm.kernels.flash_decode` layout (contiguous ring view or paged pool) with
    ``kv_lens`` (and ``block_table`` when paged).
    """

    k: torch.Tensor
    v: torch.Tensor
    q_start: int = 0
    kv_lens: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None  # decode, FP8 store: its rows' scales (k's layout, no head_dim)
    v_scale: torch.Tensor | None = None


class KVCache:
    def __init__(
        self,
        config: TextConfig,
        batch_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
        block_size: int = 256,
        initial_blocks: int = 0,
        kv_dtype: torch.dtype | str | None = None,
        max_tokens: int | None = None,
    ):
        """``kv_dtype``: the global layers' storage, the model's ``dtype`` (None) or ``"fp8"`` (module docstring).
        ``max_tokens``: the most tokens a sequence will hold, when known: the rings get ``min(chunk, max_tokens)``
        rows (in whole blocks) instead of a whole chunk. It caps nothing: :meth:`reserve` grows them."""
        if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 0):
            raise ValueError(
                f"max_tokens={max_tokens!r}; expected an int >= 0 or None (rings of a whole chunk)"
            )
        self.batch_size = batch_size
        self.block_size = block_size
        self.chunk_size = config.attention_chunk_size
        shape = (config.num_key_value_heads, config.head_dim)
        self.device, self.dtype = torch.device(device), dtype
        # Ring layers: RoPE layers when attention is chunked. Without a chunk size every layer is global.
        self.ring_layers = [
            i for i in range(config.num_hidden_layers) if self.chunk_size is not None and config.uses_rope(i)
        ]
        self.ring_rows = 0
        if self.ring_layers:
            self.ring_rows = self.chunk_size if max_tokens is None else self._ring_rows_for(int(max_tokens))
        self._ring: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in self.ring_layers:
            ring = (batch_size, self.ring_rows, *shape)
            self._ring[i] = (
                torch.zeros(ring, device=device, dtype=dtype),
                torch.zeros(ring, device=device, dtype=dtype),
            )
        self.global_layers = [i for i in range(config.num_hidden_layers) if i not in self._ring]
        self.kv_dtype = resolve_kv_dtype(kv_dtype, dtype)
        self.fp8 = self.kv_dtype == FP8_KV_DTYPE
        self._pool: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # FP8 pools' row scales: (n_blocks, block_size, n_kv_heads) fp32
        self._scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i in self.global_layers:
            pool = (initial_blocks + 1, block_size, *shape)  # + the scratch block
            self._pool[i] = (
                torch.zeros(pool, device=device, dtype=self.kv_dtype),
                torch.zeros(pool, device=device, dtype=self.kv_dtype),
            )
            if self.fp8:
                self._scales[i] = (
                    torch.zeros(pool[:-1], device=device, dtype=torch.float32),
                    torch.zeros(pool[:-1], device=device, dtype=torch.float32),
                )
        # The pool's last block, never handed out: block-table entries past a sequence's blocks point at it, so a
        # decode write past a sequence's reservation (unchecked: a CUDA graph's replay) cannot reach real keys.
        self._scratch = initial_blocks
        self.block_table = torch.zeros(batch_size, 0, dtype=torch.int32, device=device)
        self._n_blocks = [0] * batch_size  # blocks owned per sequence
        # Per sequence: its first pool block while all its blocks are consecutive pool blocks, else None. Prefill
        # then attends over a view of the pool, and knows it without reading the device table.
        self._run: list[int | None] = [None] * batch_size
        self._free: list[int] = list(range(initial_blocks))
        self._prefill_seq: int | None = None
        self._prefill_start = 0

    # ------------------------------------------------------------------ memory management
    def reserve(self, seq: int, n_tokens: int) -> None:
        """Make sure sequence ``seq`` has storage for positions ``[0, n_tokens)``: global-layer blocks, and ring rows
        (the rings of every sequence grow, up to a chunk, when they hold fewer)."""
        rows = self._ring_rows_for(n_tokens) if self.ring_layers else 0
        if rows > self.ring_rows:
            self._grow_rings(rows)
        need = -(-n_tokens // self.block_size) - self._n_blocks[seq]
        if need <= 0 or not self.global_layers:
            return
        if len(self._free) < need:
            self._grow(need - len(self._free))
        blocks = [self._free.pop(0) for _ in range(need)]
        start, end = self._n_blocks[seq], self._n_blocks[seq] + need
        if end > self.block_table.shape[1]:
            pad = torch.full(
                (self.batch_size, end - self.block_table.shape[1]),
                self._scratch,
                dtype=torch.int32,
                device=self.device,
            )
            self.block_table = torch.cat([self.block_table, pad], dim=1)
        self.block_table[seq, start:end] = torch.tensor(blocks, dtype=torch.int32, device=self.device)
        self._n_blocks[seq] = end
        consecutive = blocks == list(range(blocks[0], blocks[0] + need))
        if start == 0:
            self._run[seq] = blocks[0] if consecutive else None
        elif self._run[seq] is not None and not (consecutive and blocks[0] == self._run[seq] + start):
            self._run[seq] = None

    def capacity(self, seq: int) -> int | None:
        """Positions ``[0, capacity)`` of sequence ``seq`` have storage (its reserved blocks, the rings' rows):
        what it can hold without :meth:`reserve`. None when nothing bounds it (whole-chunk rings only)."""
        bounds = [self._n_blocks[seq] * self.block_size] if self.global_layers else []
        if self.ring_layers and self.ring_rows < self.chunk_size:
            bounds.append(self.ring_rows)
        return min(bounds) if bounds else None

    def check_reserved(self, positions: torch.Tensor) -> None:
        """Raise a ValueError naming the sequence when a decode step at ``positions`` (batch, 1) would write past
        what it has reserved (:meth:`capacity`). Reads the positions on the host: a device->host sync on CUDA, and
        not possible inside a CUDA-graph capture (:func:`scout_mm.generation.decode_one_token` skips it there)."""
        for seq, pos in enumerate(positions[:, -1].tolist()):
            capacity = self.capacity(seq)
            if capacity is not None and pos >= capacity:
                raise ValueError(
                    f"sequence {seq}: decode position {pos} is past its reserved capacity of {capacity} tokens "
                    f"(positions [0, {capacity})); call reserve({seq}, n_tokens) for every position it will hold "
                    "before decoding it (prefill reserves only the prompt)"
                )

    def _ring_rows_for(self, n_tokens: int) -> int:
        # Whole blocks, as the pools grow: a cache kept for the next request of about the same length
        # (generation.decode_state) holds it without growing, and reserving token by token does not copy the
        # rings every token.
        return min(self.chunk_size, -(-n_tokens // self.block_size) * self.block_size)

    def _grow_rings(self, rows: int) -> None:
        # Every stored position is below the old row count (< chunk), so it keeps its slot: p % chunk == p.
        for i, pair in self._ring.items():
            grown = []
            for old in pair:
                ring = torch.zeros((old.shape[0], rows, *old.shape[2:]), device=old.device, dtype=old.dtype)
                ring[:, : old.shape[1]] = old
                grown.append(ring)
            self._ring[i] = (grown[0], grown[1])
        self.ring_rows = rows

    def _block_run(self, seq: int, n_blocks: int) -> int | None:
        """The first pool block of sequence ``seq`` if its blocks are consecutive pool blocks (blocks come off the
        free list in order, so a sequence reserved at once is one run), else None; a ValueError if it has fewer than
        ``n_blocks``."""
        if self._n_blocks[seq] < n_blocks:
            raise ValueError(
                f"sequence {seq} has {self._n_blocks[seq]} KV blocks of {self.block_size} tokens reserved, {n_blocks} "
                "needed: call reserve() for its length first"
            )
        return self._run[seq]

    def _grow(self, n_blocks: int) -> None:
        old = next(iter(self._pool.values()))[0].shape[0]
        for store in (self._pool, self._scales):
            for i, (k, v) in store.items():
                extra = torch.zeros((n_blocks, *k.shape[1:]), device=k.device, dtype=k.dtype)
                store[i] = (torch.cat([k, extra]), torch.cat([v, extra.clone()]))
        # The old scratch block (the last) becomes a free block and the new last block the scratch: the free blocks
        # stay one run, so a reservation still gets consecutive blocks. Only padding points at the old scratch.
        scratch = old + n_blocks - 1
        self.block_table.masked_fill_(self.block_table == self._scratch, scratch)
        self._free.extend(range(self._scratch, scratch))
        self._scratch = scratch

    def storage_key(self) -> tuple[int, ...]:
        """Addresses of every storage tensor (rings, pools, block table) and their sizes: a CUDA graph captured over
        this cache stays valid while they are unchanged (a growing ring, pool or block table moves them)."""
        stores = (*self._ring.values(), *self._pool.values(), *self._scales.values())
        tensors = [t for pair in stores for t in pair]
        addresses = tuple(t.data_ptr() for t in (*tensors, self.block_table))
        return addresses + tuple(self.block_table.shape) + (self.ring_rows,)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by ring (chunked) layers and by global layers' block pools (with an FP8 pool's scales and the
        pools' scratch block)."""
        ring = sum(k.numel() * k.element_size() * 2 for k, _ in self._ring.values())
        pools = (*self._pool.values(), *self._scales.values())
        pool = sum(k.numel() * k.element_size() * 2 for k, _ in pools)
        return {"ring": ring, "global": pool}

    # ------------------------------------------------------------------ modes
    def begin_prefill(self, seq: int, start: int) -> None:
        """The next :meth:`update` calls write sequence ``seq``'s positions from ``start`` on.

        A prefill piece must not cross a chunk boundary (``generation.prefill`` cuts pieces that way), so a
        ring layer sees only keys of the piece's own chunk.
        """
        self._prefill_seq, self._prefill_start = seq, start

    def end_prefill(self) -> None:
        """Back to decode mode: :meth:`update` writes one token per sequence at the given positions."""
        self._prefill_seq = None

    # ------------------------------------------------------------------ attention interface
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> KVView:
        """Store the new keys/values of ``layer`` and return what to attend over.

        k, v: (batch, q_len, n_kv_heads, head_dim); positions: (batch, q_len) of the new tokens.
        """
        if self._prefill_seq is not None:
            return self._update_prefill(layer, k, v)
        return self._update_decode(layer, k, v, positions)[1]

    def _update_prefill(self, layer, k, v) -> KVView:
        seq, start, q_len = self._prefill_seq, self._prefill_start, k.shape[1]
        if layer in self._ring:
            ring_k, ring_v = self._ring[layer]
            offset = start % self.chunk_size
            if offset + q_len > self.chunk_size:
                raise ValueError(f"prefill piece [{start}, {start + q_len}) crosses a chunk boundary")
            if offset + q_len > self.ring_rows:
                raise ValueError(
                    f"sequence {seq}: prefill piece [{start}, {start + q_len}) needs ring slots up to "
                    f"{offset + q_len}; the rings hold {self.ring_rows}: call reserve() for its length first"
                )
            ring_k[seq, offset : offset + q_len] = k[0]
            ring_v[seq, offset : offset + q_len] = v[0]
            keys, values = ring_k[seq : seq + 1, : offset + q_len], ring_v[seq : seq + 1, : offset + q_len]
            return KVView(keys.transpose(1, 2), values.transpose(1, 2), q_start=offset)
        n_blocks = -(-(start + q_len) // self.block_size)
        run = self._block_run(seq, n_blocks)
        if run is not None:
            # One run of consecutive blocks: the piece is written, and the history read, through views of the
            # pool, so no copy of the whole history is made per piece (1 GB a global layer at 256K tokens of Scout)
            first = run * self.block_size + start
            where = slice(first, first + q_len)

            def history(t):  # (start + q_len, ...) rows of the sequence
                return t[run : run + n_blocks].flatten(0, 1)[: start + q_len]

            def rows(t):  # the pool as (blocks x block_size, ...) rows
                return t.flatten(0, 1)
        else:
            index = torch.arange(start, start + q_len, device=k.device)
            where = (self.block_table[seq, index // self.block_size].long(), index % self.block_size)
            table = self.block_table[seq, :n_blocks].long()

            def history(t):
                return t[table].flatten(0, 1)[: start + q_len]

            def rows(t):
                return t

        seen = []
        for j, new in enumerate((k, v)):
            store = self._pool[layer][j]
            if not self.fp8:
                rows(store)[where] = new[0]
                seen.append(history(store))  # (start + q_len, heads, head_dim)
                continue
            # The new rows are quantised and stored first, then everything is read back dequantised: the piece
            # attends over exactly the keys and values that decode will read later.
            scales = self._scales[layer][j]
            rows(store)[where], rows(scales)[where] = quantize_kv_fp8(new[0])
            seen.append(dequantize_kv(history(store), history(scales), new.dtype))
        return KVView(seen[0].transpose(0, 1)[None], seen[1].transpose(0, 1)[None], q_start=start)

    def update_rope(self, layer, q, k, v, positions, cos, sin, eps) -> tuple[torch.Tensor, KVView]:
        """:meth:`update` for a RoPE layer, given its q, k before RoPE (+ QK-norm when ``eps`` is not None): returns
        (rotated q, what to attend over). Decode does the rotation and the cache write in one kernel."""
        if self._prefill_seq is not None or not ROPE_WRITES_KV or (self.fp8 and layer not in self._ring):
            q, k = kernels.rope_qk_norm(q, k, cos, sin, eps)
            return q, self.update(layer, k, v, positions)
        return self._update_decode(layer, k, v, positions, q=q, rope=(cos, sin, eps))

    def _update_decode(self, layer, k, v, positions, q=None, rope=None) -> tuple[torch.Tensor | None, KVView]:
        # One new token per sequence at its own position: graph-friendly (no host sync, fixed shapes); one
        # kernel at inference (kernels.write_kv_decode, or kernels.rope_write_kv_decode with ``rope``), index
        # writes otherwise. Returns (q, rotated with ``rope``; the view).
        if k.shape[1] != 1:
            raise ValueError(f"decode writes one token per sequence; got {k.shape[1]}")
        pos = positions[:, -1]
        ring = layer in self._ring
        if ring:
            k_store, v_store = self._ring[layer]
            # The ring's rows: a whole chunk (slot p % chunk), or fewer, which every reserved position is below (slot
            # p % rows == p == p % chunk). An unreserved position wraps within its own sequence's ring.
            where = dict(ring_size=self.ring_rows)
        else:
            k_store, v_store = self._pool[layer]
            where = dict(block_table=self.block_table, block_size=self.block_size)
        k_scale, v_scale = self._scales.get(layer, (None, None))  # (None, None) but for an FP8 pool
        if rope is None:
            kv_lens = kernels.write_kv_decode(
                k, v, k_store, v_store, pos, **where, k_scale_store=k_scale, v_scale_store=v_scale
            )
        else:
            q, kv_lens = kernels.rope_write_kv_decode(q, k, v, *rope, k_store, v_store, pos, **where)
        if ring:
            return q, KVView(k_store.transpose(1, 2), v_store.transpose(1, 2), kv_lens=kv_lens)
        return q, KVView(
            k_store, v_store, kv_lens=kv_lens, block_table=self.block_table, k_scale=k_scale, v_scale=v_scale
        )
