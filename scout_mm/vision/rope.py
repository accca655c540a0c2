"""2D (axial) rotary position embedding of the vision tower, in HF ``Llama4VisionRotaryEmbedding``'s layout.

Each head's ``head_dim`` channels form ``head_dim / 2`` interleaved pairs ``(x[2i], x[2i+1])``, rotated like
complex numbers. The first half of the pairs rotates with the patch's column, the second half with its row,
both at positions counted from 1 and frequencies ``theta ** (-4j / head_dim)``. The class token (last in the
sequence) is not rotated.

The table is derived from the config alone, so it is never a parameter or a buffer: ``VisionRope`` builds
it on first use on each device and keeps it in float32 (the rotation runs in float32, as in HF). So a module
created on the ``meta`` device works after ``to_empty()`` with nothing to re-initialise, and
``model.to(torch.bfloat16)`` cannot round the angles.
"""

from __future__ import annotations

import torch
from torch import nn

from scout_mm.config import VisionConfig


def rope_angles(cfg: VisionConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Rotation angles, ``(n_patches + 1, head_dim // 2)`` float32; the last row (class token) is zero."""
    grid = cfg.image_size // cfg.patch_size
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if head_dim % 4:
        raise ValueError(
            f"vision head_dim={head_dim}; 2D RoPE needs a multiple of 4 (two axes of complex pairs)"
        )
    n_freqs = head_dim // 4  # per axis
    # Same float32 expression as HF, so the angles agree bit for bit.
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, head_dim // 2, 2, device=device).float() / (head_dim // 2))
    )
    inv_freq = inv_freq[:n_freqs]
    patch = torch.arange(grid * grid, device=device)
    cols = (patch % grid + 1).float()  # (n_patches,)
    rows = (patch // grid + 1).float()
    angles = torch.cat(
        [cols[:, None] * inv_freq, rows[:, None] * inv_freq], dim=-1
    )  # (n_patches, head_dim // 2)
    return torch.cat([angles, angles.new_zeros(1, angles.shape[-1])])  # class token: no rotation


class VisionRope(nn.Module):
    """Lazily built ``(cos, sin)`` tables for one tile; holds no state_dict entries."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        """Drop the cached tables (they are rebuilt on the next call)."""
        self._tables = None

    def forward(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # (n_patches + 1, head_dim // 2) each, float32
        if self._tables is None or self._tables[0].device != device:
            angles = rope_angles(self.cfg, device)
            self._tables = (angles.cos(), angles.sin())
        return self._tables
