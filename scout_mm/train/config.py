"""Training configuration: dataclasses read from YAML, every field overridable from the command line.

The YAML file holds the model (preset + overrides), data, optimiser, schedule, batch sizes, steps and the
eval / save / log intervals. The DeepSpeed JSON holds what DeepSpeed owns (ZeRO stage, offload,
communication); batch sizes, gradient clipping and precision flags derived from this file are written into
it before ``deepspeed.initialize`` (see :func:`scout_mm.train.engine.deepspeed_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class ModelSection:
    preset: str = "tiny"
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
    resume: str = "auto"  # "auto": from output_dir's latest checkpoint if any; "never"; or a step tag
    export: bool = True  # write the final weights in the HF layout
    export_dir: str | None = None  # default: output_dir/export
    seed: int = 0
    export_dtype: str = "bfloat16"
    export_shard_size: str = "5GB"
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
        t, d = self.train, self.data
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_every"):
            if getattr(t, name) < 1:
                raise ValueError(f"train.{name}={getattr(t, name)}; expected >= 1")
        for name in ("eval_every", "save_every"):
            if getattr(t, name) < 0:
                raise ValueError(f"train.{name}={getattr(t, name)}; expected >= 0 (0 = never)")
        if d.seq_len < 1:
            raise ValueError(f"data.seq_len={d.seq_len}; expected >= 1")
        if not (
            d.pack_align in (None, "chunk", "doc") or (isinstance(d.pack_align, int) and d.pack_align > 0)
        ):
            raise ValueError(
                f"data.pack_align={d.pack_align!r}; expected 'chunk', 'doc', a positive int or null"
            )
        if not isinstance(self.model.vision_overrides, dict):
            raise ValueError(f"model.vision_overrides={self.model.vision_overrides!r}; expected a mapping")
        if self.model.vision_init not in ("fan_in", "hf"):
            raise ValueError(f"model.vision_init={self.model.vision_init!r}; expected 'fan_in' or 'hf'")
        if t.export_dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"train.export_dtype={t.export_dtype!r}; expected bfloat16, float16 or float32")


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, kind: str) -> Any:
    """A float field accepts ints and numeric strings: YAML 1.1 reads ``3e-4`` (no dot) as a string."""
    if "float" not in str(kind) or isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{key}={value!r}; expected a number") from None
    return value


def all_keys() -> list[str]:
    config = TrainConfig()
    return [
        f"{section}.{f.name}" for section in _SECTIONS for f in dataclasses.fields(getattr(config, section))
    ]
