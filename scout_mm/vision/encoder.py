"""Vision tower: ViT with 2D RoPE, pixel-shuffle adapter, and the projector into the text hidden size.

Numerically HF ``Llama4VisionModel`` + ``Llama4MultiModalProjector``. Module names follow HF so that
``VisionEncoder.state_dict()`` has exactly the keys HF keeps under ``vision_model.`` and ``VisionProjector``
those under ``multi_modal_projector.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scout_mm.config import VisionConfig
from scout_mm.model import apply_rope
from scout_mm.vision.rope import VisionRope

# HF builds every vision LayerNorm with nn.LayerNorm's default eps and ignores ``norm_eps``; so do we, so
# that a checkpoint behaves the same here and in transformers (released configs all say 1e-5 anyway).
LAYERNORM_EPS = 1e-5


class PatchEmbedding(nn.Module):
    """Non-overlapping patches, flattened channel-major (``nn.Unfold`` order), then a Linear."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.linear = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (n_tiles, C, S, S) -> (n_tiles, n_patches, hidden)
        patches = F.unfold(pixel_values, kernel_size=self.patch_size, stride=self.patch_size)
        return self.linear(patches.transpose(1, 2))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (n_tiles, seq, hidden); cos/sin: (seq, head_dim // 2)
        heads = (*x.shape[:-1], self.n_heads, self.head_dim)
        cos, sin = cos[None], sin[None]  # the text tower's rotation, one table for every tile
        q = apply_rope(self.q_proj(x).view(heads), cos, sin)
        k = apply_rope(self.k_proj(x).view(heads), cos, sin)
        v = self.v_proj(x).view(heads)
        # (n_tiles, n_heads, seq, head_dim); every token sees every token of its own tile
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).flatten(2))


class VisionMLP(nn.Module):
    """``fc2(gelu(fc1(x)))``; the adapter variant adds a GELU on the output (HF ``Llama4VisionMLP2``)."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, bias: bool, gelu_output: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden, bias=bias)
        self.fc2 = nn.Linear(dim_hidden, dim_out, bias=bias)
        self.gelu_output = gelu_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(x)))
        return F.gelu(x) if self.gelu_output else x


class VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYERNORM_EPS)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYERNORM_EPS)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionTransformer(nn.Module):
    """The layer stack (HF ``vision_model.model``)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return x


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Fold each ``s x s`` block of the patch grid (``s = 1 / ratio``) into channels, in HF's order.

    (n_tiles, g*g, C) -> (n_tiles, (g/s)**2, C*s*s). Output channel is
    ``(row % s) * s * C + (col % s) * C + c``; output tokens run row-major over the coarse grid.
    """
    n_tiles, n_patches, channels = x.shape
    grid = round(n_patches**0.5)
    s = round(1 / ratio)
    if grid * grid != n_patches or grid % s:
        raise ValueError(f"pixel_shuffle: {n_patches} patches is not a square grid divisible by {s}")
    blocks = x.view(n_tiles, grid // s, s, grid // s, s, channels)  # (tile, row', row%s, col', col%s, C)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(n_tiles, (grid // s) ** 2, s * s * channels)


class PixelShuffleAdapter(nn.Module):
    """Pixel shuffle, then a 2-layer MLP with GELU after both layers (HF ``vision_adapter``)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.projector_input_dim != cfg.projector_output_dim:
            # HF's fc2 takes projector_output_dim inputs from fc1's projector_input_dim outputs.
            raise ValueError(
                f"projector_input_dim={cfg.projector_input_dim} must equal "
                f"projector_output_dim={cfg.projector_output_dim}"
            )
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = VisionMLP(
            cfg.intermediate_size,
            cfg.projector_input_dim,
            cfg.projector_output_dim,
            bias=False,
            gelu_output=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (n_tiles, n_patches, hidden) -> (n_tiles, tokens_per_tile, projector_output_dim)
        return self.mlp(pixel_shuffle(x, self.ratio))


class VisionEncoder(nn.Module):
    """Image tiles -> image features (HF ``Llama4VisionModel``).

    ``forward(pixel_values)``: ``(n_tiles, num_channels, image_size, image_size)`` ->
    ``(n_tiles, cfg.tokens_per_tile, cfg.vision_output_dim)``, in the dtype of the weights.

    The RoPE tables are not in the state_dict; they are computed from ``cfg`` on first use on each device (see
    ``scout_mm.vision.rope``), so building on ``meta`` then ``to_empty()`` + ``load_state_dict()`` just works.
    Set ``self.model.gradient_checkpointing = True`` to recompute each layer in backward.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(grid * grid + 1, cfg.hidden_size))
        self.rotary_embedding = VisionRope(cfg)
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size, eps=LAYERNORM_EPS)
        self.model = VisionTransformer(cfg)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size, eps=LAYERNORM_EPS)
        self.vision_adapter = PixelShuffleAdapter(cfg)
        if not self.class_embedding.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Random init as HF: Linear ~ N(0, std) (default ``cfg.initializer_range``), zero biases,
        LayerNorm 1/0, class and positional embeddings ~ N(0, hidden_size**-0.5)."""
        init_linears_and_norms(self, self.cfg.initializer_range if std is None else std)
        nn.init.normal_(self.class_embedding, std=self.cfg.hidden_size**-0.5)
        nn.init.normal_(self.positional_embedding_vlm, std=self.cfg.hidden_size**-0.5)
        self.rotary_embedding.reset()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.cfg.num_channels, self.cfg.image_size, self.cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"pixel_values shape {tuple(pixel_values.shape)}; expected (n_tiles, {shape})")
        if not pixel_values.is_floating_point():
            # Integer pixels are raw 0..255 values: cast as they are, they would be read as normalised ones.
            raise TypeError(
                f"pixel_values dtype {pixel_values.dtype}; expected floating point (normalised tiles from "
                "Processor / ImageProcessor)"
            )
        n_tiles = pixel_values.shape[0]
        weight = self.patch_embedding.linear.weight
        x = self.patch_embedding(pixel_values.to(weight.dtype))  # (n_tiles, n_patches, hidden)
        # HF appends the class token after the patches; RoPE and the positional table follow that order.
        x = torch.cat(
            [x, self.class_embedding.expand(n_tiles, 1, -1)], dim=1
        )  # (n_tiles, n_patches + 1, hidden)
        x = self.layernorm_pre(x + self.positional_embedding_vlm)
        cos, sin = self.rotary_embedding(x.device)
        x = self.layernorm_post(self.model(x, cos, sin))
        return self.vision_adapter(x[:, :-1])  # drop the class token


class VisionProjector(nn.Module):
    """Image features -> text embeddings (HF ``multi_modal_projector``).

    ``forward``: ``(..., cfg.vision_output_dim)`` -> ``(..., text_hidden_size)``. HF always builds this Linear
    without bias; ``cfg.multi_modal_projector_bias=True`` adds one, which HF checkpoints cannot hold.
    """

    def __init__(self, text_hidden_size: int, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.linear_1 = nn.Linear(
            cfg.vision_output_dim, text_hidden_size, bias=cfg.multi_modal_projector_bias
        )
        if not self.linear_1.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        init_linears_and_norms(self, self.cfg.initializer_range if std is None else std)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


@torch.no_grad()
def init_linears_and_norms(module: nn.Module, std: float) -> None:
    """N(0, std) weights and zero biases for every Linear under ``module``; ones/zeros for every LayerNorm."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
