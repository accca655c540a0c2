"""Quantize a model to Int4: in memory (:func:`quantize_model`) or a checkpoint folder to another, one
decoder layer at a time, never holding the whole float model (:func:`quantize_checkpoint`).

Both run the same per-layer step. RTN quantizes each target weight on its own. GPTQ runs the calibration
samples through the model layer by layer: the inputs of layer ``i`` are the outputs of the already-quantized
layers before it; every target in the layer gets the Hessian of its own inputs (routed experts: the rows
each expert received, already scaled by their routing weight, and the SwiGLU outputs for ``down``), then the
layer is quantized and run again to give the next layer its inputs. Targets outside the decoder layers (the
vision tower or the LM head when they are taken off the skip list) are quantized with RTN, and so is every
matrix whose Hessian has fewer than ``QuantConfig.gptq_min_rows_ratio * K`` rows (typically routed experts
that few calibration tokens reach). A :class:`QuantReport` counts how each matrix was quantized.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from scout_mm.checkpoint import (
    LM_HEAD,
    PROCESSOR_FILES,
    CheckpointError,
    check_device,
    check_dtype,
    check_float_tensor,
    check_folder,
    checkpoint_files,
    config_dtype,
    dtype_names,
    open_shard,
    param_name,
    parse_size,
    stored_twice,
    write_folder_atomically,
)
from scout_mm.config import ScoutConfig
from scout_mm.generation import _caller_stacklevel
from scout_mm.moe import Experts
from scout_mm.quant.format import FLOAT_DTYPES, QuantConfig, quantize_rtn
from scout_mm.quant.gptq import Hessian, quantize_gptq
from scout_mm.quant.modules import Int4Experts, Int4Linear, check_divisible

LAYERS = "language_model.model.layers."


class CalibrationWarning(UserWarning):
    """GPTQ rounded some matrices to nearest for lack of calibration rows (see :class:`QuantReport`)."""


@dataclass
class QuantReport:
    """How each matrix of one quantization was quantized. A matrix is an ``nn.Linear`` weight, or one expert's
    ``gate_up_proj`` or ``down_proj`` (named ``...experts.down_proj[3]``)."""

    gptq: int = 0
    rtn: int = 0  # rounded to nearest by choice: method "rtn", or outside the decoder layers
    # GPTQ wanted but rounded to nearest: (name, rows, K) with rows < min_rows_ratio * K, and names with no row
    # at all (an expert no calibration token was routed to).
    few_rows: list[tuple[str, int, int]] = field(default_factory=list)
    no_rows: list[str] = field(default_factory=list)
    min_rows_ratio: float = QuantConfig.gptq_min_rows_ratio  # the config's, that few_rows fell below

    @property
    def starved(self) -> int:
        """Matrices GPTQ would have quantized but rounded to nearest for lack of calibration rows."""
        return len(self.few_rows) + len(self.no_rows)

    def summary(self) -> str:
        """One line: ``GPTQ: 1230 matrices; 612 had fewer than K/16 calibration rows ...``."""
        if not self.gptq and not self.starved:
            return f"RTN: {self.rtn} matrices rounded to nearest"
        parts = [f"GPTQ: {self.gptq} matrices"]
        if self.rtn:
            parts.append(f"{self.rtn} outside the decoder layers rounded to nearest")
        if self.few_rows:
            name, rows, size_k = min(self.few_rows, key=lambda entry: entry[1] / entry[2])
            parts.append(f"{len(self.few_rows)} had fewer than {_fraction_of_k(self.min_rows_ratio)} calibration "
                         f"rows (fewest: {name}, {rows} for K={size_k}) and were rounded to nearest")  # fmt: skip
        if self.no_rows:
            parts.append(f"{len(self.no_rows)} had no calibration row (e.g. {self.no_rows[0]}) and were rounded "
                         "to nearest")  # fmt: skip
        line = "; ".join(parts)
        if self.starved:
            line += (" — pass more calibration data (scripts/quantize.py --calibration-data, "
                     "scout_mm.quant.calibration_from_jsonl)")  # fmt: skip
        return line


def _fraction_of_k(ratio: float) -> str:
    inverse = 1 / ratio
    if ratio == 1:
        return "K"
    return f"K/{inverse:g}" if inverse == round(inverse) else f"{ratio:g} x K"


# ----------------------------------------------------------------------------------------------------------
# Which modules, and how each one is quantized
# ----------------------------------------------------------------------------------------------------------


def quant_targets(model: nn.Module, cfg: QuantConfig, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(full name, module) of every ``nn.Linear`` / ``Experts`` that ``cfg`` quantizes, in model order."""
    found = []
    for name, module in model.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if isinstance(module, (nn.Linear, Experts)) and not cfg.skips(full):
            found.append((full, module))
    return found


def check_int4_device(device) -> torch.device:
    """``device`` as a torch device that exists here and runs Int4 (cuda: the Triton kernels; cpu: the
    references); a ValueError naming it otherwise (meta holds no data, other backends have no Int4 path)."""
    device = check_device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device {device}; Int4 models run on 'cuda' (Triton kernels) or 'cpu' (references)")
    return device


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _quantize_weight(name: str, weight, cfg: QuantConfig, hessian: Hessian | None, report: QuantReport):
    """(K, N) float weight -> packed tensors: GPTQ when ``hessian`` has at least ``cfg.gptq_min_rows_ratio * K``
    rows (and one), else RTN; the choice is counted in ``report``."""
    size_k = weight.shape[0]
    try:
        if hessian is None:
            report.rtn += 1
        elif hessian.rows == 0:
            report.no_rows.append(name)
        elif hessian.rows < cfg.gptq_min_rows_ratio * size_k:
            report.few_rows.append((name, hessian.rows, size_k))
        else:
            report.gptq += 1
            return quantize_gptq(
                weight, hessian, cfg.group_size, cfg.symmetric, cfg.torch_scale_dtype, cfg.gptq_damp,
                cfg.gptq_act_order,
            )  # fmt: skip
        return quantize_rtn(weight, cfg.group_size, cfg.symmetric, cfg.torch_scale_dtype)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def quantize_module(
    name: str,
    module: nn.Module,
    cfg: QuantConfig,
    hessians: dict | None = None,
    report: QuantReport | None = None,
) -> nn.Module:
    """The Int4 replacement of one ``nn.Linear`` or ``Experts`` (GPTQ where ``hessians`` has enough of its
    inputs); ``report`` counts how each matrix was quantized."""
    hessians = hessians or {}
    report = report if report is not None else QuantReport(min_rows_ratio=cfg.gptq_min_rows_ratio)
    if isinstance(module, nn.Linear):
        check_divisible(name, module.in_features, cfg.group_size)
        packed = _quantize_weight(name, module.weight.detach().T, cfg, hessians.get(name), report)
        qmodule = Int4Linear.from_packed(packed, cfg, module.bias, name)
    elif isinstance(module, Experts):
        n_experts, hidden_size, two_inter = module.gate_up_proj.shape
        qmodule = Int4Experts(n_experts, hidden_size, two_inter // 2, cfg, device="meta", name=name)
        gate_h = hessians.get(name + ".gate_up_proj", [None] * n_experts)
        down_h = hessians.get(name + ".down_proj", [None] * n_experts)
        # One expert at a time: the fp32 copies of a Scout expert stack would be 8 GB.
        gate_up = [_quantize_weight(f"{name}.gate_up_proj[{e}]", module.gate_up_proj[e].detach(), cfg,
                                    gate_h[e], report) for e in range(n_experts)]  # fmt: skip
        down = [_quantize_weight(f"{name}.down_proj[{e}]", module.down_proj[e].detach(), cfg, down_h[e], report)
                for e in range(n_experts)]  # fmt: skip
        qmodule.set_packed(_stack(gate_up), _stack(down))
    else:
        raise TypeError(f"{name}: cannot quantize a {type(module).__name__}")
    return qmodule


def _stack(per_expert: list[tuple]) -> tuple:
    return tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*per_expert))


def _quantize_in_place(
    root: nn.Module, cfg: QuantConfig, report: QuantReport, prefix: str = "", hessians=None
):
    for full, module in quant_targets(root, cfg, prefix):
        local = full[len(prefix) + 1 :] if prefix else full
        _set_module(root, local, quantize_module(full, module, cfg, hessians, report))


def _empty_int4(name: str, module: nn.Module, cfg: QuantConfig) -> nn.Module:
    """The Int4 module (meta buffers) replacing target ``module``; ValueError when ``cfg`` cannot fit it."""
    if isinstance(module, nn.Linear):
        return Int4Linear(module.in_features, module.out_features, cfg, module.bias is not None, "meta", name)
    n_experts, hidden_size, two_inter = module.gate_up_proj.shape
    return Int4Experts(n_experts, hidden_size, two_inter // 2, cfg, "meta", name)


def replace_with_empty_int4(model: nn.Module, cfg: QuantConfig) -> None:
    """Swap every target for an Int4 module with empty (meta) buffers: the skeleton an Int4 checkpoint loads
    into. Same selection as quantization, so the module tree always matches the saved tensors."""
    for name, module in quant_targets(model, cfg):
        _set_module(model, name, _empty_int4(name, module, cfg))


def _check_quantizable(model: nn.Module, cfg: QuantConfig) -> None:
    """Every target fits ``cfg`` (group size dividing its input dims), checked before any weight is quantized:
    a target outside the decoder layers would otherwise fail only after all of them (an hour for Scout)."""
    if getattr(model, "quant_config", None) is not None or any(
        isinstance(m, (Int4Linear, Int4Experts)) for m in model.modules()
    ):
        raise ValueError("model is already quantized (it holds Int4 modules); quantize a float model")
    # The Int4 modules take bf16/fp16/fp32 activations only: a float64 model would quantize, then fail to run.
    for name, param in model.named_parameters():
        if param.dtype not in FLOAT_DTYPES:
            raise ValueError(f"parameter {name} has dtype {param.dtype}; quantize a model in one of "
                             f"{dtype_names(FLOAT_DTYPES)} (e.g. model.to(torch.float32))")  # fmt: skip
    for name, module in quant_targets(model, cfg):
        _empty_int4(name, module, cfg)


def _check_matches_config(model: nn.Module, cfg: QuantConfig) -> None:
    """The modules are what a loader rebuilds from ``cfg`` (targets Int4 with its group size, zeros and scale
    dtype; nothing else Int4), so a saved checkpoint always loads."""
    left = [name for name, _ in quant_targets(model, cfg)]
    if left:
        raise ValueError(f"quant_config quantizes {left[:3]}, but the model holds them in float")
    for name, module in model.named_modules():
        if not isinstance(module, (Int4Linear, Int4Experts)):
            continue
        if cfg.skips(name):
            raise ValueError(f"{name} is Int4, but quant_config.skip {list(cfg.skip)} keeps it in float")
        scales = module.scales if isinstance(module, Int4Linear) else module.gate_up_scales
        zeros = module.zeros if isinstance(module, Int4Linear) else module.gate_up_zeros
        found = (module.group_size, zeros is None, scales.dtype)
        expected = (cfg.group_size, cfg.symmetric, cfg.torch_scale_dtype)
        if found != expected:
            raise ValueError(
                f"{name}: (group_size, symmetric, scale dtype) = {found}, but quant_config says {expected}"
            )


# ----------------------------------------------------------------------------------------------------------
# GPTQ calibration: per-layer Hessians
# ----------------------------------------------------------------------------------------------------------


class _CalibrationExperts(nn.Module):
    """Stands in for ``Experts`` during calibration: same output (per-expert fp32 loop), and records each
    expert's gate_up input rows (routing weight applied: Llama 4 scales the expert INPUT) and down input rows."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.experts = experts
        n_experts, hidden_size, two_inter = experts.gate_up_proj.shape
        device = experts.gate_up_proj.device
        self.gate_up = [Hessian(hidden_size, device) for _ in range(n_experts)]
        self.down = [Hessian(two_inter // 2, device) for _ in range(n_experts)]

    def forward(self, hidden, topk_weights, topk_ids):
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for e in range(len(self.gate_up)):
            token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
            if token.numel() == 0:
                continue
            rows = hidden[token].float() * topk_weights[token, slot, None].float()
            self.gate_up[e].add(rows)
            gate, up = (rows @ self.experts.gate_up_proj[e].float()).chunk(2, dim=-1)
            h = F.silu(gate) * up
            self.down[e].add(h)
            out.index_add_(0, token, h @ self.experts.down_proj[e].float())
        return out.to(hidden.dtype)


@torch.no_grad()
def _layer_hessians(layer: nn.Module, prefix: str, inputs: list, text_cfg, cfg: QuantConfig) -> dict:
    hessians, hooks, swapped = {}, [], []
    for full, module in quant_targets(layer, cfg, prefix):
        local = full[len(prefix) + 1 :]
        if isinstance(module, nn.Linear):
            hessians[full] = h = Hessian(module.in_features, module.weight.device)
            hooks.append(module.register_forward_pre_hook(lambda m, args, h=h: h.add(args[0])))
        else:
            calib = _CalibrationExperts(module)
            _set_module(layer, local, calib)
            swapped.append((local, module))
            hessians[full + ".gate_up_proj"], hessians[full + ".down_proj"] = calib.gate_up, calib.down
    try:
        for x in inputs:
            run_layer(layer, x, text_cfg)
    finally:
        for hook in hooks:
            hook.remove()
        for local, module in swapped:
            _set_module(layer, local, module)
    return hessians


def run_layer(layer: nn.Module, x: torch.Tensor, text_cfg) -> torch.Tensor:
    """One decoder layer on one unpadded sequence ``x (1, seq, hidden)``, as the model's forward runs it."""
    from scout_mm.model import rope_inv_freq

    positions = torch.arange(x.shape[1], device=x.device)[None]
    angles = positions[..., None].float() * rope_inv_freq(text_cfg, x.device)
    return layer(x, (torch.cos(angles), torch.sin(angles)), positions, None)[0]


@torch.no_grad()
def _embed_calibration(model, calibration: list[dict]) -> list[torch.Tensor]:
    device, dtype = model.get_input_embeddings().weight.device, model.get_input_embeddings().weight.dtype
    out = []
    for i, sample in enumerate(calibration):
        ids = sample["input_ids"].to(device)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(
                f"calibration input_ids shape {tuple(ids.shape)}; expected (1, seq): one sequence each"
            )
        pixels = sample.get("pixel_values")
        if pixels is not None and model.config.vision is None:
            raise ValueError(
                f"calibration sample {i} has pixel_values, but the model is text-only (config.vision is None); "
                "make the set with calibration_set(processor, n, with_images=False)"
            )
        pixels = pixels.to(device=device, dtype=dtype) if pixels is not None else None
        out.append(model.embed_inputs(ids, pixels)[0])
    return out


@torch.no_grad()
def _quantize_layer(layer, prefix, inputs, text_cfg, cfg: QuantConfig, report: QuantReport):
    """Quantize one decoder layer in place; returns the next layer's inputs (GPTQ: ``inputs`` itself, each
    sample replaced by its output as soon as it is computed, so one copy of the hidden states is alive) or
    None."""
    hessians = _layer_hessians(layer, prefix, inputs, text_cfg, cfg) if inputs is not None else None
    _quantize_in_place(layer, cfg, report, prefix, hessians)
    if inputs is None:
        return None
    for i, x in enumerate(inputs):
        inputs[i] = run_layer(layer, x, text_cfg)
    return inputs


def _report_starved(report: QuantReport) -> None:
    if report.starved:
        warnings.warn(report.summary(), CalibrationWarning, stacklevel=_caller_stacklevel())


def _check_output(path: str, overwrite: bool) -> None:
    """The output folder must not exist, or be empty, unless ``overwrite``: replacing what is there would drop
    another model's weights and leave its other files (tokenizer, generation config) beside the new ones."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise NotADirectoryError(f"output path {path} exists and is not a folder")
    entries = sorted(os.listdir(path))
    if entries and not overwrite:
        raise FileExistsError(
            f"output folder {path} already exists and is not empty ({len(entries)} entries, e.g. {entries[:3]}); "
            "write to a new folder, or pass overwrite=True (scripts/quantize.py --overwrite) to replace the "
            "checkpoint in it"
        )


def _check_method(cfg: QuantConfig, calibration) -> None:
    if cfg.method == "gptq" and not calibration:
        raise ValueError("method='gptq' needs calibration samples (see scout_mm.quant.calibration_set)")
    if cfg.method == "rtn" and calibration:
        raise ValueError("calibration samples given with method='rtn', which does not use them")


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_model(model, cfg: QuantConfig | None = None, calibration: list[dict] | None = None):
    """Quantize ``model`` in place (module swap) and return it, with ``model.quant_report`` (a
    :class:`QuantReport`) saying how each matrix was quantized; a :class:`CalibrationWarning` when GPTQ rounded
    matrices to nearest for too few calibration rows.

    ``calibration``: GPTQ's samples, each ``{"input_ids": (1, seq), "pixel_values": optional}`` (e.g. from
    :func:`scout_mm.quant.calibration_set` or :func:`scout_mm.quant.calibration_from_jsonl`). Their hidden
    states are all kept while the layers are quantized: tokens x hidden_size in the model's dtype."""
    cfg = cfg or QuantConfig()
    _check_method(cfg, calibration)
    _check_quantizable(model, cfg)
    report = QuantReport(min_rows_ratio=cfg.gptq_min_rows_ratio)
    inputs = _embed_calibration(model, calibration) if cfg.method == "gptq" else None
    layers = model.language_model.model.layers
    for i, layer in enumerate(tqdm(layers, desc="quantizing", unit="layer", leave=False)):
        inputs = _quantize_layer(layer, f"{LAYERS}{i}", inputs, model.config.text, cfg, report)
    _quantize_in_place(model, cfg, report)  # what is left outside the decoder layers: RTN
    model.quant_config, model.quant_report = cfg, report
    _report_starved(report)
    return model


class _Source:
    """The float tensors of a scout_mm / HF Llama 4 checkpoint under our parameter names, read one at a time
    from the memory-mapped shards."""

    def __init__(self, path: str, config: ScoutConfig, expected: set[str]):
        self.path, self.handles, self.where = path, {}, {}
        unexpected = []
        for file in checkpoint_files(path):
            handle = open_shard(file)
            self.handles[file] = handle
            for key in handle.keys():
                name = param_name(key, config, file, functools.partial(handle.get_tensor, key))
                if name is None:
                    continue
                if name not in expected:
                    unexpected.append(key)
                if name in self.where:  # as iter_checkpoint: which copy is meant is unknowable
                    raise stored_twice(path, key, self.where[name][0], file)
                self.where[name] = (file, key)
        if any(k.endswith("qweight") for k in self.where):
            raise CheckpointError(f"{path} is already quantized (it holds packed qweight tensors)")
        if unexpected:
            raise CheckpointError(
                f"{path}: {len(unexpected)} tensors match no parameter, e.g. {unexpected[:5]}"
            )

    def check_has(self, names: list[str]) -> None:
        """CheckpointError naming the checkpoint and the first missing parameters, before any layer is quantized
        (a tensor missing from a late layer was found only when that layer was reached: an hour into Scout)."""
        missing = [name for name in names if name not in self.where]
        if missing:
            raise CheckpointError(
                f"{self.path}: {len(missing)} parameters the config implies are missing from the checkpoint, "
                f"e.g. {missing[:3]}"
            )

    def first_dtype(self) -> torch.dtype | None:
        """The dtype of the first stored tensor (None without tensors)."""
        for file, key in self.where.values():
            return self.handles[file].get_slice(key)[0:1].dtype
        return None

    def load_into(self, model: nn.Module, names: list[str], device, dtype) -> None:
        params = dict(model.named_parameters(remove_duplicate=False))
        for name in names:
            if name not in self.where:
                raise CheckpointError(f"parameter {name!r} is missing from the checkpoint")
            file, key = self.where[name]
            tensor = self.handles[file].get_tensor(key)
            check_float_tensor(file, key, tensor, params[name].shape)
            module_name, _, attr = name.rpartition(".")
            tensor = tensor.to(device=device, dtype=dtype)
            model.get_submodule(module_name)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


class _ShardWriter:
    """Writes a state dict piece by piece into size-bounded safetensors shards of a temporary folder."""

    def __init__(self, folder: str, max_shard_size: int | str):
        self.folder, self.limit = folder, parse_size(max_shard_size)
        self.pending, self.pending_bytes, self.shards, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + nbytes > self.limit:
                self._flush()
            self.pending[key] = tensor.detach().to("cpu").contiguous()
            self.pending_bytes += nbytes
            self.total += nbytes

    def _flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, os.path.join(self.folder, name), metadata={"format": "pt"})
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, hf_config: dict) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        for i, (tmp_name, keys) in enumerate(self.shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.folder, tmp_name), os.path.join(self.folder, name))
            self.weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(self.folder, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)


def _hf_config(config: ScoutConfig, cfg: QuantConfig, dtype: torch.dtype) -> dict:
    hf = config.to_hf_file(dtype)
    hf["quantization_config"] = cfg.to_dict()
    return hf


def _state_to_save(model: nn.Module, names_under: str | None = None) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings and isinstance(model.language_model.lm_head, nn.Linear):
        state.pop(LM_HEAD, None)
    if names_under is not None:
        state = {k: v for k, v in state.items() if k.startswith(names_under)}
    return state


def save_quantized(model, path, max_shard_size: int | str = "5GB", overwrite: bool = False) -> None:
    """Write a model quantized by :func:`quantize_model` (config.json with ``quantization_config``). ``path``
    must be new or empty; ``overwrite``: replace the checkpoint in an existing folder (its weights, index and
    config.json; other files there are kept)."""
    cfg = getattr(model, "quant_config", None)
    if cfg is None:
        raise ValueError("model is not quantized (no quant_config); run scout_mm.quant.quantize_model first")
    _check_matches_config(model, cfg)
    parse_size(max_shard_size)
    _check_output(os.fspath(path), overwrite)

    def write(tmp):
        writer = _ShardWriter(tmp, max_shard_size)
        writer.add(_state_to_save(model))
        writer.finish(_hf_config(model.config, cfg, model.dtype))

    write_folder_atomically(path, write)


@torch.no_grad()
def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    cfg: QuantConfig | None = None,
    calibration: list[dict] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> QuantReport:
    """Quantize the checkpoint at ``src`` into an Int4 checkpoint at ``dst``, one decoder layer at a time;
    returns how each matrix was quantized (a :class:`CalibrationWarning` when GPTQ rounded matrices to nearest
    for too few calibration rows).

    Peak memory: the tensors outside the decoder layers (embeddings, LM head, vision tower) plus one layer, plus
    for GPTQ the hidden states of every calibration token and one layer's fp32 Hessians, on ``device``
    (``dtype``: compute dtype of the float tensors, saved in it; default: the dtype config.json names, else the
    first stored tensor's, as ``from_pretrained`` loads).
    The tokenizer and processor files of ``src`` (``checkpoint.PROCESSOR_FILES``) are copied along. ``dst`` must not be
    ``src``, and must be new or empty unless ``overwrite`` (then the checkpoint there is replaced once the new
    one is complete, with its tokenizer and processor files: those ``src`` lacks are removed, not kept from the
    model replaced; other files in the folder are kept).
    """
    cfg = cfg or QuantConfig()
    _check_method(cfg, calibration)
    dtype = check_dtype(dtype, FLOAT_DTYPES)
    device = check_int4_device(device)
    parse_size(max_shard_size)
    src, dst = check_folder(src), os.fspath(dst)
    config = ScoutConfig.from_hf(src)
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"dst {dst} is the source checkpoint {src}: write the Int4 checkpoint to another "
                         "folder (this one would lose its float weights)")  # fmt: skip
    _check_output(dst, overwrite)
    if "quantization_config" in config.hf_extra or "quantization_config" in config.text.hf_extra:
        raise CheckpointError(f"{src} is already quantized (its config.json has a quantization_config)")
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        warnings.warn(
            f"{src} has no tokenizer.json, so the Int4 checkpoint will have none: scripts/int4_generate.py and "
            "Processor.from_pretrained need one (save the processor into either folder: processor.save_pretrained)",
            stacklevel=_caller_stacklevel(),
        )
    from scout_mm.model import ScoutForConditionalGeneration

    with torch.device("meta"):
        model = ScoutForConditionalGeneration(config)
    _check_quantizable(model, cfg)
    names = [n for n, _ in model.named_parameters()]
    source = _Source(src, config, set(n for n, _ in model.named_parameters(remove_duplicate=False)))
    # One dtype for all, as from_pretrained loads (float64 stored or named: computed and saved in float32).
    dtype = dtype or config_dtype(src) or source.first_dtype()
    if dtype not in FLOAT_DTYPES:
        dtype = torch.float32
    outside = [n for n in names if not n.startswith(LAYERS)]
    if config.tie_word_embeddings:
        outside = [n for n in outside if n != LM_HEAD]
    source.check_has(outside + [n for n in names if n.startswith(LAYERS)])
    source.load_into(model, outside, device, dtype)
    if config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    inputs = _embed_calibration(model, calibration) if cfg.method == "gptq" else None
    report = QuantReport(min_rows_ratio=cfg.gptq_min_rows_ratio)

    def write(tmp):
        nonlocal inputs
        writer = _ShardWriter(tmp, max_shard_size)
        layers = model.language_model.model.layers
        for i in tqdm(range(len(layers)), desc="quantizing", unit="layer", leave=False):
            prefix = f"{LAYERS}{i}"
            source.load_into(model, [n for n in names if n.startswith(prefix + ".")], device, dtype)
            inputs = _quantize_layer(layers[i], prefix, inputs, config.text, cfg, report)
            writer.add({f"{prefix}.{k}": v for k, v in layers[i].state_dict().items()})
            layers[i] = layers[i].to("meta")  # free the layer before the next one is read
        _quantize_in_place(model, cfg, report)
        writer.add({k: v for k, v in _state_to_save(model).items() if not k.startswith(LAYERS)})
        writer.finish(_hf_config(config, cfg, dtype))
        for name in PROCESSOR_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))

    write_folder_atomically(dst, write, owned=PROCESSOR_FILES)
    _report_starved(report)
    return report
