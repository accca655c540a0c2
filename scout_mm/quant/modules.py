"""Int4 drop-in modules: :class:`Int4Linear` for ``nn.Linear`` and :class:`Int4Experts` for
:class:`scout_mm.moe.Experts` (same ``forward(hidden, topk_weights, topk_ids)`` seam), so the model code never
knows its weights are Int4. Packed tensors are buffers (they never train); a bias stays a float parameter.
:class:`HostEmbedding` (``nn.Embedding`` seam) keeps the token-embedding table in pinned host memory.
"""

from __future__ import annotations

import torch
from torch import nn

from scout_mm import kernels
from scout_mm.checkpoint import dtype_names
from scout_mm.quant.format import FLOAT_DTYPES, QuantConfig, dequantize


def _register_packed(module: nn.Module, prefix: str, size_k: int, size_n: int, cfg: QuantConfig, lead=(),
                     device=None) -> None:  # fmt: skip
    """Empty packed buffers ``{prefix}qweight``, ``{prefix}scales`` (+ ``{prefix}zeros``)."""
    groups = size_k // cfg.group_size
    module.register_buffer(prefix + "qweight", torch.empty(*lead, size_k // 8, size_n, dtype=torch.int32,
                                                           device=device))  # fmt: skip
    module.register_buffer(prefix + "scales", torch.empty(*lead, groups, size_n, dtype=cfg.torch_scale_dtype,
                                                          device=device))  # fmt: skip
    zeros = (
        None
        if cfg.symmetric
        else torch.empty(*lead, groups, size_n, dtype=cfg.torch_scale_dtype, device=device)
    )
    module.register_buffer(prefix + "zeros", zeros)


def check_divisible(name: str, size_k: int, group_size: int) -> None:
    if size_k % group_size or size_k % 8:
        raise ValueError(
            f"{name}: input dim {size_k} is not a multiple of group size {group_size}; pick a group size that "
            "divides it or add the module to the skip list"
        )


def check_activations(name: str, x: torch.Tensor, size_k: int) -> None:
    """ValueError unless ``x (..., size_k)`` is a W4A16 activation: the references would otherwise round the
    dequantized weight to an int8 input's dtype (a silently wrong answer) or fail deep inside a matmul."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: input dtype {x.dtype}; Int4 weights take {dtype_names(FLOAT_DTYPES)} activations"
        )
    if x.dim() == 0 or x.shape[-1] != size_k:
        raise ValueError(f"{name}: input shape {tuple(x.shape)}; expected (..., {size_k})")


class Int4Linear(nn.Module):
    """``y = x @ W + b`` with ``W (in, out)`` stored packed (``qweight (in // 8, out)``, ``scales``, ``zeros``)."""

    def __init__(self, in_features: int, out_features: int, cfg: QuantConfig, bias: bool = False,
                 device=None, name: str = "Int4Linear"):  # fmt: skip
        super().__init__()
        check_divisible(name, in_features, cfg.group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, cfg.group_size
        _register_packed(self, "", in_features, out_features, cfg, device=device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    @classmethod
    def from_packed(cls, packed: tuple, cfg: QuantConfig, bias: torch.Tensor | None = None, name: str = ""):
        qweight, scales, zeros = packed
        module = cls(qweight.shape[0] * 8, qweight.shape[1], cfg, bias is not None, device="meta", name=name)
        module.qweight, module.scales, module.zeros = qweight, scales, zeros
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return module

    def packed(self) -> tuple:
        return self.qweight, self.scales, self.zeros

    @classmethod
    def concat(cls, parts: list[Int4Linear]) -> Int4Linear:
        """One module computing every part's outputs side by side (``scout_mm.fusion.fuse_projections``): the
        (K / 8, N) layout makes it a cat of qweight / scales / zeros along N."""
        first = parts[0]
        for p in parts:
            if (p.in_features, p.group_size, p.zeros is None, p.scales.dtype, p.bias is None) != (
                first.in_features, first.group_size, first.zeros is None, first.scales.dtype, first.bias is None
            ):  # fmt: skip
                raise ValueError(
                    f"cannot concatenate Int4Linear({p.extra_repr()}) with ({first.extra_repr()})"
                )
        tensors = [None if getattr(first, n) is None else torch.cat([getattr(p, n) for p in parts], dim=1)
                   for n in ("qweight", "scales", "zeros")]  # fmt: skip
        bias = None if first.bias is None else torch.cat([p.bias.detach() for p in parts])
        return cls._from_tensors(first.group_size, *tensors, bias)

    def split(self, sizes: list[int]) -> list[Int4Linear]:
        """The inverse of :meth:`concat`: one module per ``sizes`` block of outputs (copies, not views)."""
        if sum(sizes) != self.out_features:
            raise ValueError(f"sizes {sizes} do not add up to out_features={self.out_features}")
        parts, start = [], 0
        for size in sizes:
            cut = [None if t is None else t[:, start : start + size].clone() for t in self.packed()]
            bias = None if self.bias is None else self.bias.detach()[start : start + size].clone()
            parts.append(self._from_tensors(self.group_size, *cut, bias))
            start += size
        return parts

    @classmethod
    def _from_tensors(cls, group_size, qweight, scales, zeros, bias) -> Int4Linear:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features, module.group_size = (
            qweight.shape[0] * 8,
            qweight.shape[1],
            group_size,
        )
        module.register_buffer("qweight", qweight)
        module.register_buffer("scales", scales)
        module.register_buffer("zeros", zeros)
        module.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return module

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:  # (in, out)
        return dequantize(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_activations("Int4Linear", x, self.in_features)
        shape = x.shape
        out = kernels.int4_linear(
            x.reshape(-1, shape[-1]), self.qweight, self.scales, self.zeros, self.group_size
        )
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"symmetric={self.zeros is None}, bias={self.bias is not None}")  # fmt: skip


class Int4Experts(nn.Module):
    """Routed SwiGLU experts with packed ``gate_up (E, H // 8, 2I)`` and ``down (E, I // 8, H)`` stacks."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, cfg: QuantConfig, device=None,
                 name: str = "Int4Experts"):  # fmt: skip
        super().__init__()
        check_divisible(name + ".gate_up_proj", hidden_size, cfg.group_size)
        check_divisible(name + ".down_proj", intermediate_size, cfg.group_size)
        self.n_experts, self.group_size = n_experts, cfg.group_size
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        _register_packed(self, "gate_up_", hidden_size, 2 * intermediate_size, cfg, (n_experts,), device)
        _register_packed(self, "down_", intermediate_size, hidden_size, cfg, (n_experts,), device)

    def set_packed(self, gate_up: tuple, down: tuple) -> None:
        self.gate_up_qweight, self.gate_up_scales, self.gate_up_zeros = gate_up
        self.down_qweight, self.down_scales, self.down_zeros = down

    def packed(self) -> tuple[tuple, tuple]:
        return ((self.gate_up_qweight, self.gate_up_scales, self.gate_up_zeros),
                (self.down_qweight, self.down_scales, self.down_zeros))  # fmt: skip

    def append_expert(self, gate_up: Int4Linear, down: Int4Linear) -> Int4Experts | None:
        """A new module whose stacks are these plus one more expert at index ``n_experts`` (``gate_up``: the
        gate|up projections as one (H, 2I) Int4Linear, ``down``: (I, H); ``scout_mm.fusion.fuse_shared_expert``),
        or None when the parts do not fit the stacks (sizes, group size, zeros, scale dtype, device, a bias)."""
        (gu_q, gu_s, gu_z), (dn_q, dn_s, dn_z) = self.packed()
        for part, size_k, size_n, stack in ((gate_up, self.hidden_size, 2 * self.intermediate_size, gu_s),
                                            (down, self.intermediate_size, self.hidden_size, dn_s)):  # fmt: skip
            if not (
                type(part) is Int4Linear
                and (part.in_features, part.out_features, part.group_size)
                == (size_k, size_n, self.group_size)
                and part.bias is None
                and (part.zeros is None) == (gu_z is None)
                and part.scales.dtype == stack.dtype
                and part.qweight.device == stack.device
            ):
                return None
        stacks = [None if stack is None else torch.cat([stack, extra[None]])
                  for stack, extra in zip((gu_q, gu_s, gu_z, dn_q, dn_s, dn_z), (*gate_up.packed(), *down.packed()))]  # fmt: skip
        return Int4Experts._from_stacks(self.group_size, stacks[:3], stacks[3:])

    def pop_expert(self) -> tuple[Int4Experts, Int4Linear, Int4Linear]:
        """The inverse of :meth:`append_expert`: (the first ``n_experts - 1`` experts, the last one's gate|up and
        down as Int4Linear), copies with the exact packed values."""
        gate_up, down = self.packed()
        first = [None if t is None else t[:-1].clone() for t in (*gate_up, *down)]
        last = [None if t is None else t[-1].clone() for t in (*gate_up, *down)]
        experts = Int4Experts._from_stacks(self.group_size, first[:3], first[3:])
        return (experts, Int4Linear._from_tensors(self.group_size, *last[:3], None),
                Int4Linear._from_tensors(self.group_size, *last[3:], None))  # fmt: skip

    @classmethod
    def _from_stacks(cls, group_size: int, gate_up, down) -> Int4Experts:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.n_experts, module.group_size = gate_up[0].shape[0], group_size
        module.hidden_size, module.intermediate_size = gate_up[0].shape[1] * 8, down[0].shape[1] * 8
        for prefix, tensors in (("gate_up_", gate_up), ("down_", down)):
            for name, t in zip(("qweight", "scales", "zeros"), tensors):
                module.register_buffer(prefix + name, t)
        return module

    def forward(self, hidden, topk_weights, topk_ids):
        check_activations("Int4Experts", hidden, self.hidden_size)
        gate_up, down = self.packed()
        return kernels.int4_moe_experts(hidden, topk_weights, topk_ids, gate_up, down, self.group_size)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, group_size={self.group_size}")  # fmt: skip


class HostEmbedding(nn.Module):
    """Inference-only ``nn.Embedding`` whose table stays in pinned host memory: a decode step reads one row
    over the bus from inside a GPU kernel (:func:`scout_mm.kernels.int4.gather_rows`, CUDA-graph capturable),
    so the table (2.07 GB for Scout's 202048 x 5120 bf16) takes no GPU memory. The table is a buffer, not a
    parameter: ``model.device`` / ``model.dtype`` keep reporting the GPU weights."""

    def __init__(self, weight: torch.Tensor, device: torch.device | str):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.output_device = torch.device(device)
        table = weight.detach().to("cpu").contiguous()
        self.register_buffer("weight", table.pin_memory() if self.output_device.type == "cuda" else table)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.output_device.type == "cuda" and input_ids.is_cuda:
            from scout_mm.kernels import int4

            return int4.gather_rows(self.weight, input_ids, input_ids.device)
        return torch.nn.functional.embedding(input_ids.to(self.weight.device), self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host={self.weight.device}, pinned={self.weight.is_pinned()}"


def offload_embeddings(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Move the token-embedding table of an inference model to pinned host memory, lookups writing to
    ``device`` (default: where the table is now); returns the bytes freed on the device. Not for tied LM heads
    (the head needs the table on the device)."""
    text = model.language_model
    if model.config.tie_word_embeddings:
        raise ValueError("tie_word_embeddings: the LM head uses the embedding table; keep it on the device")
    old = text.model.embed_tokens
    if isinstance(old, HostEmbedding):
        return 0
    on_device = old.weight.device.type == "cuda"
    device = torch.device(device) if device is not None else old.weight.device
    text.model.embed_tokens = HostEmbedding(old.weight, device)
    return old.weight.numel() * old.weight.element_size() if on_device else 0
