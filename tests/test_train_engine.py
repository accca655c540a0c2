"""DeepSpeed ZeRO-2 training of the tiny model on CPU: loss goes down, exact resume, atomic checkpoints, export."""

import os
from pathlib import Path

import pytest
import torch

from scout_mm import ScoutForConditionalGeneration
from scout_mm.train.config import TrainConfig
from scout_mm.train.data import SyntheticSource, pack
from scout_mm.train.engine import (
    Checkpointer,
    build_engine,
    build_model,
    deepspeed_config,
    init_distributed,
)
from scout_mm.train.loop import train

ZERO2 = str(Path(__file__).resolve().parents[1] / "configs" / "ds_zero2.json")


def tiny_config(output_dir, **train_fields) -> TrainConfig:
    cfg = TrainConfig.from_dict(
        {
            "model": {"preset": "tiny"},
            "data": {"seq_len": 384, "num_workers": 0, "eval_docs": 0},
            "optim": {"lr": 3e-3},
            "schedule": {"warmup_steps": 2},
            "train": {
                "micro_batch_size": 4,
                "max_steps": 4,
                "log_every": 1,
                "output_dir": str(output_dir),
                "tensorboard": False,
                "export_shard_size": "5GB",
                **train_fields,
            },
        }  # fmt: skip
    )
    return cfg


def test_zero2_steps_lower_the_loss_on_a_fixed_batch(tmp_path):
    cfg = tiny_config(tmp_path)
    _, world, _ = init_distributed()
    model, processor = build_model(cfg)
    ds = deepspeed_config(cfg, ZERO2, world)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    engine, tap, _ = build_engine(cfg, model, ds)
    source = SyntheticSource(processor, "train", seed=0)
    batch = pack([source[i] for i in range(4)], 384, 128, processor)
    losses = []
    for _ in range(6):
        tap.start_forward()
        out = engine(
            input_ids=batch.input_ids, pixel_values=batch.pixel_values, position_ids=batch.position_ids,
            labels=batch.labels, with_aux_loss=False,
        )  # fmt: skip
        engine.backward(out.loss + 0.01 * tap.aux_loss(batch.token_mask))
        engine.step()
        losses.append(out.loss.item())
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    assert losses[-1] < 0.7 * losses[0], losses


def test_resume_reproduces_the_next_steps_exactly_and_exports(tmp_path):
    first = train(tiny_config(tmp_path, save_every=2, keep_checkpoints=3), ZERO2)
    assert first.step == 4 and len(first.losses) == 4
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step")) == [
        "step00000002",
        "step00000004",
    ]

    # A save killed half-way leaves a .partial folder: ignored (and cleaned up) on resume.
    (checkpoints / "step00000003.partial").mkdir()
    (checkpoints / "step00000003.partial" / "junk.pt").write_bytes(b"half")
    second = train(tiny_config(tmp_path, save_every=2, resume="step00000002"), ZERO2)
    assert not (checkpoints / "step00000003.partial").exists()
    assert second.losses == first.losses[2:]  # bitwise: weights, optimiser, LR schedule and data position

    model = ScoutForConditionalGeneration.from_pretrained(second.export_dir)
    assert model.dtype == torch.bfloat16
    assert {"tokenizer.json", "config.json", "preprocessor_config.json"} <= set(os.listdir(second.export_dir))
    assert (tmp_path / "curve.png").stat().st_size > 0 and (tmp_path / "results.json").exists()


def test_latest_only_points_at_complete_checkpoints(tmp_path):
    checkpointer = Checkpointer(engine=None, directory=str(tmp_path), keep=2, rank=0)
    assert checkpointer.latest_tag() is None
    (tmp_path / "step00000005").mkdir()
    (tmp_path / "latest").write_text("step00000007")  # a tag whose folder is gone
    assert checkpointer.latest_tag() is None
    (tmp_path / "latest").write_text("step00000005")
    assert checkpointer.latest_tag() == "step00000005"
    with pytest.raises(FileNotFoundError, match="no checkpoint 'step00000001'"):
        checkpointer.load("step00000001")
