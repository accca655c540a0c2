"""The Scout model: iRoPE text decoder with MoE feed-forwards, and the early-fusion vision+text wrapper.

Module and parameter names mirror HF ``Llama4ForConditionalGeneration`` so that a state dict maps onto
an HF checkpoint key for key. The math is plain PyTorch; attention and the routed experts go through
``scout_mm.kernels`` (one dispatch point: Triton on GPU, references elsewhere).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scout_mm import kernels
from scout_mm.config import ScoutConfig, TextConfig
from scout_mm.kernels.fused_reference import apply_rope  # noqa: F401 - the text and vision towers' RoPE
from scout_mm.moe import MoE, SwiGLU, load_balancing_loss


@dataclass
class ScoutOutput:
    logits: torch.Tensor  # (batch, seq or logits_to_keep, vocab)
    loss: torch.Tensor | None = None  # next-token cross-entropy over labels != -100
    aux_loss: torch.Tensor | None = None  # mean MoE load-balancing loss over MoE layers (1.0 = balanced)
    image_hidden_states: torch.Tensor | None = None  # (n_tiles, tokens_per_tile, vision_output_dim)
    cache: object | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None):
        """``rms_norm(x) * weight``; with ``delta``: ``(x + delta, rms_norm(x + delta) * weight)``, the residual
        add and the next norm in one kernel at inference (HF's rounding: the sum is rounded, normalised in
        fp32, cast back before the weight)."""
        if delta is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.add_rms_norm(x, delta, self.weight, self.eps)


def attn_temperature(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """NoPE layers' query scale ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1``, (batch, seq) fp32."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def rope_inv_freq(cfg: TextConfig, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies (head_dim // 2,), with llama3-style scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    scaling = cfg.rope_scaling
    if cfg.rope_scaling_kind == "default":
        return inv_freq
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept; in between, a smooth blend.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    if high != low:
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        scaled = torch.where(medium, blended, scaled)
    return scaled


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.use_rope = cfg.uses_rope(layer_idx)
        # iRoPE: RoPE layers attend within their chunk; NoPE layers attend to everything before them.
        self.chunk_size = cfg.attention_chunk_size if self.use_rope else None
        self.qk_norm_eps = cfg.rms_norm_eps if (cfg.use_qk_norm and self.use_rope) else None
        self.temperature = None
        if cfg.attn_temperature_tuning and not self.use_rope:
            self.temperature = (float(cfg.floor_scale), float(cfg.attn_scale))
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.qkv_proj = None  # q|k|v as one matmul, set by scout_mm.fusion.fuse_projections (inference)

    def forward(self, x, rope, positions, kv_start, cache=None, temperature_scale=None):
        """``temperature_scale``: NoPE layers' query scale at ``positions`` when the caller computed it once for
        all layers (:func:`attn_temperature`); else computed here."""
        batch, seq, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x)  # views of one (batch, seq, (heads + 2 kv_heads) * head_dim) output
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        view = None
        if self.use_rope and cache is not None:  # the cache rotates too (one kernel with the write at decode)
            q, view = cache.update_rope(self.layer_idx, q, k, v, positions, *rope, self.qk_norm_eps)
        elif self.use_rope:  # QK-norm only ever applies on RoPE layers (qk_norm_eps is None elsewhere)
            q, k = kernels.rope_qk_norm(q, k, *rope, self.qk_norm_eps)
        q_scale = None
        if self.temperature is not None:
            q_scale = temperature_scale
            if q_scale is None:
                q_scale = attn_temperature(positions, *self.temperature)
        q = q.transpose(1, 2)  # (batch, heads, seq, head_dim)
        scale = self.head_dim**-0.5
        if cache is None:
            out = kernels.attention(
                q,
                k.transpose(1, 2),
                v.transpose(1, 2),
                scale=scale,
                chunk_size=self.chunk_size,
                kv_start=kv_start,
                q_scale=q_scale,
            )
        else:
            # The cache hands back only keys this layer may see: its chunk (ring layers) or everything.
            if view is None:
                view = cache.update(self.layer_idx, k, v, positions)
            if view.kv_lens is not None:
                out, _ = kernels.decode_attention(
                    q,
                    view.k,
                    view.v,
                    scale=scale,
                    kv_lens=view.kv_lens,
                    block_table=view.block_table,
                    q_scale=q_scale,
                    k_scale=view.k_scale,
                    v_scale=view.v_scale,
                )
            else:
                out = kernels.attention(q, view.k, view.v, scale=scale, q_start=view.q_start, q_scale=q_scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.feed_forward = MoE(
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_local_experts,
                cfg.num_experts_per_tok,
                shared_expert=cfg.use_shared_expert,
            )
        else:
            self.feed_forward = SwiGLU(cfg.hidden_size, cfg.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x,
        rope,
        positions,
        kv_start,
        cache=None,
        temperature_scale=None,
        delta=None,
        defer_residual=False,
    ):
        """Returns the new hidden states and, for MoE layers, (topk_ids, router_logits).

        ``delta``: the previous layer's feed-forward output, not yet added to ``x`` (the add runs inside this
        layer's first norm: one kernel at inference). ``defer_residual``: return ``(x, feed_forward_out,
        routing)`` and leave this layer's residual add to the next norm the same way. Same rounding either way
        (HF: the block output is rounded, then added to the residual stream and rounded)."""
        if delta is None:
            h = self.input_layernorm(x)
        else:
            x, h = self.input_layernorm(x, delta)
        attn = self.self_attn(h, rope, positions, kv_start, cache, temperature_scale)
        routing = None
        if self.is_moe:
            # x + attn, its norm and (shared expert folded, decode) the router: one kernel at inference
            x, out, topk_ids, router_logits = self.feed_forward.add_norm_forward(
                x, attn, self.post_attention_layernorm
            )
            routing = (topk_ids, router_logits)
        else:
            x, h = self.post_attention_layernorm(x, attn)  # x + attn and its norm, one kernel at inference
            out = self.feed_forward(h)
        if defer_residual:
            return x, out, routing
        return x + out, routing


class TextModel(nn.Module):
    """Embedding, decoder layers and final norm (HF ``Llama4TextModel``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}
        self._temperature = next(
            (ly.self_attn.temperature for ly in self.layers if ly.self_attn.temperature), None
        )

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        # A few dozen numbers, made once per device (a dozen small kernels per step otherwise) and not a buffer,
        # which would have to be rebuilt after meta-device initialisation.
        inv_freq = self._inv_freq_by_device.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq_by_device[device] = rope_inv_freq(self.config, device)
        return inv_freq

    def forward(self, inputs_embeds, positions, kv_start, token_mask=None, with_aux_loss=False, cache=None):
        """inputs_embeds (batch, seq, hidden), positions (batch, seq) -> (hidden, aux_loss or None)."""
        if self.training and self.config.attention_dropout:
            # No attention kernel here drops probabilities; training on as if it did would silently differ from HF.
            raise NotImplementedError(
                f"attention_dropout={self.config.attention_dropout}: dropout on attention probabilities is not "
                "implemented; set it to 0 to train (inference ignores it, as HF does in eval mode)"
            )
        angles = positions[..., None].float() * self._inv_freq(positions.device)
        rope = (torch.cos(angles), torch.sin(angles))  # each (batch, seq, head_dim // 2)
        temperature_scale = None  # the same for every NoPE layer: computed once, not per layer
        if self._temperature is not None:
            temperature_scale = attn_temperature(positions, *self._temperature)
        x, delta = inputs_embeds, None  # each layer's output is added inside the next norm (one kernel)
        aux_losses = []
        for layer in self.layers:
            x, delta, routing = layer(
                x, rope, positions, kv_start, cache, temperature_scale, delta=delta, defer_residual=True
            )
            if routing is not None and with_aux_loss:
                aux_losses.append(load_balancing_loss(routing[1], routing[0], token_mask))
        aux = torch.stack(aux_losses).mean() if aux_losses else None
        return (self.norm(x) if delta is None else self.norm(x, delta)[1]), aux


class ScoutForCausalLM(nn.Module):
    """Text decoder + LM head (HF ``Llama4ForCausalLM``)."""

    def __init__(self, cfg: TextConfig, tie_word_embeddings: bool = False):
        super().__init__()
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


class ScoutForConditionalGeneration(nn.Module):
    """Early-fusion vision+text MoE model (HF ``Llama4ForConditionalGeneration``).

    Image features replace the ``<|patch|>`` token embeddings in place, so the decoder sees a single
    interleaved sequence. With ``config.vision = None`` this is a text-only model.
    """

    def __init__(self, config: ScoutConfig):
        super().__init__()
        self.config = config
        if config.vision is not None:
            from scout_mm.vision.encoder import VisionEncoder, VisionProjector

            self.vision_model = VisionEncoder(config.vision)
            self.multi_modal_projector = VisionProjector(config.text.hidden_size, config.vision)
        else:
            self.vision_model = None
            self.multi_modal_projector = None
        self.language_model = ScoutForCausalLM(config.text, config.tie_word_embeddings)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init (uses the global RNG): normal(0, initializer_range) for matrices, ones for norms."""
        std = self.config.text.initializer_range
        for name, p in self.language_model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
        if self.vision_model is not None:
            self.vision_model.init_weights()
            self.multi_modal_projector.init_weights(std)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.model.embed_tokens

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (batch, seq)
        pixel_values: torch.Tensor | None = None,  # (n_tiles, 3, tile, tile), all images' tiles in order
        attention_mask: torch.Tensor | None = None,  # (batch, seq) 1 = token, 0 = left/right padding
        position_ids: torch.Tensor | None = None,  # (batch, seq)
        labels: torch.Tensor | None = None,  # (batch, seq), -100 = ignored
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        with_aux_loss: bool | None = None,
        cache=None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> ScoutOutput:
        """Logits for every position (or the last ``logits_to_keep``), plus the LM loss when ``labels`` are
        given and the MoE load-balancing loss when training or ``with_aux_loss`` is set.

        The loss is the mean cross-entropy over the label tokens; with ``num_items_in_batch`` (HF's name) it is
        their sum divided by that number instead, e.g. the label tokens of every micro-batch of an optimiser
        step, so that gradient accumulation weighs every token alike. The targets counted are
        ``labels[:, 1:] != -100`` where, with ``attention_mask``, a position and the next are both real tokens
        (predictions from or of padding are left out even when their labels are not -100).

        Padding must be left or right padding (no holes). Positions count from each sequence's first
        real token, so a left-padded row gives the same logits as the unpadded sequence. ``cache`` (a
        :class:`scout_mm.cache.KVCache`) is driven by :mod:`scout_mm.generation`, which supplies positions.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        items = num_items_in_batch
        if isinstance(items, bool) or (isinstance(items, (int, float)) and not items > 0):  # 0, < 0, nan
            raise ValueError(f"num_items_in_batch={num_items_in_batch!r}; expected a positive count")
        given = input_ids if input_ids is not None else inputs_embeds
        if given.dim() < 2 or 0 in given.shape[:2]:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(
                f"{name} of shape {tuple(given.shape)}; expected (batch, seq) with batch, seq >= 1"
            )
        image_features = None
        if inputs_embeds is None:
            # Decode steps (cache given) skip validation: it syncs with the host, and a sampled token may be
            # the image token id.
            inputs_embeds, image_features = self.embed_inputs(input_ids, pixel_values, validate=cache is None)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids to locate the image tokens")
        batch, seq, _ = inputs_embeds.shape
        if cache is None and seq > self.config.text.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} exceeds the model maximum "
                f"max_position_embeddings={self.config.text.max_position_embeddings}"
            )
        if cache is not None and position_ids is None:
            raise ValueError("a cached forward needs position_ids (see scout_mm.generation)")

        kv_start, token_mask = _padding_layout(attention_mask, batch, seq, inputs_embeds.device)
        if position_ids is None:
            index = torch.arange(seq, device=inputs_embeds.device)
            position_ids = (index[None, :] - kv_start[:, None]).clamp(min=0)
        if with_aux_loss is None:
            with_aux_loss = self.training or labels is not None
        hidden, aux_loss = self.language_model.model(
            inputs_embeds,
            position_ids,
            # Only left padding needs masks: right padding sits after every real token, which causal
            # attention already hides, so those batches keep the mask-free (chunk-reshape / SDPA) path.
            kv_start if attention_mask is not None and bool(kv_start.any()) else None,
            token_mask=token_mask.reshape(-1) if token_mask is not None else None,
            with_aux_loss=with_aux_loss,
            cache=cache,
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language_model.lm_head(hidden)
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need logits for every position; drop logits_to_keep")
            targets = labels[:, 1:].to(logits.device)
            if token_mask is not None:
                # Predictions from or of padding positions carry no meaning (a padding row's attention
                # output is unspecified): leave them out even when labels were not masked there.
                targets = targets.masked_fill(~(token_mask[:, :-1] & token_mask[:, 1:]), -100)
            flat = logits[:, :-1].flatten(0, 1).float()
            if num_items_in_batch is None:
                loss = F.cross_entropy(flat, targets.flatten(), ignore_index=-100)
            else:
                loss = F.cross_entropy(flat, targets.flatten(), ignore_index=-100, reduction="sum")
                loss = loss / num_items_in_batch
        return ScoutOutput(
            logits=logits, loss=loss, aux_loss=aux_loss, image_hidden_states=image_features, cache=cache
        )

    def embed_inputs(
        self, input_ids, pixel_values=None, validate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with image features in place of the image tokens (early fusion).

        Returns (inputs_embeds (batch, seq, hidden), image features or None)."""
        image_features, image_embeds = self.image_token_embeddings(input_ids, pixel_values, validate)
        return self.embed_tokens(input_ids, image_embeds), image_features

    def image_token_embeddings(
        self, input_ids, pixel_values=None, validate: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the vision tower's features (n_tiles, tokens_per_tile, vision_output_dim), their projections
        (n_image_tokens, hidden): what replaces the image tokens of ``input_ids``, in order), or (None, None)
        without ``pixel_values``. Checks that there are as many image tokens as features, and with ``validate``
        that the token ids are within the vocabulary."""
        if validate:
            _check_token_ids(input_ids, self.config.text.vocab_size)
        if pixel_values is None:
            n = 0
            if validate and self.config.vision is not None:
                n = int((input_ids == self.config.image_token_index).sum())
            if n:
                raise ValueError(f"input_ids hold {n} image tokens but no pixel_values were given")
            return None, None
        image_features = self.get_image_features(pixel_values)
        projected = self.multi_modal_projector(image_features.flatten(0, 1))  # (n_image_tokens, hidden)
        n_tokens = int((input_ids == self.config.image_token_index).sum())
        if n_tokens != projected.shape[0]:
            n_tiles = image_features.shape[0]
            raise ValueError(
                f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_index}) but pixel_values "
                f"give {n_tiles} tiles x {image_features.shape[1]} = {projected.shape[0]} image features"
            )
        return image_features, projected

    def embed_tokens(self, input_ids, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq, hidden): the token embeddings of ``input_ids``, its image tokens replaced in order by the
        rows of ``image_embeds`` (as many, unchecked). A prompt can be embedded piece by piece: each piece takes
        the rows of its own image tokens."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_embeds is None:
            return inputs_embeds
        image_mask = input_ids == self.config.image_token_index
        return inputs_embeds.masked_scatter(image_mask[..., None], image_embeds.to(inputs_embeds.dtype))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_tiles, 3, tile, tile) -> (n_tiles, tokens_per_tile, vision_output_dim)."""
        if self.vision_model is None:
            raise ValueError("pixel_values given, but this is a text-only model (config.vision is None)")
        return self.vision_model(pixel_values)  # checks the shape and dtype

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """HF-style ``generate``: token ids (prompt as given, then new tokens). Keyword arguments are those of
        :func:`scout_mm.generation.generate_ids` (max_new_tokens, do_sample, temperature, top_k, top_p,
        min_p, repetition_penalty, eos_token_id, stop_strings, seed, streamer, ...)."""
        from scout_mm.generation import generate_ids

        return generate_ids(self, input_ids, pixel_values, attention_mask, **kwargs).sequences

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> ScoutForConditionalGeneration:
        """Load our checkpoints or HF Llama 4 ones (conditional-generation or text-only layouts)."""
        from scout_mm.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write ``config.json`` + safetensors in the HF layout (``transformers`` loads it)."""
        from scout_mm.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids shape {tuple(input_ids.shape)}; expected (batch, seq)")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"input_ids hold ids in [{int(input_ids.min())}, {int(input_ids.max())}]; vocab_size={vocab_size}"
        )


def _padding_layout(attention_mask, batch, seq, device):
    """(kv_start, token_mask) from a 0/1 mask: kv_start[b] = count of left-padding tokens of row b."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device), None
    if tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)}; expected {(batch, seq)}")
    mask = attention_mask.to(device=device).bool()
    n_real = mask.sum(-1)
    kv_start = (~mask).long().cumprod(-1).sum(-1)  # leading zeros
    index = torch.arange(seq, device=device)
    contiguous = (index[None] >= kv_start[:, None]) & (index[None] < (kv_start + n_real)[:, None])
    if not torch.equal(contiguous, mask):
        raise ValueError("attention_mask must be left or right padding (ones contiguous in each row)")
    return kv_start, mask


def count_parameters(model_or_config: nn.Module | ScoutConfig) -> dict[str, int]:
    """Total and active parameter counts; works on the meta device (no memory).

    Active = what one token touches: everything except the input embedding, with routed experts counted
    at top_k / n_experts (the vision tower counts, as image tokens go through it). A tied LM head counts once.
    """
    if isinstance(model_or_config, ScoutConfig):
        with torch.device("meta"):
            model = ScoutForConditionalGeneration(model_or_config)
    else:
        model = model_or_config
    text = model.config.text
    routed_share = text.num_experts_per_tok / text.num_local_experts
    counts = {"total": 0, "active": 0, "routed_experts": 0, "vision": 0, "embedding": 0}
    for name, p in model.named_parameters():  # tied parameters are yielded once
        n = p.numel()
        counts["total"] += n
        if name.endswith("embed_tokens.weight"):
            counts["embedding"] += n
            if model.config.tie_word_embeddings:
                counts["active"] += n  # it is also the LM head
            continue
        if ".experts." in name:
            counts["routed_experts"] += n
            counts["active"] += round(n * routed_share)
            continue
        if name.startswith(("vision_model.", "multi_modal_projector.")):
            counts["vision"] += n
        counts["active"] += n
    return counts
