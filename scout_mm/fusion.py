"""Inference-time projection fusion: q|k|v as one matmul in every attention layer and gate|up as one in every
SwiGLU MLP (shared experts, dense layers). At batch-1 decode each matmul is a weight-streaming GEMV whose small
k/v outputs are latency-bound; one launch over the concatenated weight replaces three (or two).

    model = fuse_projections(model)     # Int4 (scout_mm.quant.load_quantized does it) or float models
    ...generate...
    unfuse_projections(model)           # back to the checkpoint layout, e.g. before saving

A fused model keeps the checkpoint format out of reach on purpose: ``state_dict()`` / ``load_state_dict()``
on it raise (saving would otherwise write ``qkv_proj`` keys no HF checkpoint has); unfuse first. The fused
weights do not train (``requires_grad=False``).
"""

from __future__ import annotations

import torch
from torch import nn

from scout_mm.model import Attention
from scout_mm.moe.layer import SwiGLU

# (module class, fused attribute, the projections it replaces, in output order)
FUSIONS = (
    (Attention, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    (SwiGLU, "gate_up_proj", ("gate_proj", "up_proj")),
)


class FusedLinear(nn.Module):
    """Several linear maps of the same input as one: ``forward`` returns the parts' outputs (views)."""

    def __init__(self, proj: nn.Module, sizes: list[int], names: tuple[str, ...]):
        super().__init__()
        self.proj = proj
        self.sizes = tuple(sizes)
        self.names = tuple(names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(x).split(self.sizes, dim=-1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(
            f"{prefix.rstrip('.')} fuses {'|'.join(self.names)} (scout_mm.fusion.fuse_projections); its state "
            "would not match the checkpoint format. Call scout_mm.fusion.unfuse_projections(model) first."
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        raise RuntimeError(
            f"{prefix.rstrip('.')} fuses {'|'.join(self.names)}: load the checkpoint into the unfused model "
            "(scout_mm.fusion.unfuse_projections), then fuse again."
        )

    def extra_repr(self) -> str:
        return f"names={self.names}, sizes={self.sizes}"


def _out_features(module: nn.Module) -> int | None:
    return getattr(module, "out_features", None)


def concat_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One module over the concatenated outputs of ``parts`` (same input), or None when their types do not
    concatenate: plain ``nn.Linear`` (weights cat along the output dim) or a module type with ``concat``/``split``
    classmethods (``Int4Linear``)."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts):
        return None
    if kind is nn.Linear:
        if len({(p.in_features, p.weight.dtype, p.weight.device, p.bias is None) for p in parts}) != 1:
            return None
        weight = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(
            parts[0].in_features, weight.shape[0], bias=parts[0].bias is not None, device="meta"
        )
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if parts[0].bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        return fused
    if hasattr(kind, "concat") and hasattr(kind, "split"):
        return kind.concat(parts)
    return None


def split_linear(proj: nn.Module, sizes: tuple[int, ...]) -> list[nn.Module]:
    """The inverse of :func:`concat_linears`."""
    if type(proj) is nn.Linear:
        weights = proj.weight.detach().split(sizes)
        biases = proj.bias.detach().split(sizes) if proj.bias is not None else [None] * len(sizes)
        parts = []
        for weight, bias in zip(weights, biases):
            part = nn.Linear(proj.in_features, weight.shape[0], bias=bias is not None, device="meta")
            part.weight = nn.Parameter(weight.clone())
            if bias is not None:
                part.bias = nn.Parameter(bias.clone())
            parts.append(part)
        return parts
    return type(proj).split(proj, list(sizes))


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse q|k|v and gate|up projections in place (see the module docstring); returns ``model``. Modules whose
    parts cannot be concatenated (different types, e.g. one part left in float by a quantization skip list)
    stay as they are. Idempotent."""
    for module in list(model.modules()):
        for cls, fused_name, part_names in FUSIONS:
            if not isinstance(module, cls) or getattr(module, fused_name) is not None:
                continue
            parts = [getattr(module, name) for name in part_names]
            proj = concat_linears(parts)
            if proj is None:
                continue
            sizes = [_out_features(p) for p in parts]
            for name in part_names:
                delattr(module, name)
            setattr(module, fused_name, FusedLinear(proj, sizes, part_names))
    return model


@torch.no_grad()
def unfuse_projections(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_projections` in place (the separate projections again, as in checkpoints)."""
    for module in list(model.modules()):
        for cls, fused_name, _ in FUSIONS:
            fused = getattr(module, fused_name, None) if isinstance(module, cls) else None
            if fused is None:
                continue
            parts = split_linear(fused.proj, fused.sizes)
            delattr(module, fused_name)
            setattr(module, fused_name, None)
            for name, part in zip(fused.names, parts):
                setattr(module, name, part)
    return model


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedLinear) for m in model.modules())
