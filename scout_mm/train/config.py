"""Training configuration: dataclasses read from YAML, every field overridable from the command line.

The YAML file holds the model (preset + overrides), data, optimiser, schedule, batch sizes, steps and the
eval / save / log intervals. The DeepSpeed JSON holds what DeepSpeed owns (ZeRO stage, offload,
communication); batch sizes, gradient clipping and precision flags derived from this file are written into
it before ``deepspeed.initialize`` (see :func:`scout_mm.train.engine.deepspeed_config`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class ModelSection:
    preset: str | None = None  # ScoutConfig preset; null: "tiny", or with init_from the checkpoint's model
    overrides: dict = field(default_factory=dict)  # text-config fields, e.g. {num_hidden_layers: 2}
    vision_overrides: dict = field(default_factory=dict)  # vision-config fields, e.g. {num_hidden_layers: 4}
    init_from: str | None = None  # start from this checkpoint folder instead of random weights
    activation_checkpointing: bool = False  # per decoder layer, router decisions replayed
    freeze_vision: bool = False  # vision encoder frozen (the projector still trains)
    # Random init of the vision tower, adapter and projector linears when training from scratch: "fan_in"
    # (std = fan_in ** -0.5) or "hf" (std = initializer_range, 0.02). See engine.fan_in_init.
    vision_init: str = "fan_in"


@dataclass
class DataSection:
    # Each source: {type: synthetic, tasks: [...]} or {type: jsonl, path: file.jsonl}; optional weight.
    sources: list = field(default_factory=lambda: [{"type": "synthetic"}])
    seq_len: int = 1024
    # "chunk" = the model's attention_chunk_size; "doc" = one document per row (no cross-document attention,
    # rows padded to the longest document); an int; null = plain packing
    pack_align: str | int | None = "chunk"
    num_workers: int = 4
    seed: int = 0
    eval_docs: int = 600  # held-out synthetic documents evaluated every eval_every steps (0 = none)
    eval_tasks: list | None = None  # default: every synthetic task


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.1  # not applied to norms, biases and other 1-D parameters
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class ScheduleSection:
    warmup_steps: int = 100  # linear warmup from 0, then cosine down to min_lr_ratio * lr
    min_lr_ratio: float = 0.1


@dataclass
class TrainSection:
    micro_batch_size: int = 64  # documents per GPU per micro-step, packed into rows of data.seq_len
    grad_accum: int = 1
    max_steps: int = 1000  # optimiser steps
    # Wall-clock budget (minutes, from launch): after calibration_steps the step count is fitted to it (at
    # most max_steps) and the cosine schedule follows; training also stops when the budget runs out.
    time_budget_min: float | None = None
    time_reserve_s: float = 45.0  # kept for the final eval and export when fitting to the budget
    calibration_steps: int = 30
    eval_every: int = 250  # 0 = no evaluation during training (still one at the end with eval_docs)
    save_every: int = 500  # 0 = no checkpoints at all (benchmarks); else also one at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    output_dir: str = "runs/tiny"  # checkpoints/, export/, metrics.jsonl, tensorboard/, curve.png
    # "auto": from output_dir's latest checkpoint if any; "never"; or a checkpoint's tag: step00000010 (the
    # name a save gives it) or step10
    resume: str = "auto"
    export: bool = True  # write the final weights in the HF layout
    export_dir: str | None = None  # default: output_dir/export
    seed: int = 0
    export_dtype: str = "bfloat16"
    export_shard_size: str | int = "5GB"
    generate_eval_docs: int = 0  # at the end, also check greedy generation on this many held-out docs
    peak_tflops: float | None = None  # for MFU; default: from the GPU name (H100/H200 989, A100 312)
    tensorboard: bool = True
    # [first, last]: profile these optimiser steps on rank 0 (torch.profiler + phase timings) into
    # output_dir/profile.txt; null = off.
    profile_steps: list | None = None


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        config = cls()
        for section, entries in (values or {}).items():
            if section not in _SECTIONS:
                raise ValueError(f"unknown config section {section!r}; expected one of {sorted(_SECTIONS)}")
            if not isinstance(entries, dict):
                raise ValueError(f"config section {section!r} is {entries!r}; expected a mapping")
            for key, value in entries.items():
                config.set(f"{section}.{key}", value)
        return config

    @classmethod
    def load(cls, path: str | None, overrides: list[tuple[str, str]] = ()) -> TrainConfig:
        """Read a YAML file (None = defaults), then apply ``(dotted.key, yaml value)`` overrides."""
        values = {}
        if path is not None:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        config = cls.from_dict(values)
        for key, text in overrides:
            config.set(key, yaml.safe_load(text))
        return config

    def set(self, dotted_key: str, value: Any) -> None:
        section_name, _, key = dotted_key.partition(".")
        section = getattr(self, section_name, None) if section_name in _SECTIONS else None
        names = {f.name for f in dataclasses.fields(section)} if section is not None else set()
        if section is None or key not in names:
            raise ValueError(f"unknown config key {dotted_key!r}; expected one of {all_keys()}")
        kind = next(f.type for f in dataclasses.fields(section) if f.name == key)
        setattr(section, key, _coerce(dotted_key, value, kind))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Ranges and shapes of the values (their types were checked by :meth:`set`), so that a typo fails
        here, before the model is built, naming the key."""
        t, d, o, s = self.train, self.data, self.optim, self.schedule
        if self.model.preset is not None and self.model.init_from:
            raise ValueError(
                f"model.preset={self.model.preset!r} and model.init_from={self.model.init_from!r} are both set: "
                "the checkpoint's config.json defines the model; drop model.preset (on the command line: "
                "--model.preset null; model.overrides still apply)"
            )
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name}={getattr(t, name)}; expected >= 1")
        for name in ("eval_every", "save_every", "generate_eval_docs", "calibration_steps"):
            if getattr(t, name) < 0:
                raise ValueError(f"train.{name}={getattr(t, name)}; expected >= 0 (0 = never)")
        if t.time_budget_min is not None and t.time_budget_min <= 0:
            raise ValueError(
                f"train.time_budget_min={t.time_budget_min}; expected > 0 minutes or null (no budget)"
            )
        if t.time_reserve_s < 0:
            raise ValueError(f"train.time_reserve_s={t.time_reserve_s}; expected >= 0")
        if t.peak_tflops is not None and t.peak_tflops <= 0:
            raise ValueError(f"train.peak_tflops={t.peak_tflops}; expected > 0 or null (from the GPU name)")
        if t.profile_steps is not None and not (
            len(t.profile_steps) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in t.profile_steps)
            and 1 <= t.profile_steps[0] <= t.profile_steps[1]
        ):
            raise ValueError(
                f"train.profile_steps={t.profile_steps}; expected [first, last] with 1 <= first <= last, "
                "or null"
            )
        if t.export_dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"train.export_dtype={t.export_dtype!r}; expected bfloat16, float16 or float32")
        if t.export_dir is not None:
            _check_export_dir(t.export_dir, t.output_dir)
        if d.seq_len < 1:
            raise ValueError(f"data.seq_len={d.seq_len}; expected >= 1")
        for name in ("num_workers", "eval_docs"):
            if getattr(d, name) < 0:
                raise ValueError(f"data.{name}={getattr(d, name)}; expected >= 0")
        if not (
            d.pack_align in (None, "chunk", "doc") or (isinstance(d.pack_align, int) and d.pack_align > 0)
        ):
            raise ValueError(
                f"data.pack_align={d.pack_align!r}; expected 'chunk', 'doc', a positive int or null"
            )
        _check_sources(d.sources)
        if d.eval_tasks is not None and not (d.eval_tasks and all(isinstance(x, str) for x in d.eval_tasks)):
            raise ValueError(
                f"data.eval_tasks={d.eval_tasks!r}; expected a non-empty list of task names or null"
            )
        if not o.lr > 0:
            raise ValueError(f"optim.lr={o.lr}; expected > 0")
        if not o.eps > 0:
            raise ValueError(f"optim.eps={o.eps}; expected > 0")
        if o.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={o.weight_decay}; expected >= 0")
        if o.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={o.grad_clip}; expected >= 0 (0 = no clipping)")
        if not (
            len(o.betas) == 2
            and all(isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in o.betas)
        ):
            raise ValueError(f"optim.betas={o.betas!r}; expected [beta1, beta2], each in [0, 1)")
        if s.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps={s.warmup_steps}; expected >= 0")
        if not 0 <= s.min_lr_ratio <= 1:
            raise ValueError(
                f"schedule.min_lr_ratio={s.min_lr_ratio}; expected a fraction of optim.lr in [0, 1]"
            )
        if not isinstance(self.model.vision_overrides, dict):
            raise ValueError(f"model.vision_overrides={self.model.vision_overrides!r}; expected a mapping")
        if self.model.vision_init not in ("fan_in", "hf"):
            raise ValueError(f"model.vision_init={self.model.vision_init!r}; expected 'fan_in' or 'hf'")


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _check_sources(sources: list) -> None:
    """The shape of ``data.sources``; the files themselves are checked by ``loop.build_source``."""
    if not sources or not all(isinstance(spec, dict) for spec in sources):
        raise ValueError(
            f"data.sources={sources!r}; expected a non-empty list of mappings such as "
            "[{type: synthetic}, {type: jsonl, path: data.jsonl, weight: 2}]"
        )
    for i, spec in enumerate(sources):
        kind = spec.get("type")
        if kind not in ("synthetic", "jsonl"):
            raise ValueError(f"data.sources[{i}] type {kind!r}; expected 'synthetic' or 'jsonl'")
        if kind == "jsonl" and not isinstance(spec.get("path"), str):
            raise ValueError(f"data.sources[{i}] = {spec}: a jsonl source needs a 'path' (a string)")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ValueError(f"data.sources[{i}] weight {weight!r}; expected a positive number")
        if kind == "synthetic" and spec.get("tasks") is not None and not isinstance(spec["tasks"], list):
            raise ValueError(f"data.sources[{i}] tasks {spec['tasks']!r}; expected a list of task names")


def _check_export_dir(export_dir: str, output_dir: str) -> None:
    # The export is written beside its folder and renamed into place, with what else the folder held moved
    # into the new one: pointed at the output dir or above it, the run's checkpoints and logs would move with
    # every export, and a failed export would have them in flight. The checkpoints folder is the
    # Checkpointer's (it prunes, converts and lists the folders there as checkpoints): no export in it either.
    # Any other folder, inside output_dir or not, is fine.
    export = os.path.realpath(export_dir)
    output = os.path.realpath(output_dir)
    checkpoints = os.path.join(output, "checkpoints")
    elsewhere = "export to another folder (default: output_dir/export)"
    if export == output or _inside(output, export):
        raise ValueError(
            f"train.export_dir={export_dir!r} is or holds train.output_dir ({output}): each export replaces its "
            f"folder and would move the run's checkpoints and logs along; {elsewhere}"
        )
    if export == checkpoints or _inside(export, checkpoints):
        raise ValueError(
            f"train.export_dir={export_dir!r} is or lies in train.output_dir's checkpoints folder "
            f"({checkpoints}), which holds the checkpoints only; {elsewhere}"
        )


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder and path != folder


_KIND_NAMES = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "list": "a list",
    "dict": "a mapping",
    "None": "null",
}


def _coerce(key: str, value: Any, kind: str) -> Any:
    """Check ``value`` against the field's annotation (a string such as ``"int"`` or ``"str | int | None"``).

    Numbers are lenient where YAML is surprising: YAML 1.1 reads ``3e-4`` and ``1e3`` (no dot) as strings, so
    a numeric string is a number, an int is a float where a float is wanted, and an integral float is an int
    where an int is wanted. Anything else of the wrong type raises, naming the key.
    """
    kinds = {part.strip() for part in str(kind).split("|")}
    if value is None and "None" in kinds:
        return value
    if isinstance(value, bool):
        if "bool" in kinds:
            return value
    elif isinstance(value, int | float):
        if isinstance(value, int) and "int" in kinds:
            return value
        if "float" in kinds:
            return float(value)
        if "int" in kinds and float(value).is_integer():
            return int(value)
    elif isinstance(value, str):
        if "str" in kinds:
            return value
        if kinds & {"int", "float"}:
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None:
                return _coerce(key, number, kind)
    elif isinstance(value, list) and "list" in kinds or isinstance(value, dict) and "dict" in kinds:
        return value
    order = list(_KIND_NAMES)
    ranked = sorted(kinds, key=lambda k: order.index(k) if k in order else len(order))
    expected = " or ".join(_KIND_NAMES.get(k, k) for k in ranked)
    raise ValueError(f"{key}={value!r}; expected {expected}")


def all_keys() -> list[str]:
    config = TrainConfig()
    return [
        f"{section}.{f.name}" for section in _SECTIONS for f in dataclasses.fields(getattr(config, section))
    ]
