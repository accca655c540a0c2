"""DeepSpeed training of the tiny model on CPU: ZeRO-2 loss goes down, exact resume, atomic checkpoints, export;
ZeRO-3 on two ranks (DeepSpeed's launcher, gloo) against one rank, and resume across world sizes."""

import os
import shutil
import socket
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = str(ROOT / "configs" / "ds_zero2.json")
ZERO3 = str(ROOT / "configs" / "ds_zero3.json")


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
    first = train(tiny_config(tmp_path, save_every=2, keep_checkpoints=3, profile_steps=[2, 3]), ZERO2)
    assert first.step == 4 and len(first.losses) == 4
    profile = (tmp_path / "profile.txt").read_text()  # the profiled steps still resume bitwise below
    assert "profiled steps 2-3 (2 steps)" in profile
    for phase in ("data", "forward", "backward", "optimizer step", "loop bookkeeping", "other"):
        assert f"| {phase} | " in profile, phase
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


def test_float_fields_accept_exponent_strings():
    # YAML 1.1 reads "3e-3" (no dot) as a string; the command line must still give a float.
    cfg = TrainConfig.load(
        None, [("optim.lr", "3e-3"), ("train.time_budget_min", "6"), ("optim.eps", "1e-6")]
    )
    assert cfg.optim.lr == 3e-3 and cfg.train.time_budget_min == 6.0 and cfg.optim.eps == 1e-6
    with pytest.raises(ValueError, match="optim.lr='fast'; expected a number"):
        TrainConfig.load(None, [("optim.lr", "fast")])


# ---------------------------------------------------------------------- ZeRO-3 on two ranks
# Tiny shapes, 4 steps, a checkpoint every 2. One rank accumulates 2 micro-batches per step, two ranks take
# one each: the same 2 global micro-batches (documents) per optimiser step either way.
MULTI = {
    "model.preset": "tiny",
    "data.seq_len": 384,
    "data.num_workers": 0,
    "data.eval_docs": 0,
    "optim.lr": 3e-3,
    "schedule.warmup_steps": 2,
    "train.micro_batch_size": 4,
    "train.max_steps": 4,
    "train.save_every": 2,
    "train.keep_checkpoints": 2,
    "train.log_every": 1,
    "train.tensorboard": False,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(output_dir, fields: dict | None = None) -> str:
    """``deepspeed --num_gpus 2 scripts/train.py ...`` (DeepSpeed's launcher; CPU accelerator, gloo); stdout."""
    values = {**MULTI, "train.output_dir": str(output_dir), "train.grad_accum": 1, **(fields or {})}
    flags = [
        arg
        for key, value in values.items()
        for arg in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))
    ]
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
        str(ROOT / "scripts" / "train.py"), "--deepspeed", ZERO3, *flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def train_one_rank(output_dir, fields: dict | None = None):
    """The same run in this process, one rank accumulating two micro-batches per step (one thread, as each
    launched rank has, so that the arithmetic is the same)."""
    cfg = TrainConfig.from_dict({})
    for key, value in {
        **MULTI,
        "train.output_dir": str(output_dir),
        "train.grad_accum": 2,
        **(fields or {}),
    }.items():
        cfg.set(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg, ZERO3)
    finally:
        torch.set_num_threads(threads)


def train_losses(output_dir) -> list[float]:
    import json

    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


def copy_checkpoints(source, target) -> None:
    shutil.copytree(Path(source) / "checkpoints", Path(target) / "checkpoints")


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="compares CPU ranks (gloo) with in-process runs, which would use the GPU on this machine",
)
def test_zero3_two_ranks_match_one_rank_and_resume_across_world_sizes(tmp_path):
    two_out = launch_two_ranks(tmp_path / "two")
    two = train_losses(tmp_path / "two")
    assert two_out.count("step 1 |") == 1 and two_out.count("exported to") == 1  # rank 0 logs and writes
    one = train_one_rank(tmp_path / "one", {"train.export": False}).losses
    assert len(one) == len(two) == 4
    assert one[0] == two[0]  # same initial weights and documents
    # Then gradients reduced across ranks vs accumulated in one: the same up to rounding (bitwise equal on the
    # CPUs tried). 1e-5 is tight enough to catch a wrong Adam step count or weight decay after a resume.
    assert one == pytest.approx(two, rel=1e-5)
    assert two[-1] < 0.85 * two[0]

    # 2 ranks -> 1: the ZeRO-3 partitions of step 2 are converted to a universal checkpoint and re-split.
    copy_checkpoints(tmp_path / "two", tmp_path / "two_to_one")
    resumed = train_one_rank(
        tmp_path / "two_to_one", {"train.resume": "step00000002", "train.export": False}
    ).losses
    assert (tmp_path / "two_to_one" / "checkpoints" / "universal" / "step00000002" / "zero").is_dir()
    assert resumed[0] == two[2]  # the next step's loss is identical
    assert resumed == pytest.approx(two[2:], rel=1e-5)

    # 1 rank -> 2.
    copy_checkpoints(tmp_path / "one", tmp_path / "one_to_two")
    out = launch_two_ranks(tmp_path / "one_to_two", {"train.resume": "step00000002", "train.export": False})
    assert "written by 1 rank(s), this run has 2: converted to DeepSpeed's universal format" in out
    resumed = train_losses(tmp_path / "one_to_two")
    assert resumed[0] == one[2] and resumed == pytest.approx(one[2:], rel=1e-5)

    # The HF export written by the two ranks holds the fp32 master weights gathered from both partitions
    # (DeepSpeed's own zero_to_fp32 reading the step-4 checkpoint files), cast to bfloat16.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    gathered = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "two" / "checkpoints"), "step00000004")
    exported = ScoutForConditionalGeneration.from_pretrained(tmp_path / "two" / "export").state_dict()
    assert set(exported) == set(gathered)
    for name, tensor in exported.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, gathered[name].to(torch.bfloat16)), name


def test_kernel_time_is_attributed_to_the_phase_and_launching_operator():
    from types import SimpleNamespace as NS

    from scout_mm.train.metrics import _MARK, _kernel_time_by_phase_and_op

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, start, kernels=(), device=cpu):
        kernels = [NS(name="k", device=0, duration=d) for d in kernels]
        return NS(name=name, time_range=NS(start=start), device_type=device, kernels=kernels)

    events = [
        event("aten::mm", 1, [5.0, 7.0]),
        event(_MARK + "forward", 2),
        event("aten::mm", 3, [11.0]),
        event("aten::add_", 4, [2.0]),
        event("kernel itself", 4, [100.0], device=cuda),  # device events are counted through their CPU op
        event(_MARK + "backward", 5),
        event("aten::copy_", 6, [3.0]),  # after the last mark
        event("aten::empty", 3),  # launched nothing
    ]
    assert _kernel_time_by_phase_and_op(events) == {
        ("forward", "aten::mm"): [12.0, 2],
        ("backward", "aten::mm"): [11.0, 1],
        ("backward", "aten::add_"): [2.0, 1],
        ("other", "aten::copy_"): [3.0, 1],
    }
