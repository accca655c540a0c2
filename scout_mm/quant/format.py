"""The Int4 weight format: quantization config, packing, and round-to-nearest group quantization.

Layout (full description in ``FORMAT.md`` beside this file): a weight used as ``x @ W`` with ``W (K, N)``
(``nn.Linear.weight.T``; expert stacks ``(E, K, N)`` as HF stores them) becomes ``qweight`` int32
``(K // 8, N)`` (nibble ``j`` of word ``r`` = code of row ``8r + j``), ``scales (K // G, N)`` and, when
asymmetric, ``zeros (K // G, N)``, with ``W = (q - zero) * scale``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from scout_mm.config import is_int
from scout_mm.kernels.int4_reference import SYMMETRIC_ZERO, dequantize, unpack_int4

__all__ = [
    "QuantConfig",
    "default_skip",
    "pack_int4",
    "unpack_int4",
    "dequantize",
    "quantize_rtn",
    "group_params",
]

QUANT_METHOD = "scout_mm_int4"  # the ``quant_method`` of ``quantization_config`` in config.json
FORMAT_VERSION = 1
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# The float dtypes an Int4 model computes in (activations, and every tensor kept in float): W4A16 kernels.
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
METHODS = ("rtn", "gptq")
# Besides quant_method and format_version: the keys deciding the stored tensors' shapes, dtypes and selection.
REQUIRED_KEYS = ("bits", "group_size", "symmetric", "scale_dtype", "skip")
# Substrings of module names that stay in their float dtype. The router stays float because a flipped top-1
# choice changes a token's whole expert; norms, embeddings and the vision tower are small or sensitive.
DEFAULT_SKIP = ("router", "norm", "vision_model", "multi_modal_projector", "embed_tokens", "lm_head")


def default_skip(quantize_lm_head: bool = False) -> tuple[str, ...]:
    """The default skip list; ``quantize_lm_head``: without ``lm_head`` (an Int4 LM head: 2.07 -> 0.54 GB for
    Scout and 4x fewer bytes read per decoded token, at some cost in logit accuracy — measure it)."""
    return tuple(s for s in DEFAULT_SKIP if not (quantize_lm_head and s == "lm_head"))


@dataclass
class QuantConfig:
    """How a model is quantized; written to ``config.json`` as ``quantization_config``."""

    group_size: int = 128
    symmetric: bool = True
    scale_dtype: str = "bfloat16"
    method: str = "rtn"  # "rtn" or "gptq"
    skip: tuple[str, ...] = field(default_factory=lambda: DEFAULT_SKIP)
    gptq_damp: float = 0.01  # GPTQ: fraction of the mean Hessian diagonal added to the diagonal
    # GPTQ: a matrix whose Hessian has fewer calibration rows than this times its input dim K is rounded to
    # nearest instead (GPTQ fitted to so few rows is worse than RTN on other inputs); 0: GPTQ from any row.
    gptq_min_rows_ratio: float = 1 / 16
    # GPTQ: columns by decreasing Hessian diagonal with RTN's group parameters fixed beforehand (see gptq.py);
    # false: natural order, group parameters from the updated weights. Both read as off from older checkpoints.
    gptq_act_order: bool = True
    bits: int = 4

    def __post_init__(self):
        # A bare string would become a tuple of its characters, each a substring of most module names.
        if isinstance(self.skip, str) or not isinstance(self.skip, (list, tuple, set, frozenset)):
            raise ValueError(f"skip={self.skip!r}; expected a list of module-name substrings")
        self.skip = tuple(sorted(self.skip)) if isinstance(self.skip, (set, frozenset)) else tuple(self.skip)
        self.validate()
        self.bits, self.group_size = int(self.bits), int(self.group_size)  # numpy ints: plain ints for JSON

    def validate(self) -> None:
        # Exact types: a config.json edited to ``64.0`` or ``"false"`` must not load as something else.
        if not is_int(self.bits) or self.bits != 4:
            raise ValueError(f"bits={self.bits!r}; only 4-bit weights are supported")
        if not is_int(self.group_size) or self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size!r}; expected one of {GROUP_SIZES}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric={self.symmetric!r}; expected true or false")
        if not isinstance(self.scale_dtype, str) or self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r}; expected one of {sorted(SCALE_DTYPES)}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; expected one of {METHODS}")
        bad_skip = [p for p in self.skip if not isinstance(p, str) or not p]
        if bad_skip:
            raise ValueError(f"skip has {bad_skip}; expected non-empty module-name substrings")
        damp = self.gptq_damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < float("inf"):
            raise ValueError(f"gptq_damp={damp!r}; expected a positive number (e.g. 0.01)")
        if not isinstance(self.gptq_act_order, bool):
            raise ValueError(f"gptq_act_order={self.gptq_act_order!r}; expected true or false")
        ratio = self.gptq_min_rows_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < float("inf"):
            raise ValueError(
                f"gptq_min_rows_ratio={ratio!r}; expected a number >= 0 (e.g. 0.0625; 0: no minimum)"
            )

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def skips(self, module_name: str) -> bool:
        """Whether the module of this dotted name stays in float (any skip pattern is a substring of it)."""
        return any(pattern in module_name for pattern in self.skip)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        if not isinstance(d, dict):
            raise ValueError(f"quantization_config is a {type(d).__name__}; expected a JSON object")
        d = dict(d)
        method = d.pop("quant_method", None)
        if method != QUANT_METHOD:
            raise ValueError(f"quantization_config quant_method={method!r}; expected {QUANT_METHOD!r}")
        version = d.pop("format_version", None)
        if not is_int(version) or version != FORMAT_VERSION:
            raise ValueError(
                f"quantization_config format_version={version!r}; this code reads {FORMAT_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"quantization_config has unknown keys {unknown}")
        # A default in place of a missing key would read the tensors against a layout they may not have.
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ValueError(
                f"quantization_config lacks {missing}; a checkpoint's config names all of {REQUIRED_KEYS}"
            )
        # Written before these existed: GPTQ codes chosen in natural order, with no row minimum.
        d.setdefault("gptq_act_order", False)
        d.setdefault("gptq_min_rows_ratio", 0.0)
        return cls(**d)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., K, N) integer codes in [0, 15] -> (..., K // 8, N) int32; nibble j of word r = row 8r + j."""
    size_k = codes.shape[-2]
    if size_k % 8:
        raise ValueError(f"K={size_k} must be a multiple of 8 to pack 8 codes per int32")
    if codes.numel() and not bool(((codes >= 0) & (codes <= 15)).all()):  # would spill into other nibbles
        raise ValueError(
            f"codes span [{codes.min().item()}, {codes.max().item()}]; expected 4-bit codes in [0, 15]"
        )
    nibbles = codes.to(torch.int64).unflatten(-2, (size_k // 8, 8))  # (..., K // 8, 8, N)
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (nibbles << shifts[:, None]).sum(dim=-2)  # disjoint bits: the sum is a bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def group_params(groups: torch.Tensor, symmetric: bool, scale_dtype: torch.dtype):
    """Scale and zero point of each group: ``groups (..., G)`` float -> (scale, zero), each (...,) fp32.

    The scale is rounded to ``scale_dtype`` here, so codes are chosen against the scale the kernels will use.
    Symmetric: ``scale = max|w| / 7``, zero 8 (codes 0..15 = -8..7). Asymmetric: min-max over a range that
    includes 0 (so zero stays exactly representable), integer zero point in [0, 15].
    """
    # The smallest positive subnormal: fp16's smallest normal (6.1e-5) would floor the scale of every group
    # whose max |w| is under ~4e-4 and round its weights to 0; a subnormal scale still keeps them.
    info = torch.finfo(scale_dtype)
    tiny = info.tiny * info.eps
    if symmetric:
        scale = groups.abs().amax(dim=-1) / 7.0
        zero = torch.full_like(scale, float(SYMMETRIC_ZERO))
    else:
        low = groups.amin(dim=-1).clamp(max=0.0)
        high = groups.amax(dim=-1).clamp(min=0.0)
        scale = (high - low) / 15.0
        zero = None
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=tiny).to(scale_dtype).float()
    if zero is None:
        zero = torch.round(-low / scale).clamp(0, 15)
    return scale, zero


def codes_for(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Nearest code in [0, 15] of each weight given its (broadcast) scale and zero point."""
    return (torch.round(weight / scale) + zero).clamp(0, 15)


def check_weight(weight: torch.Tensor, group_size: int) -> None:
    """ValueError unless ``weight (..., K, N)`` is a finite float matrix whose K the group size divides."""
    if not weight.is_floating_point():
        raise ValueError(f"weight dtype {weight.dtype}; expected a floating-point weight")
    if weight.dim() < 2:
        raise ValueError(f"weight shape {tuple(weight.shape)}; expected (..., K, N)")
    size_k = weight.shape[-2]
    if not is_int(group_size) or group_size <= 0 or size_k % group_size:
        raise ValueError(f"K={size_k} (the input dim) is not a multiple of group size {group_size}")
    # A NaN or inf would become a NaN/inf scale or a clamped code: garbage that loads without complaint.
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"weight has {bad} non-finite values (NaN or inf); cannot quantize it")


def quantize_rtn(
    weight: torch.Tensor,  # (..., K, N)
    group_size: int,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest group quantization -> (qweight, scales, zeros or None) in the packed layout."""
    check_weight(weight, group_size)
    size_k = weight.shape[-2]
    w = weight.float().transpose(-1, -2).unflatten(-1, (size_k // group_size, group_size))  # (..., N, K/G, G)
    scale, zero = group_params(w, symmetric, scale_dtype)  # (..., N, K/G)
    codes = codes_for(w, scale[..., None], zero[..., None]).flatten(-2).transpose(-1, -2)  # (..., K, N)
    return _packed(codes, scale, zero, symmetric, scale_dtype)


def _packed(codes, scale, zero, symmetric, scale_dtype):
    """codes (..., K, N); scale/zero (..., N, K/G) -> the stored tensors."""
    qweight = pack_int4(codes)
    scales = scale.transpose(-1, -2).contiguous().to(scale_dtype)
    zeros = None if symmetric else zero.transpose(-1, -2).contiguous().to(scale_dtype)
    return qweight, scales, zeros
