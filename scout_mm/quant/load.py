"""Load an Int4 checkpoint straight onto its device: the model skeleton is built on the meta device, its
targets swapped for empty Int4 modules (the same selection the quantizer used), and every tensor is read from
the memory-mapped shards and moved to the device one at a time — no float copy of a quantized weight exists
at any point, and host memory holds at most one tensor beyond the page cache.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from scout_mm.checkpoint import (
    LM_HEAD,
    CheckpointError,
    check_dtype,
    check_float_tensor,
    check_folder,
    config_dtype,
    iter_checkpoint,
)
from scout_mm.config import ScoutConfig, read_json_object
from scout_mm.quant.format import FLOAT_DTYPES, QuantConfig
from scout_mm.quant.modules import HostEmbedding, Int4Experts, Int4Linear, offload_embeddings
from scout_mm.quant.quantize import check_int4_device, replace_with_empty_int4

ACTIVATION_DTYPES = FLOAT_DTYPES
EMBEDDING_KEY = "language_model.model.embed_tokens.weight"


def read_quant_config(path: str | os.PathLike) -> tuple[dict, QuantConfig]:
    """(the raw config.json dict, its QuantConfig); CheckpointError when the folder is not an Int4 checkpoint."""
    path = check_folder(path)
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json at {file}")
    hf = read_json_object(file, CheckpointError)
    quant = hf.get("quantization_config")
    if quant is None:
        raise CheckpointError(
            f"{file} has no quantization_config: not an Int4 checkpoint (load it with "
            "ScoutForConditionalGeneration.from_pretrained or run scripts/generate.py without --int4; or quantize "
            "it with scripts/quantize.py)"
        )
    try:
        return hf, QuantConfig.from_dict(quant)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: bad quantization_config: {e}") from e


def load_quantized(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    host_embeddings: bool = False,
    fuse: bool = True,
    fuse_shared: bool = True,
):
    """An Int4 checkpoint (written by ``scripts/quantize.py`` / :func:`scout_mm.quant.save_quantized`) as a
    ready model: packed weights as stored, every float tensor in ``dtype`` (the activation dtype; None or
    ``"auto"``: the one they were saved in), all on ``device`` (``cuda``: the Triton kernels; ``cpu``: the
    PyTorch references). ``host_embeddings``: keep
    the token-embedding table in pinned host memory (:class:`HostEmbedding`; saves its bytes of GPU memory,
    2.07 GB for Scout; it is read to the host and never passes through the device). ``fuse``: q|k|v and
    gate|up projections as one Int4 matmul each (:func:`scout_mm.fusion.fuse_projections`: fewer decode
    launches; such a model's ``state_dict()`` raises until :func:`scout_mm.fusion.unfuse_projections`).
    ``fuse_shared``: each MoE layer's shared expert as one more expert of its Int4 routed stacks
    (:func:`scout_mm.fusion.fuse_shared_expert`: shared + routed in one grouped launch per GEMM; undone by
    ``unfuse_projections`` as well)."""
    device = check_int4_device(device)
    if host_embeddings and device.type != "cuda":
        raise ValueError(
            f"host_embeddings=True keeps the table in pinned host memory for a CUDA model; device={device}"
        )
    dtype = check_dtype(dtype, ACTIVATION_DTYPES)
    path = os.fspath(path)
    hf, cfg = read_quant_config(path)
    try:
        config = ScoutConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {e}") from e
    if dtype is None:  # None / "auto": the dtype the float tensors were saved in
        dtype = config_dtype(path) or torch.bfloat16
        dtype = dtype if dtype in ACTIVATION_DTYPES else torch.float32
    from scout_mm.model import ScoutForConditionalGeneration

    with torch.device("meta"):
        model = ScoutForConditionalGeneration(config)
    try:
        replace_with_empty_int4(model, cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: config.json and its quantization_config disagree: {e}") from e
    expected = dict(model.named_parameters())
    packed = {
        f"{name}.{attr}": buffer
        for name, module in model.named_modules()
        if isinstance(module, (Int4Linear, Int4Experts))
        for attr, buffer in module.named_buffers(recurse=False)
        if buffer is not None
    }
    expected.update(packed)
    if config.tie_word_embeddings and isinstance(model.language_model.lm_head, nn.Linear):
        expected.pop(LM_HEAD, None)
    loaded, unexpected = set(), []
    for file, key, load in iter_checkpoint(path):
        target = expected.get(key)
        if target is None:
            unexpected.append(key)
            continue
        tensor = load()
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, but the config (group_size="
                f"{cfg.group_size}, symmetric={cfg.symmetric}) expects {tuple(target.shape)}"
            )
        if key in packed:  # stored as quantized: int32 codes, scales/zeros in the config's dtype
            if tensor.dtype != target.dtype:
                raise CheckpointError(
                    f"{file}: tensor {key!r} has dtype {tensor.dtype}; expected {target.dtype}"
                )
            _check_scales_zeros(file, key, tensor)
            tensor = tensor.to(device)
        else:
            check_float_tensor(file, key, tensor, target.shape)
            # the host-resident embedding table stays on the host: it never takes device memory
            on_host = host_embeddings and key == EMBEDDING_KEY
            tensor = tensor.to(dtype=dtype) if on_host else tensor.to(device=device, dtype=dtype)
        _assign(model, key, tensor)
        loaded.add(key)
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} tensors match nothing in the config + quantization_config, e.g. "
            f"{unexpected[:5]}"
        )
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}"
        )
    if config.tie_word_embeddings and isinstance(model.language_model.lm_head, nn.Linear):
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    model.quant_config = cfg
    if host_embeddings:
        offload_embeddings(model, device)
    if fuse:
        from scout_mm.fusion import fuse_projections

        fuse_projections(model)
    if fuse_shared:
        from scout_mm.fusion import fuse_shared_expert

        fuse_shared_expert(model)
        if device.type == "cuda":
            # The fold replaced each layer's expert stacks: hand the old ones back to the driver, so the memory
            # left for KV caches (and what nvidia-smi shows) is not held in PyTorch's cache (13 GB for Scout).
            torch.cuda.empty_cache()
    return model.eval()


def _check_scales_zeros(file: str, key: str, tensor: torch.Tensor) -> None:
    """Values no quantizer writes (a NaN/inf scale, a zero or negative one, a zero point off the integers 0..15)
    mean a corrupt file, and would give NaN, zeroed or sign-flipped weights; codes cannot be checked (every int32
    is 8 valid codes)."""
    if key.endswith("scales") and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{file}: tensor {key!r} holds non-finite scales (NaN or inf)")
    if key.endswith("scales") and not bool((tensor > 0).all()):  # the quantizers keep every scale > 0
        raise CheckpointError(
            f"{file}: tensor {key!r} holds scales <= 0 (the quantizers write positive scales)"
        )
    if key.endswith("zeros") and not bool(
        ((tensor >= 0) & (tensor <= 15) & (tensor == tensor.round())).all()
    ):
        raise CheckpointError(f"{file}: tensor {key!r} holds zero points outside the integers 0..15")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor


def quantized_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's tensors: packed weights, their scales/zeros, everything kept in float (these three
    make ``total``, the weights on the model's device) and ``host``: a :class:`HostEmbedding` table kept in
    pinned host memory (not in ``total``)."""
    out = {"int4_weights": 0, "scales_zeros": 0, "float": 0, "host": 0}
    seen = set()
    for module in model.modules():
        tensors = [("float", t) for t in module.parameters(recurse=False)]
        for name, t in module.named_buffers(recurse=False):
            if isinstance(module, HostEmbedding):
                key = "host"
            else:
                key = "int4_weights" if name.endswith("qweight") else "scales_zeros"
            tensors.append((key, t))
        for key, t in tensors:
            if t is None or id(t) in seen:  # tied weights count once
                continue
            seen.add(id(t))
            out[key] += t.numel() * t.element_size()
    out["total"] = out["int4_weights"] + out["scales_zeros"] + out["float"]
    return out
