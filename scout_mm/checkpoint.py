"""Safetensors checkpoint I/O in the HF Llama 4 layout (sharded, with an index), never pickle.

Loading builds the model on the meta device and assigns tensors one at a time, straight from the
memory-mapped shards to their final device and dtype, so peak host memory stays around one copy of the
weights. Saving writes into a temporary folder beside the target and renames it into place, so a crash
never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from scout_mm.config import ScoutConfig, is_int

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_TEXT_ONLY_PREFIX = "language_model."  # HF Llama4ForCausalLM keys lack it
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_embedding.freqs_ci")  # old non-persistent buffers
LM_HEAD = "language_model.lm_head.weight"
# Files beside the weights that the tokenizer / processor / generate read: carried into converted and Int4 copies.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json",
                   "preprocessor_config.json", "chat_template.json", "generation_config.json")  # fmt: skip
# Float checkpoints hold these; anything else (fp8, ints) needs a quantization_config we do not read.
SUPPORTED_DTYPES = {
    str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
}
# The --dtype choices of the scripts: float64 loads, but no script runs a model in it.
DTYPE_NAMES = {name: d for name, d in SUPPORTED_DTYPES.items() if d != torch.float64}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its config."""


def check_folder(path: str | os.PathLike) -> str:
    """``path`` as a str, when it is a folder: a file (config.json, a shard) or a missing path is an error that
    says which, naming the folder to pass instead of the file."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise NotADirectoryError(
            f"{path} is a file; pass the checkpoint folder ({os.path.dirname(os.path.abspath(path))})"
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    return path


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint folder, from its index when there is one."""
    check_folder(path)
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{index} is not a valid safetensors index (a 'weight_map' object of tensor -> file): {e!r}"
            ) from e
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, SINGLE_NAME)
    if os.path.exists(single):
        return [single]
    if any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(path)):
        raise CheckpointError(f"{path} holds pickle weights only; convert them to safetensors first")
    raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}")


def open_shard(file: str):
    """``safe_open`` of one shard (memory-mapped, CPU), a CheckpointError naming the file if it is unreadable."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: corrupt or not a safetensors file ({e})") from e


def stored_twice(path: str, key: str, first: str, second: str) -> CheckpointError:
    """The error for a tensor found in two shards (which copy is meant is unknowable)."""
    return CheckpointError(f"{path}: tensor {key!r} is stored twice, in {first} and {second}")


def iter_checkpoint(path: str) -> Iterator[tuple[str, str, callable]]:
    """Yield (file, key, load) for every tensor; ``load()`` reads that one tensor from the mmapped shard. A
    tensor stored in two shards is a CheckpointError (which copy is meant is unknowable)."""
    seen: dict[str, str] = {}
    for file in checkpoint_files(path):
        with open_shard(file) as handle:
            for key in handle.keys():
                if key in seen:
                    raise stored_twice(path, key, seen[key], file)
                seen[key] = file

                def load(key=key, handle=handle, file=file):
                    try:
                        return handle.get_tensor(key)
                    except (SafetensorError, OSError) as e:
                        raise CheckpointError(f"cannot read tensor {key!r} from {file}: {e}") from e

                yield file, key, load


def quantization_config(path: str | os.PathLike):
    """The ``quantization_config`` entry of folder ``path``'s config.json as stored; None when there is none (a
    float checkpoint), or when config.json is missing or unreadable (the loaders name that problem)."""
    try:
        with open(os.path.join(os.fspath(path), "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return None
    return hf.get("quantization_config") if isinstance(hf, dict) else None


def _declares_int4(quant) -> bool:
    """Whether a ``quantization_config`` entry (as stored; None without one) names the scout_mm Int4 format."""
    from scout_mm.quant.format import QUANT_METHOD  # here: scout_mm.quant imports this module

    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def is_int4_checkpoint(path: str | os.PathLike) -> bool:
    """Whether folder ``path``'s config.json declares the scout_mm Int4 format (False for a float checkpoint, and
    for a missing or unreadable config.json, which the loaders name)."""
    return _declares_int4(quantization_config(path))


def _reject_quantized(path: str) -> None:
    """A float load of a quantized checkpoint would fail on its first packed tensor; say what it is instead."""
    quant = quantization_config(path)
    if quant is None:
        return
    if _declares_int4(quant):
        raise CheckpointError(
            f"{path} is a scout_mm Int4 checkpoint (quantization_config in config.json): load it with "
            "scout_mm.quant.load_quantized(path) (scripts/generate.py does so by itself)"
        )
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    raise CheckpointError(
        f"{path}: quantization_config with quant_method={method!r} is not supported; scout_mm loads float "
        "checkpoints and its own Int4 format (scripts/quantize.py, scout_mm/quant/FORMAT.md)"
    )


def dtype_names(dtypes) -> list[str]:
    """Short names of torch dtypes, for messages: ``["bfloat16", "float16"]``."""
    return [str(d).removeprefix("torch.") for d in dtypes]


def check_dtype(dtype, allowed: tuple[torch.dtype, ...] | None = None) -> torch.dtype | None:
    """``dtype`` as one of the ``allowed`` torch dtypes (names such as ``"bfloat16"`` accepted), or None for None /
    ``"auto"`` (transformers' spelling of "as the checkpoint says"); a ValueError naming the choices otherwise."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = SUPPORTED_DTYPES.get(dtype.removeprefix("torch."), dtype)
    allowed = allowed or tuple(SUPPORTED_DTYPES.values())
    if dtype not in allowed:
        raise ValueError(
            f"dtype {dtype!r} is not supported; expected one of {dtype_names(allowed)}, 'auto' or None"
        )
    return dtype


def check_device(device) -> torch.device:
    """``device`` as a torch device that exists on this machine, or a ValueError saying why not (instead of a
    driver error from the first tensor moved there)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device {device!r} is not a device name; expected e.g. 'cuda', 'cuda:1' or 'cpu'"
        ) from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r}: CUDA is not available on this machine; use device 'cpu'"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s)")
    elif resolved.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=resolved)
        # RuntimeError; AssertionError (xpu) or ImportError (hpu) for a backend this torch was built without
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # not torch's dispatcher table
            raise ValueError(f"device {str(device)!r} is not available on this machine: {first}") from e
    return resolved


def config_dtype(path: str) -> torch.dtype | None:
    """The dtype config.json names (``dtype``, as transformers 5 writes it, and/or ``torch_dtype``; None when it
    names none, or two that disagree); a value that names no float type is an error rather than ignored."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    named = [(key, hf[key]) for key in ("dtype", "torch_dtype") if hf.get(key) is not None]
    for key, value in named:
        if not isinstance(value, str) or value.removeprefix("torch.") not in SUPPORTED_DTYPES:
            raise CheckpointError(
                f"{path}: config.json {key}={value!r} is not a supported float dtype; expected one of "
                f"{sorted(SUPPORTED_DTYPES)}"
            )
    names = {value.removeprefix("torch.") for _, value in named}
    # Two that disagree (scout_mm before it wrote both kept a stale "dtype" from its source): trust the tensors.
    return SUPPORTED_DTYPES[names.pop()] if len(names) == 1 else None


def load_pretrained(cls, path, dtype=None, device="cpu"):
    """Build ``cls`` from the checkpoint folder ``path``. ``dtype=None`` is transformers' ``dtype="auto"``: the
    dtype config.json names, else the first stored tensor's, so a checkpoint of mixed dtypes loads as one."""
    path = check_folder(path)
    dtype = check_dtype(dtype)
    device = check_device(device)
    config = ScoutConfig.from_hf(path)
    _reject_quantized(path)
    dtype = dtype or config_dtype(path)
    with torch.device("meta"):
        model = cls(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    unexpected: list[str] = []
    expected = _param_names(model)
    for file, key, load in tqdm(
        iter_checkpoint(path), total=len(expected), desc="loading", unit="tensor", leave=False
    ):
        name = param_name(key, config, file, load)
        if name is None:
            continue
        if name not in params:
            unexpected.append(key)
            continue
        tensor = load()
        check_float_tensor(file, key, tensor, params[name].shape)
        dtype = dtype or tensor.dtype
        tensor = tensor.to(device=device, dtype=dtype)
        _assign(model, name, tensor)
        loaded.add(name)
    if unexpected:
        raise CheckpointError(
            f"{path}: {len(unexpected)} tensors match no parameter of the config, e.g. {unexpected[:5]}"
        )
    missing = [n for n in expected if n not in loaded]
    if missing == [LM_HEAD] and config.hf_extra.get("tie_word_embeddings") is True:
        # Written by scout_mm before it stated the flag in text_config: a top-level true and no LM head stored.
        config.tie_word_embeddings = config.text.tie_word_embeddings = True
        del config.hf_extra["tie_word_embeddings"]
        missing = []
    if missing:
        untied = (
            " (the LM head is untied: text_config.tie_word_embeddings is false)" if LM_HEAD in missing else ""
        )
        raise CheckpointError(
            f"{path}: {len(missing)} parameters missing from the checkpoint, e.g. {missing[:5]}{untied}"
        )
    if config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return model.eval()


def param_name(key: str, config: ScoutConfig, file: str, load) -> str | None:
    """Our parameter name for checkpoint tensor ``key`` of ``file`` (HF text-only checkpoints lack the
    ``language_model.`` prefix), or None for a tensor that is not loaded: an old non-persistent buffer, or the
    all-zero shared expert HF-layout checkpoints carry for a model without one (``load()`` checks it is zero)."""
    name = _TEXT_ONLY_PREFIX + key if config.vision is None and not key.startswith(_TEXT_ONLY_PREFIX) else key
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    if not config.text.use_shared_expert and ".shared_expert." in name:
        # We write zeros there (HF always has a shared expert); anything else is a model we would not run.
        if load().any():
            raise CheckpointError(
                f"{file}: tensor {key!r} is not zero, but config.json says use_shared_expert=false; drop that "
                "key to use the shared expert"
            )
        return None
    return name


def check_float_tensor(file: str, key: str, tensor: torch.Tensor, shape) -> None:
    """CheckpointError unless float tensor ``key`` of ``file`` has ``shape`` and a supported dtype."""
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, but the config expects {tuple(shape)}"
        )
    if tensor.dtype not in SUPPORTED_DTYPES.values():
        raise CheckpointError(
            f"{file}: tensor {key!r} has dtype {tensor.dtype}; expected one of {sorted(SUPPORTED_DTYPES)}"
        )


def _param_names(model) -> list[str]:
    """Parameter names a checkpoint must provide (a tied LM head comes with the embedding)."""
    names = [n for n, _ in model.named_parameters()]
    if model.config.tie_word_embeddings:
        names = [n for n in names if n != LM_HEAD]
    return names


def _assign(model, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)


def parse_size(size: int | str) -> int:
    """Bytes from a count or a string like ``"5GB"``, ``"500MiB"``, ``"40KB"``; ValueError unless positive."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    n = 0
    try:
        if isinstance(size, str):
            s = size.strip().upper()
            unit = next((u for u in sorted(units, key=len, reverse=True) if s.endswith(u)), "B")
            n = int(float(s.removesuffix(unit)) * units[unit])
        elif is_int(size) or (isinstance(size, float) and size.is_integer()):
            n = int(size)
    except (ValueError, OverflowError):  # not a number; inf
        n = 0
    if n <= 0:
        raise ValueError(
            f"max_shard_size={size!r}; expected a positive byte count such as 5GB, 500MB or 40KB"
        )
    return n


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict under HF key names, with zero shared-expert weights when the model has none."""
    config = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == LM_HEAD:
            continue
        state[name] = tensor
    if not config.text.use_shared_expert:
        # HF always has a shared expert; all-zero weights make its output exactly zero.
        t, dtype = config.text, model.dtype
        for i in config.text.moe_layers:
            prefix = f"language_model.model.layers.{i}.feed_forward.shared_expert."
            state[prefix + "gate_proj.weight"] = torch.zeros(t.intermediate_size, t.hidden_size, dtype=dtype)
            state[prefix + "up_proj.weight"] = torch.zeros(t.intermediate_size, t.hidden_size, dtype=dtype)
            state[prefix + "down_proj.weight"] = torch.zeros(t.hidden_size, t.intermediate_size, dtype=dtype)
    if config.vision is None:  # HF Llama4ForCausalLM layout
        state = {k.removeprefix(_TEXT_ONLY_PREFIX): v for k, v in state.items()}
    return state


def save_pretrained(model, path, max_shard_size: int | str = "5GB") -> None:
    path = os.path.abspath(os.fspath(path))
    limit = parse_size(max_shard_size)
    state = hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes

    def write(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.config.to_hf_file(model.dtype), f, indent=2, sort_keys=True)
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(tqdm(shards, desc="saving", unit="shard", leave=False)):
            name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in shard.items()}
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(os.path.join(tmp, INDEX_NAME), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    write_folder_atomically(path, write)


def exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's kill, ``timeout``) a ``SystemExit`` of the main thread, as Ctrl-C is a
    ``KeyboardInterrupt``: a folder being written (:func:`write_folder_atomically`) is then removed instead of
    left beside its destination. For command-line scripts; does nothing outside the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def write_folder_atomically(path: str | os.PathLike, write, owned: tuple[str, ...] = ()) -> None:
    """``write(tmp)`` fills a new folder beside ``path``, which then replaces ``path`` (:func:`_replace_dir`); on
    any error, nothing at ``path`` changes and the temporary folder goes. Files of an existing ``path`` that
    ``write`` did not produce are kept, except those named in ``owned`` (files that belong to the model
    written, e.g. the source's tokenizer: an old one there belongs to the model replaced). The folder and its
    safetensors files get the permissions a plain mkdir / open would (not tempfile.mkdtemp's 0700, nor the 0600
    safetensors writes), so a checkpoint one user saves can be read by another."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)
    try:
        write(tmp)
        umask = os.umask(0o022)  # the only way to read it
        os.umask(umask)
        for name in os.listdir(tmp):
            if name.endswith(".safetensors"):
                os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        _replace_dir(tmp, path, owned)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: str, dst: str, owned: tuple[str, ...] = ()) -> None:
    """Move a finished folder into place; an existing checkpoint there is replaced only after success.

    What else lives in the old folder (a tokenizer, a training run's checkpoints/ and logs) is moved, not
    copied, into the new one: no second copy of a large tree on disk, and files open for appending stay the
    files at ``dst``. On failure everything moves back."""
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    moved = []
    backup = dst + ".old-" + os.path.basename(src)
    try:
        for name in os.listdir(dst):  # the old weights and what the new checkpoint owns are not kept
            weights = name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json"))
            if not (weights or name in owned or os.path.exists(os.path.join(src, name))):
                os.rename(os.path.join(dst, name), os.path.join(src, name))  # src is beside dst: a rename
                moved.append(name)
        os.rename(dst, backup)
        os.rename(src, dst)
    except BaseException:
        if os.path.exists(backup) and not os.path.exists(dst):
            os.rename(backup, dst)
        for name in moved:
            os.rename(os.path.join(src, name), os.path.join(dst, name))
        raise
    shutil.rmtree(backup, ignore_errors=True)
