"""Inference-time projection fusion: q|k|v as one matmul in every attention layer and gate|up as one in every
SwiGLU MLP (shared experts, dense layers). At batch-1 decode each matmul is a weight-streaming GEMV whose small
k/v outputs are latency-bound; one launch over the concatenated weight replaces three (or two).

    model = fuse_projections(model)     # Int4 (scout_mm.quant.load_quantized does it) or float models
    ...generate...
    unfuse_projections(model)           # back to the checkpoint layout, e.g. before saving

The shared expert of an Int4 MoE layer can also join the routed experts (:func:`fuse_shared_expert`, which
``load_quantized`` applies too): its packed gate|up and down become expert ``E`` of the ``Int4Experts`` stacks
and every token gets one more slot (expert ``E``, routing weight 1.0), so one grouped gate_up launch and one
down launch compute shared + routed, and the slot sum adds all ``k + 1`` outputs in fp32 (one rounding instead
of two). Layers whose shared expert does not fit the stacks (another intermediate size or quantization, float
weights) stay as they are. ``unfuse_projections`` undoes both.

A fused model keeps the checkpoint format out of reach on purpose: ``state_dict()`` / ``load_state_dict()``
on it raise (saving would otherwise write ``qkv_proj`` keys no HF checkpoint has); unfuse first. The fused
weights do not train (``requires_grad=False``).
"""

from __future__ import annotations

import torch
from torch import nn

from scout_mm.model import Attention
from scout_mm.moe.layer import MoE, SwiGLU

# (module class, fused attribute, the projections it replaces, in output order)
FUSIONS = (
    (Attention, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    (SwiGLU, "gate_up_proj", ("gate_proj", "up_proj")),
)


class _InferenceLayout(nn.Module):
    """A module that rearranges checkpoint modules for inference (:meth:`_layout` says how): its state is not
    the checkpoint's, so saving or loading it raises until :func:`unfuse_projections` restores the layout."""

    def _layout(self) -> str:
        return "rearranges its checkpoint modules"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise RuntimeError(
            f"{prefix.rstrip('.')} {self._layout()}; its state would not match the checkpoint format. Call "
            "scout_mm.fusion.unfuse_projections(model) first."
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        raise RuntimeError(
            f"{prefix.rstrip('.')} {self._layout()}: load the checkpoint into the unfused model "
            "(scout_mm.fusion.unfuse_projections), then fuse again."
        )


class FusedLinear(_InferenceLayout):
    """Several linear maps of the same input as one: ``forward`` returns the parts' outputs (views)."""

    def __init__(self, proj: nn.Module, sizes: list[int], names: tuple[str, ...]):
        super().__init__()
        self.proj = proj
        self.sizes = tuple(sizes)
        self.names = tuple(names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(x).split(self.sizes, dim=-1)

    def _layout(self) -> str:
        return f"fuses {'|'.join(self.names)} (scout_mm.fusion.fuse_projections)"

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


def _return_freed(module: nn.Module) -> None:
    """After a layer's old weights were replaced: hand PyTorch's cached CUDA blocks back to the driver now.
    Otherwise the next layer's new (larger) stacks go to fresh segments and its smaller tensors are carved out
    of the freed old blocks, and the partly used segments stay reserved for good (H100, Scout in Int4, before
    this release: 14.7 GiB of free-but-unreleasable cache after folding all 48 layers, 8.5 of 85 GB free)."""
    if any(t.is_cuda for t in (*module.parameters(), *module.buffers())):
        torch.cuda.empty_cache()


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
            del parts
            _return_freed(proj)
    return model


class SharedSlotExperts(_InferenceLayout):
    """Routed experts whose last expert is the layer's shared expert (:func:`fuse_shared_expert`); ``shared_form``
    remembers how the shared SwiGLU held its gate/up projections ("fused": ``gate_up_proj``, else "separate")."""

    def __init__(self, experts: nn.Module, shared_form: str):
        super().__init__()
        self.experts = experts
        self.shared_form = shared_form

    def forward(self, hidden, topk_weights, topk_ids):
        return self.experts(hidden, topk_weights, topk_ids)

    def _layout(self) -> str:
        return "holds the shared expert as one more routed expert (scout_mm.fusion.fuse_shared_expert)"

    def extra_repr(self) -> str:
        return f"shared expert = expert {self.experts.n_experts - 1}, shared_form={self.shared_form!r}"


def _shared_gate_up(shared: SwiGLU) -> tuple[nn.Module | None, str]:
    if shared.gate_up_proj is not None:
        fused = shared.gate_up_proj
        return (fused.proj if fused.names == ("gate_proj", "up_proj") else None), "fused"
    from scout_mm.quant.modules import Int4Linear

    if type(shared.gate_proj) is not Int4Linear or type(shared.up_proj) is not Int4Linear:
        return None, "separate"
    try:
        return Int4Linear.concat([shared.gate_proj, shared.up_proj]), "separate"
    except ValueError:
        return None, "separate"


@torch.no_grad()
def fuse_shared_expert(model: nn.Module) -> nn.Module:
    """Fold every MoE layer's shared expert into its ``Int4Experts`` stacks in place (see the module docstring);
    returns ``model``. Layers with float experts, or whose shared expert differs from the routed experts in
    intermediate size or quantization settings, stay as they are. Idempotent."""
    from scout_mm.quant.modules import Int4Experts

    # (a list of the MoE blocks only: holding the old stacks until the end would double their memory)
    for module in [m for m in model.modules() if isinstance(m, MoE)]:
        if module.shared_slot or module.shared_expert is None:
            continue
        if type(module.experts) is not Int4Experts:
            continue
        gate_up, form = _shared_gate_up(module.shared_expert)
        stacked = (
            None if gate_up is None else module.experts.append_expert(gate_up, module.shared_expert.down_proj)
        )
        if stacked is None:
            continue
        module.experts = SharedSlotExperts(stacked, form)
        module.shared_expert = None
        module.shared_slot = True
        del gate_up
        _return_freed(stacked)
    return model


@torch.no_grad()
def unfuse_shared_expert(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_shared_expert` in place: the routed stacks and the shared SwiGLU with the exact packed
    values they had (its gate/up fused or separate, as they were)."""
    for module in [m for m in model.modules() if isinstance(m, MoE)]:
        if not module.shared_slot:
            continue
        slot = module.experts
        experts, gate_up, down = slot.experts.pop_expert()
        inter = experts.intermediate_size
        with torch.device("meta"):
            shared = SwiGLU(experts.hidden_size, inter)
        if slot.shared_form == "fused":
            del shared.gate_proj, shared.up_proj
            shared.gate_up_proj = FusedLinear(gate_up, [inter, inter], ("gate_proj", "up_proj"))
        else:
            shared.gate_proj, shared.up_proj = gate_up.split([inter, inter])
        shared.down_proj = down
        module.experts, module.shared_expert, module.shared_slot = experts, shared, False
    return model


@torch.no_grad()
def unfuse_projections(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_projections` and :func:`fuse_shared_expert` in place (the separate projections and the
    shared expert again, as in checkpoints)."""
    unfuse_shared_expert(model)
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
    return any(isinstance(m, (FusedLinear, SharedSlotExperts)) for m in model.modules())
