"""DeepSpeed glue: process group, model + optimiser + schedule into a DeepSpeed engine, atomic checkpoints
with exact resume, and the final export to the HF layout.

Everything DeepSpeed-specific in the package lives here; the model stays plain PyTorch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import pathlib
import random
import re
import shutil
import socket
import warnings

import numpy as np
import torch
from torch import nn

from scout_mm import Processor, ScoutConfig, ScoutForConditionalGeneration
from scout_mm.config import read_json_object, write_text_atomically
from scout_mm.train.config import TrainConfig
from scout_mm.train.routing import RoutingTap, enable_activation_checkpointing, moe_modules

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------- process group
def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) under the ``deepspeed`` launcher, ``torchrun``, or plain ``python``
    (then a single process on a free local port)."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce (a C++ toolchain and ~20 s);
            # gloo does the job for CPU runs (tests, CI).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(verbose=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------- model
def model_setup(cfg: TrainConfig) -> tuple[ScoutConfig, Processor]:
    """The model config (preset or ``init_from`` checkpoint, with the overrides) and its processor, without
    building any weights: enough to check the data and the checkpoint to resume before the model exists."""
    m = cfg.model
    if not m.init_from:
        preset = m.preset or "tiny"
        config = ScoutConfig.from_preset(preset, **m.overrides)
        if m.vision_overrides:
            if config.vision is None:
                raise ValueError(f"model.vision_overrides given, but preset {preset!r} has no vision tower")
            config.vision = dataclasses.replace(config.vision, **m.vision_overrides)  # re-validated
        processor = Processor.from_config(config)
    else:
        base = ScoutConfig.from_hf(m.init_from)
        config = _override(base, m.overrides, m.vision_overrides, m.init_from)
        processor = Processor.from_config(config, tokenizer_path=m.init_from)
    if config.text.attention_dropout:  # the model refuses it in training; say so before anything is built
        raise ValueError(
            f"attention_dropout={config.text.attention_dropout}: dropout on attention probabilities is not "
            "implemented; set model.overrides.attention_dropout: 0"
        )
    return config, processor


def _override(base: ScoutConfig, overrides: dict, vision_overrides: dict, init_from: str) -> ScoutConfig:
    """``base`` (a checkpoint's config) with the overrides, which must keep every parameter shape (the
    checkpoint's weights are loaded into the result); raises naming those that do not."""
    for name, fields, section in (
        ("model.overrides", overrides, base.text),
        ("model.vision_overrides", vision_overrides, base.vision),
    ):
        if fields and section is None:
            raise ValueError(f"{name} given, but the model of {init_from} has no vision tower")
        known = {f.name for f in dataclasses.fields(section)} - {"hf_extra"} if section else set()
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{name} keys {unknown} are not config fields; expected some of {sorted(known)}")

    def apply(text_fields: dict, vision_fields: dict) -> ScoutConfig:
        text = dataclasses.replace(base.text, **text_fields)  # re-validated
        vision = dataclasses.replace(base.vision, **vision_fields) if vision_fields else base.vision
        tie = text_fields.get("tie_word_embeddings", base.tie_word_embeddings)  # either flag ties: set both
        text.tie_word_embeddings = tie
        return dataclasses.replace(base, text=text, vision=vision, tie_word_embeddings=tie)

    shapes = param_shapes(base)
    refused = []
    for name, text_fields, vision_fields in [
        *((f"model.overrides.{k}", {k: v}, {}) for k, v in overrides.items()),
        *((f"model.vision_overrides.{k}", {}, {k: v}) for k, v in vision_overrides.items()),
    ]:
        try:
            if param_shapes(apply(text_fields, vision_fields)) != shapes:
                refused.append(name)
        except ValueError as e:  # e.g. fewer layers than the checkpoint's moe_layers list names
            refused.append(f"{name} ({e})")
    config = None if refused else apply(overrides, vision_overrides)
    if config is None or param_shapes(config) != shapes:
        raise ValueError(
            f"{', '.join(refused) or 'the overrides together'} would change parameter shapes of the "
            f"checkpoint {init_from}; with model.init_from only overrides that keep every shape apply (e.g. "
            "router_aux_loss_coef, attention_chunk_size, rope_scaling): drop these, or train from model.preset"
        )
    return config


def param_shapes(config: ScoutConfig) -> dict[str, list[int]]:
    """Parameter name -> shape of the model ``config`` describes (built on the meta device: no memory). A tied
    LM head is not listed, so tying changes the result too."""
    with torch.device("meta"):
        model = ScoutForConditionalGeneration(config)
    return {name: list(p.shape) for name, p in model.named_parameters()}


def build_model(
    cfg: TrainConfig, setup: tuple[ScoutConfig, Processor] | None = None
) -> tuple[ScoutForConditionalGeneration, Processor]:
    """The model in float32 on the CPU (DeepSpeed moves and casts it) and its processor. ``setup``: what
    :func:`model_setup` gave for ``cfg``, when the caller has it already (default: worked out here)."""
    m = cfg.model
    config, processor = setup or model_setup(cfg)
    if m.init_from:
        model = ScoutForConditionalGeneration.from_pretrained(m.init_from, dtype=torch.float32)
        if m.overrides or m.vision_overrides:  # the same weights in a model built from the overridden config
            with torch.device("meta"):
                overridden = ScoutForConditionalGeneration(config)
            overridden.load_state_dict(model.state_dict(), strict=True, assign=True)
            if config.tie_word_embeddings:
                lm = overridden.language_model
                lm.lm_head.weight = lm.model.embed_tokens.weight
            model = overridden
    else:
        torch.manual_seed(cfg.train.seed)  # same init on every rank
        model = ScoutForConditionalGeneration(config)
        if m.vision_init == "fan_in" and model.vision_model is not None:
            fan_in_init(model.vision_model)
            fan_in_init(model.multi_modal_projector)
    if m.freeze_vision:
        if model.vision_model is None:
            raise ValueError("model.freeze_vision=true but the model has no vision tower")
        model.vision_model.requires_grad_(False)
    return model, processor


@torch.no_grad()
def fan_in_init(module: nn.Module) -> None:
    """Re-draw every Linear weight under ``module`` from N(0, 1 / fan_in).

    HF's std of 0.02 suits a pretrained-scale vision tower, not one trained from scratch: through the
    adapter's two GELU layers and the projector it shrinks the image signal about 100x, and at lr 2e-3
    AdamW pushes the adapter into GELU's flat region within ~30 steps. In a CPU probe on the colour task
    the gradient reaching the vision tower fell from 10 to 0.002 within 30 steps and the answers stayed at
    chance; with this init it stayed near 0.05 and colour answers rose above chance within 50 steps.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.weight.normal_(0.0, sub.weight.shape[1] ** -0.5)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms, biases or other 1-D parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR multiplier for update ``s`` (0-based): linear warmup to 1, then cosine down to ``min_ratio``.

    An object rather than a lambda so ``LambdaLR.state_dict`` (hence DeepSpeed checkpoints) keeps
    ``total_steps``, which a time budget may fix only after training started (``fitted_by_budget``). Loading
    a checkpoint restores all of it; :func:`apply_configured_schedule` then puts the configured values back.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.fitted_by_budget = False

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_configured_schedule(lr_scheduler, schedule: WarmupCosine, cfg: TrainConfig) -> list[str]:
    """After a checkpoint load: ``LambdaLR.load_state_dict`` copied the saved schedule (total steps, warmup,
    minimum ratio) and peak LR over the configured ones; put the configured ones back, so that a resumed run
    honours a new ``train.max_steps`` (the usual reason to resume: extending a run), warmup, ``min_lr_ratio``
    or ``optim.lr``, with the cosine recomputed for the new total. Returns a log line per change.

    A total fitted to a time budget is kept (capped at ``max_steps``) when this run has a budget too: it is
    re-fitted after the calibration steps, and until then the LR continues where it was.
    """
    t, configured = cfg.train, cfg.schedule
    saved = (schedule.total_steps, schedule.warmup_steps, schedule.min_ratio)
    total = t.max_steps
    if schedule.fitted_by_budget and t.time_budget_min is not None:
        total = min(total, schedule.total_steps)
    else:
        schedule.fitted_by_budget = False
    schedule.total_steps, schedule.warmup_steps = total, configured.warmup_steps
    schedule.min_ratio = configured.min_lr_ratio
    changes = [
        f"{name} {new} (the checkpoint had {old})"
        for name, old, new in zip(
            ("total steps", "schedule.warmup_steps", "schedule.min_lr_ratio"),
            saved,
            (schedule.total_steps, schedule.warmup_steps, schedule.min_ratio),
        )
        if old != new
    ]
    if any(base != cfg.optim.lr for base in lr_scheduler.base_lrs):
        changes.append(f"optim.lr {cfg.optim.lr} (the checkpoint had {lr_scheduler.base_lrs[0]})")
        lr_scheduler.base_lrs = [cfg.optim.lr] * len(lr_scheduler.base_lrs)
    # The optimiser's current LR was computed by the saved schedule; recompute it for the next update.
    factor = schedule(lr_scheduler.last_epoch)
    for group, base in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs):
        group["lr"] = base * factor
    lr_scheduler._last_lr = [group["lr"] for group in lr_scheduler.optimizer.param_groups]
    if not changes:
        return []
    return [f"schedule on resume: the configured values apply: {'; '.join(changes)}; the cosine now ends at "
            f"step {schedule.total_steps}"]  # fmt: skip


def deepspeed_config(cfg: TrainConfig, path: str | None, world_size: int) -> dict:
    """The DeepSpeed JSON (``path``; None = plain data parallel, no ZeRO) completed from the YAML config.

    The YAML owns batch sizes, gradient clipping and optimiser hyper-parameters: a differing value in the
    JSON is replaced, with a warning.
    """
    ds: dict = {}
    if path:
        ds = read_json_object(path, label="DeepSpeed config ")
        known = deepspeed_keys()
        for key in ds:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                warnings.warn(
                    f"{path}: top-level key {key!r} is not a DeepSpeed setting and is ignored{hint}",
                    stacklevel=2,
                )
        if "scheduler" in ds:
            # deepspeed.initialize gets our warmup + cosine as the client scheduler, and a client scheduler
            # wins over the JSON one: say so rather than train on an LR the user did not ask for.
            warnings.warn(
                f"{path}: the 'scheduler' section is ignored: the LR follows the training config (optim.lr, "
                "schedule.warmup_steps, schedule.min_lr_ratio, train.max_steps); remove the section",
                stacklevel=2,
            )
            ds = {k: v for k, v in ds.items() if k != "scheduler"}
    t, o = cfg.train, cfg.optim
    owned = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
    }
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            warnings.warn(
                f"{path}: {key}={ds[key]} replaced by {value} from the training config", stacklevel=2
            )
        ds[key] = value
    ds.setdefault("zero_optimization", {"stage": 0})
    _check_zero_section(ds["zero_optimization"], path)
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW: no op build needed
    ds.setdefault("steps_per_print", 10**9)  # the training loop logs
    if "optimizer" in ds:  # e.g. ZeRO-Offload's CPU Adam: DeepSpeed builds it with our hyper-parameters
        if not isinstance(ds["optimizer"], dict) or not isinstance(ds["optimizer"].get("params", {}), dict):
            raise ValueError(f"DeepSpeed config {path}: optimizer={ds['optimizer']!r}; expected an object "
                             '{"type": ..., "params": {...}}')  # fmt: skip
        ds["optimizer"].setdefault("params", {}).update(
            lr=o.lr, betas=list(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
    return ds


def _check_zero_section(zero, path) -> None:
    """The ``zero_optimization`` section through DeepSpeed's own schema, before the model is built (DeepSpeed
    would only check it inside ``deepspeed.initialize``): one line naming the field."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    if not isinstance(zero, dict):
        raise ValueError(f"DeepSpeed config {path}: zero_optimization={zero!r}; expected an object such as "
                         '{"stage": 2}')  # fmt: skip
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(part) for part in ("zero_optimization", *first["loc"]))
        raise ValueError(f"DeepSpeed config {path}: {field}={first.get('input')!r}: {first['msg']}") from None


@functools.lru_cache(maxsize=1)
def deepspeed_keys() -> frozenset[str]:
    """Every name DeepSpeed's config code mentions (its config and constants modules): a superset of the
    top-level keys it reads, so that a key outside it is a typo DeepSpeed would silently ignore. Read from
    the installed DeepSpeed rather than listed here, so that a new DeepSpeed version's keys pass."""
    import deepspeed

    root = pathlib.Path(deepspeed.__file__).parent
    names = set()
    for file in root.rglob("*.py"):
        if "config" in file.name or "constants" in file.name:
            names.update(re.findall(r"['\"]([a-z][a-z0-9_]*)['\"]", file.read_text(errors="ignore")))
    return frozenset(names)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_engine(cfg: TrainConfig, model: nn.Module, ds_config: dict):
    """(engine, tap, schedule): the DeepSpeed engine around ``model``, the routing tap installed in its
    routers (aux loss, expert load, checkpoint replay) and the LR schedule object."""
    import deepspeed

    tap = RoutingTap(model)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model, tap)
    if zero_stage(ds_config) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        leaves = moe_modules(model)
        if leaves:
            set_z3_leaf_modules(model, leaves)
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    optimizer = None
    if "optimizer" not in ds_config:
        fused = {"fused": True} if torch.cuda.is_available() else {}
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **fused)
    schedule = WarmupCosine(cfg.schedule.warmup_steps, cfg.train.max_steps, cfg.schedule.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups if optimizer is None else None,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    return engine, tap, schedule


# ---------------------------------------------------------------------- checkpoints
LATEST = "latest"
META = "meta.json"
UNIVERSAL = "universal"  # folder (under the checkpoint directory) of DeepSpeed universal conversions


def step_tag(step: int) -> str:
    """The name of the checkpoint saved after optimiser step ``step``: ``step00000010`` (zero-padded so that
    name order is step order)."""
    return f"step{step:08d}"


class Checkpointer:
    """DeepSpeed checkpoints under ``directory/stepNNNNNNNN`` that are never half-written, resumable on any
    number of ranks.

    Each save goes to ``stepN.partial``; after every rank has written (model, optimiser, LR schedule,
    client state, and a per-rank RNG file), rank 0 adds ``meta.json`` (world size, ZeRO stage), renames the
    folder to ``stepN`` and then atomically replaces the ``latest`` file. A run killed mid-save leaves a
    ``.partial`` folder that is ignored and removed. Assumes a filesystem shared by all ranks (as DeepSpeed
    does by default).

    DeepSpeed's ZeRO checkpoints hold one optimiser partition per rank and load only on the world size that
    wrote them. When it changed, :meth:`prepare_resume` converts the checkpoint once (rank 0) with DeepSpeed's
    ``ds_to_universal`` into ``directory/universal/stepN`` and asks for DeepSpeed's universal loading, which
    re-partitions the fp32 weights and Adam moments for the new world size.
    """

    def __init__(self, engine, directory: str, keep: int, rank: int):
        self.engine, self.directory, self.keep, self.rank = engine, directory, keep, rank
        self.universal_dir: str | None = None  # set by prepare_resume when the world size changed

    def latest_tag(self) -> str | None:
        path = os.path.join(self.directory, LATEST)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            tag = f.read().strip()
        return tag if os.path.isdir(os.path.join(self.directory, tag)) else None

    def tags(self) -> list[str]:
        """The checkpoint folders in the directory, in name order (so oldest first for ``stepNNNNNNNN``), not
        counting the universal conversions or the ``.partial`` folders of killed saves."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(
            name
            for name in os.listdir(self.directory)
            if os.path.isdir(os.path.join(self.directory, name))
            and name != UNIVERSAL
            and not name.endswith(".partial")
        )

    def find(self, tag: str) -> str:
        """The folder of checkpoint ``tag``: ``tag`` itself, or for ``stepN`` written with any zero padding
        (``step10``) the folder a save names ``step00000010``. Raises ``FileNotFoundError`` naming the
        checkpoints that do exist."""
        tags = self.tags()
        if tag in tags:
            return tag
        number = re.fullmatch(r"step(\d+)", tag)
        if number and step_tag(int(number[1])) in tags:
            return step_tag(int(number[1]))
        if not os.path.isdir(self.directory):
            held = "the folder does not exist"
        else:
            held = f"it holds {', '.join(tags)}" if tags else "it holds no checkpoints"
        raise FileNotFoundError(f"no checkpoint {tag!r} in {self.directory}; {held}")

    def save(self, step: int, client_state: dict) -> str:
        tag = step_tag(step)
        partial = tag + ".partial"
        if self.rank == 0:
            os.makedirs(self.directory, exist_ok=True)
            shutil.rmtree(os.path.join(self.directory, partial), ignore_errors=True)
        barrier()
        self.engine.save_checkpoint(self.directory, tag=partial, client_state=client_state, save_latest=False)
        torch.save(rng_state(), os.path.join(self.directory, partial, f"rng_rank{self.rank}.pt"))
        barrier()
        if self.rank == 0:
            meta = {
                "world_size": _world_size(),
                "zero_stage": int(self.engine.zero_optimization_stage()),
                # ZeRO-3 leaves each parameter an empty partition; ds_shape is the full shape.
                "param_shapes": {
                    name: list(getattr(p, "ds_shape", p.shape))
                    for name, p in self.engine.module.named_parameters()
                },
            }
            write_text_atomically(os.path.join(self.directory, partial, META), json.dumps(meta))
            final = os.path.join(self.directory, tag)
            if os.path.exists(final):  # saving the same step again (e.g. the final save)
                shutil.rmtree(final)
            os.rename(os.path.join(self.directory, partial), final)
            write_text_atomically(os.path.join(self.directory, LATEST), tag)
            self._prune(keep_tag=tag)
        barrier()
        return tag

    def resume_tag(self, resume: str) -> str | None:
        """The checkpoint to resume from: ``resume`` is "auto" (the latest, if any), "never", or a tag
        (``step00000010``, or ``step10``: see :meth:`find`). Removes the ``.partial`` folders of killed saves
        first. Collective."""
        if resume == "never":
            return None
        if self.rank == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.endswith(".partial"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        barrier()
        if resume == "auto":
            return self.latest_tag()
        try:
            return self.find(resume)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"train.resume={resume!r}: {e}; expected 'auto', 'never' or the tag of a checkpoint there "
                "(stepN with any zero padding)"
            ) from None

    def meta(self, tag: str) -> dict:
        """``meta.json`` of checkpoint ``tag`` ({} for checkpoints written before it existed)."""
        path = os.path.join(self.directory, tag, META)
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def saved_world_size(self, tag: str) -> int:
        """How many ranks wrote checkpoint ``tag`` (from ``meta.json``, else by counting its optimiser
        partitions)."""
        meta = self.meta(tag)
        if "world_size" in meta:
            return int(meta["world_size"])
        folder = os.path.join(self.directory, tag)
        partitions = [n for n in os.listdir(folder) if n.endswith("optim_states.pt")]
        return max(1, len(partitions))

    def check_compatible(self, tag: str, ds_config: dict, param_shapes: dict | None = None) -> None:
        """Raise, naming the folder and the way out, when checkpoint ``tag`` cannot be loaded into this run:
        written with another ZeRO stage (DeepSpeed lays the optimiser state out per stage and fails deep
        inside otherwise), or by another model (``param_shapes``: this run's :func:`param_shapes`)."""
        folder = os.path.join(self.directory, tag)
        meta = self.meta(tag)
        output_dir = os.path.dirname(self.directory)
        fresh = f"pass --train.resume never to start over in {output_dir}, or set a new train.output_dir"
        if "zero_stage" in meta and int(meta["zero_stage"]) != zero_stage(ds_config):
            raise ValueError(
                f"checkpoint {folder} was written with ZeRO-{meta['zero_stage']}, this run uses "
                f"ZeRO-{zero_stage(ds_config)}; resume with a DeepSpeed config of ZeRO stage "
                f"{meta['zero_stage']}, or {fresh}"
            )
        saved = meta.get("param_shapes")
        if param_shapes is not None and saved is not None and saved != param_shapes:
            differ = sorted(set(saved) ^ set(param_shapes)) + sorted(
                name for name in set(saved) & set(param_shapes) if saved[name] != param_shapes[name]
            )
            raise ValueError(
                f"checkpoint {folder} holds another model ({len(differ)} parameters differ in name or shape, "
                f"e.g. {differ[0]}); {fresh}"
            )

    def prepare_resume(
        self, tag: str, world_size: int, ds_config: dict, param_shapes: dict | None = None
    ) -> str | None:
        """Before the engine is built: check that ``tag`` fits this run (:meth:`check_compatible`); when it was
        written by another number of ranks, convert it to DeepSpeed's universal format (rank 0, once; other
        ranks wait) and switch ``ds_config`` to universal loading. Returns a line for the log, or None when
        nothing had to be done. Collective."""
        tag = self.find(tag)
        self.check_compatible(tag, ds_config, param_shapes)
        saved = self.saved_world_size(tag)
        if saved == world_size:
            return None
        target = os.path.join(self.directory, UNIVERSAL, tag)
        if self.rank == 0 and not os.path.isdir(target):
            convert_to_universal(os.path.join(self.directory, tag), target)
        barrier()
        if not os.path.isdir(target):
            raise RuntimeError(f"universal conversion of {tag} did not produce {target}")
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.universal_dir = os.path.dirname(target)
        return (
            f"checkpoint {tag} was written by {saved} rank(s), this run has {world_size}: converted to "
            f"DeepSpeed's universal format ({target}) and loading it re-partitioned for {world_size} rank(s)"
        )

    def load(self, tag: str | None = None) -> dict | None:
        """Restore checkpoint ``tag`` (default: the latest) into the engine; returns its client state, or None
        when there is nothing to resume from. After :meth:`prepare_resume` found another world size, loads
        the universal conversion."""
        if tag is None:
            tag = self.resume_tag("auto")
            if tag is None:
                return None
        else:
            tag = self.find(tag)
        if self.universal_dir is not None:
            optimizer = getattr(self.engine.optimizer, "optimizer", None)
            groups = [dict(g) for g in optimizer.param_groups] if optimizer is not None else []
            path, client_state = self.engine.load_checkpoint(self.universal_dir, tag=tag)
            # Two quirks of DeepSpeed's ZeRO-3 universal load (0.19): it copies the first parameter group's
            # hyper-parameters into every group (put back each group's own weight decay: none on norms and
            # biases), and it gives every partition the same Adam ``step`` tensor, which torch's Adam then
            # increments once per group and step (give each its own copy, on the parameter's device where the
            # fused/capturable Adam keeps it, on the CPU otherwise).
            for group, before in zip(optimizer.param_groups if groups else [], groups):
                group["weight_decay"] = before["weight_decay"]
            groups = optimizer.param_groups if optimizer is not None else []
            on_device = any(g.get("fused") or g.get("capturable") for g in groups)
            for state in optimizer.state.values() if optimizer is not None else []:
                if torch.is_tensor(state.get("step")):
                    step = state["step"].detach().clone()
                    moments = state.get("exp_avg")
                    state["step"] = (
                        step.to(moments.device) if on_device and moments is not None else step.cpu()
                    )
        else:
            try:
                path, client_state = self.engine.load_checkpoint(self.directory, tag=tag)
            except RuntimeError as e:
                if "state_dict" not in str(e):
                    raise
                # A checkpoint written before meta.json recorded the parameter shapes, by another model.
                raise RuntimeError(
                    f"checkpoint {self.directory}/{tag} does not fit this model ({str(e).splitlines()[0]}); "
                    "pass --train.resume never to start over in this output_dir, or set a new train.output_dir"
                ) from e
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.directory}/{tag}")
        rng_file = os.path.join(self.directory, tag, f"rng_rank{self.rank}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        return client_state

    def _prune(self, keep_tag: str) -> None:
        tags = [name for name in self.tags() if name.startswith("step")]
        removed = tags[: max(0, len(tags) - self.keep)]
        for name in removed:
            if name != keep_tag:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                shutil.rmtree(os.path.join(self.directory, UNIVERSAL, name), ignore_errors=True)


def convert_to_universal(source: str, target: str) -> None:
    """DeepSpeed's ``ds_to_universal`` from checkpoint folder ``source`` into ``target`` (written to
    ``target.partial`` and renamed, so an interrupted conversion is redone). Runs in a child process: the
    conversion uses worker processes, which should not be forked from a process holding CUDA/NCCL state."""
    import subprocess
    import sys

    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    workers = max(1, min(4, (os.cpu_count() or 2) // 2))
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", source, "--output_folder", partial,
        "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2)),
        "--inject_missing_state",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"ds_to_universal failed on {source} (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-3000:]}"
        )
    os.rename(partial, target)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------- export
def export_pretrained(
    engine, processor: Processor, path: str, dtype: str, max_shard_size: str, rank: int
) -> None:
    """Write the trained weights (from the fp32 master copy, any ZeRO stage) in the HF layout plus the
    processor files; ``ScoutForConditionalGeneration.from_pretrained`` and ``transformers`` load it.

    Collective: every rank must call it (ZeRO-3 gathers partitioned parameters); rank 0 writes.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    target = DTYPES[dtype]
    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:  # frozen (no optimiser copy): the module's own, gathered under ZeRO-3
            with deepspeed.zero.GatheredParameters([param]):
                full = param.detach().clone()
        if rank == 0:
            state[name] = full.detach().to("cpu", target)
    if rank == 0:
        with torch.device("meta"):
            export = ScoutForConditionalGeneration(module.config)
        lm = export.language_model
        tied = module.config.tie_word_embeddings
        # named_parameters() yields a tied weight once, under the embedding's name; after the load (assign=True
        # gives each module its own Parameter) tie them again: save_pretrained writes a tied head once.
        if tied:
            state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
        export.load_state_dict(state, strict=True, assign=True)
        if tied:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        export.save_pretrained(path, max_shard_size=max_shard_size)
        processor.save_pretrained(path)
    barrier()
