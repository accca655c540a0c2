"""DeepSpeed training of the tiny model on CPU: ZeRO-2 loss goes down, exact resume, atomic checkpoints, export;
ZeRO-3 on two ranks (DeepSpeed's launcher, gloo) against one rank, and resume across world sizes."""

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from scout_mm import ScoutForConditionalGeneration
from scout_mm.train.config import TrainConfig
from scout_mm.train.data import IGNORE_INDEX, PackedBatch, SyntheticSource, pack
from scout_mm.train.engine import (
    Checkpointer,
    WarmupCosine,
    apply_configured_schedule,
    build_engine,
    build_model,
    deepspeed_config,
    export_pretrained,
    init_distributed,
    model_setup,
    param_shapes,
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

    meta = json.loads((checkpoints / "step00000004" / "meta.json").read_text())
    assert meta["zero_stage"] == 2 and meta["param_shapes"] == param_shapes(
        model_setup(tiny_config(tmp_path))[0]
    )

    # Resuming the finished run with a larger train.max_steps trains the extra steps, on the cosine of the
    # new total (the checkpoint's own schedule object is restored by the load, then replaced).
    third = train(tiny_config(tmp_path, save_every=2, max_steps=6), ZERO2)
    assert third.step == 6 and len(third.losses) == 2
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lr_after_5 = next(r["lr"] for r in reversed(logged) if r["kind"] == "train" and r["step"] == 5)
    assert lr_after_5 == pytest.approx(3e-3 * WarmupCosine(2, 6, 0.1)(5))
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 6

    model = ScoutForConditionalGeneration.from_pretrained(second.export_dir)
    assert model.dtype == torch.bfloat16
    assert {"tokenizer.json", "config.json", "preprocessor_config.json"} <= set(os.listdir(second.export_dir))
    assert (tmp_path / "curve.png").stat().st_size > 0 and (tmp_path / "results.json").exists()


def test_configured_schedule_applies_on_resume():
    def scheduler(schedule):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    saved = WarmupCosine(2, 4, 0.1)
    before = scheduler(saved)
    for _ in range(3):
        before.optimizer.step()
        before.step()
    state = before.state_dict()

    def resume(max_steps, budget=None, fitted=False):
        cfg = TrainConfig.from_dict(
            {"optim": {"lr": 1.0}, "schedule": {"warmup_steps": 1, "min_lr_ratio": 0.0},
             "train": {"max_steps": max_steps, "time_budget_min": budget}}
        )  # fmt: skip
        schedule = WarmupCosine(cfg.schedule.warmup_steps, max_steps, 0.0)
        resumed = scheduler(schedule)
        resumed.load_state_dict(
            {**state, "lr_lambdas": [{**state["lr_lambdas"][0], "fitted_by_budget": fitted}]}
        )
        assert schedule.total_steps == 4  # what the load does by itself: the checkpoint's schedule wins
        return resumed, schedule, apply_configured_schedule(resumed, schedule, cfg)

    resumed, schedule, log = resume(10)
    assert (schedule.total_steps, schedule.warmup_steps, schedule.min_ratio) == (10, 1, 0.0)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(WarmupCosine(1, 10, 0.0)(3))
    assert log == [
        "schedule on resume: the configured values apply: total steps 10 (the checkpoint had 4); "
        "schedule.warmup_steps 1 (the checkpoint had 2); schedule.min_lr_ratio 0.0 (the checkpoint had 0.1); "
        "the cosine now ends at step 10"
    ]
    resumed.optimizer.step()
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(WarmupCosine(1, 10, 0.0)(4))
    # A total fitted to a time budget is kept while this run has a budget (it re-fits it), capped at max_steps.
    assert resume(10, budget=5.0, fitted=True)[1].total_steps == 4
    assert resume(3, budget=5.0, fitted=True)[1].total_steps == 3
    assert resume(10, budget=None, fitted=True)[1].total_steps == 10


def test_tied_embeddings_export_with_the_lm_head_left_out(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.set("model.overrides", {"tie_word_embeddings": True, "num_hidden_layers": 1})
    _, world, _ = init_distributed()
    model, processor = build_model(cfg)
    engine, _, _ = build_engine(cfg, model, deepspeed_config(cfg, None, world))
    export_pretrained(engine, processor, str(tmp_path / "export"), "float32", "5GB", rank=0)
    exported = ScoutForConditionalGeneration.from_pretrained(tmp_path / "export")
    lm = exported.language_model
    assert exported.config.tie_word_embeddings and lm.lm_head.weight is lm.model.embed_tokens.weight
    torch.testing.assert_close(lm.lm_head.weight, model.language_model.model.embed_tokens.weight.detach())


def test_init_from_applies_shape_keeping_overrides_and_names_the_others():
    tiny = str(ROOT / "scout_mm" / "assets" / "tiny")
    cfg = TrainConfig.from_dict(
        {"model": {"init_from": tiny, "overrides": {"router_aux_loss_coef": 0.5, "attention_chunk_size": 64}}}
    )
    model, _ = build_model(cfg)
    reference = ScoutForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    text = model.config.text
    assert (text.router_aux_loss_coef, text.attention_chunk_size) == (0.5, 64)
    assert model.language_model.model.layers[0].self_attn.chunk_size == 64  # the modules see it too
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name
    cfg.set("model.overrides", {"router_aux_loss_coef": 0.5, "num_hidden_layers": 2})
    cfg.set("model.vision_overrides", {"num_hidden_layers": 7})
    with pytest.raises(
        ValueError,
        match=r"model.overrides.num_hidden_layers \(moe_layers .*\), "
        r"model.vision_overrides.num_hidden_layers would change parameter shapes of the checkpoint .*tiny",
    ):
        model_setup(cfg)
    cfg.set(
        "model.overrides", {"attention_dropout": 0.1}
    )  # not implemented: refused before anything is built
    cfg.set("model.vision_overrides", {})
    with pytest.raises(ValueError, match=r"attention_dropout=0.1.*set model.overrides.attention_dropout: 0"):
        model_setup(cfg)
    cfg.set("model.overrides", {})
    cfg.validate()
    cfg.set("model.preset", "small")  # was silently ignored: the checkpoint defines the model
    with pytest.raises(
        ValueError, match=r"model.preset='small' and model.init_from=.* both set.*drop model.preset"
    ):
        cfg.validate()


def test_resume_refuses_another_zero_stage_or_another_model(tmp_path):
    shapes = param_shapes(model_setup(tiny_config(tmp_path))[0])
    folder = tmp_path / "checkpoints" / "step00000002"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"world_size": 1, "zero_stage": 2, "param_shapes": shapes}))
    checkpointer = Checkpointer(None, str(tmp_path / "checkpoints"), keep=2, rank=0)
    assert checkpointer.prepare_resume("step00000002", 1, {"zero_optimization": {"stage": 2}}, shapes) is None
    with pytest.raises(ValueError, match=r"step00000002 was written with ZeRO-2, this run uses ZeRO-3; .*"
                       r"--train.resume never .* new train.output_dir"):  # fmt: skip
        checkpointer.prepare_resume("step00000002", 1, {"zero_optimization": {"stage": 3}}, shapes)
    other = TrainConfig.from_dict({"model": {"overrides": {"num_hidden_layers": 2}}})
    with pytest.raises(ValueError, match=r"step00000002 holds another model .*--train.resume never"):
        checkpointer.prepare_resume("step00000002", 1, {"zero_optimization": {"stage": 2}},
                                    param_shapes(model_setup(other)[0]))  # fmt: skip


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


def test_resume_accepts_step_n_with_any_padding_and_names_the_checkpoints_there(tmp_path):
    # The folders a run leaves in output_dir/checkpoints (no training needed to look tags up): two saves,
    # latest, a universal conversion and DeepSpeed's helper scripts.
    directory = tmp_path / "checkpoints"
    for tag in ("step00000005", "step00000010", "universal/step00000005"):
        (directory / tag).mkdir(parents=True)
    (directory / "latest").write_text("step00000010")
    (directory / "zero_to_fp32.py").write_text("")
    checkpointer = Checkpointer(engine=None, directory=str(directory), keep=2, rank=0)
    assert checkpointer.tags() == ["step00000005", "step00000010"]
    for resume in ("step10", "step010", "step00000010", "step000000010"):
        assert checkpointer.resume_tag(resume) == "step00000010"
    assert checkpointer.resume_tag("step5") == "step00000005"
    assert checkpointer.prepare_resume("step5", 1, {"zero_optimization": {"stage": 2}}) is None
    assert checkpointer.resume_tag("auto") == "step00000010"
    assert checkpointer.resume_tag("never") is None
    for resume in ("step7", "universal", "latest", "10"):
        with pytest.raises(
            FileNotFoundError,
            match=rf"train.resume='{resume}': no checkpoint '{resume}' in .*checkpoints; "
            r"it holds step00000005, step00000010; expected 'auto', 'never' or the tag of a checkpoint there",
        ):
            checkpointer.resume_tag(resume)
    empty = Checkpointer(engine=None, directory=str(tmp_path / "empty"), keep=2, rank=0)
    with pytest.raises(FileNotFoundError, match=r"'step10' in .*empty; the folder does not exist; expected"):
        empty.resume_tag("step10")
    assert empty.resume_tag("auto") is None  # auto still starts afresh
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'step10' in .*empty; it holds no checkpoints; expected"):
        empty.resume_tag("step10")


@pytest.mark.parametrize(
    "key, value, error",
    [
        ("train.micro_batch_size", "2.5", r"train.micro_batch_size=2.5; expected an integer"),
        ("train.max_steps", "many", r"train.max_steps='many'; expected an integer"),
        ("optim.betas", "[0.9]", r"optim.betas=\[0.9\]; expected \[beta1, beta2\]"),
        ("optim.betas", "0.9", r"optim.betas=0.9; expected a list"),
        ("train.resume", "2", r"train.resume=2; expected a string"),
        ("train.tensorboard", "1", r"train.tensorboard=1; expected true or false"),
        ("schedule.warmup_steps", "-5", r"schedule.warmup_steps=-5; expected >= 0"),
        ("schedule.min_lr_ratio", "2.0", r"schedule.min_lr_ratio=2.0; expected a fraction"),
        ("optim.grad_clip", "-1", r"optim.grad_clip=-1.0; expected >= 0"),
        ("train.time_budget_min", "-1", r"train.time_budget_min=-1.0; expected > 0"),
        ("train.profile_steps", "[5]", r"train.profile_steps=\[5\]; expected \[first, last\]"),
        ("data.sources", "synthetic", r"data.sources='synthetic'; expected a list"),
        (
            "data.sources",
            "[synthetic]",
            r"data.sources=\['synthetic'\]; expected a non-empty list of mappings",
        ),
        (
            "data.sources",
            "[{type: synthetic, weight: 0}]",
            r"data.sources\[0\] weight 0; expected a positive",
        ),
        ("data.sources", "[{type: jsonl}]", r"data.sources\[0\] = .*needs a 'path'"),
        ("data.eval_tasks", "colour", r"data.eval_tasks='colour'; expected a list"),
    ],
)
def test_config_values_are_type_and_range_checked_naming_the_key(key, value, error):
    with pytest.raises(ValueError, match=error):
        TrainConfig.load(None, [(key, value)]).validate()


def test_integer_fields_accept_integral_numbers():
    cfg = TrainConfig.load(None, [("train.max_steps", "1e3"), ("train.micro_batch_size", "4.0")])
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.micro_batch_size == 4 and isinstance(cfg.train.micro_batch_size, int)


@pytest.mark.parametrize(
    "export_dir, error",
    [
        ("{out}", r"is or holds train.output_dir \(.*run\): each export replaces its folder"),
        ("{out}/..", r"is or holds train.output_dir \(.*run\): each export replaces its folder"),
        ("{out}/checkpoints", r"is or lies in train.output_dir's checkpoints folder \(.*run/checkpoints\)"),
        ("{out}/checkpoints/export", r"is or lies in train.output_dir's checkpoints folder"),
    ],
)
def test_export_dir_may_not_be_the_output_dir_above_it_or_in_its_checkpoints(tmp_path, export_dir, error):
    cfg = TrainConfig.load(
        None,
        [
            ("train.output_dir", str(tmp_path / "run")),
            ("train.export_dir", export_dir.format(out=tmp_path / "run")),
        ],
    )
    with pytest.raises(ValueError, match=rf"train.export_dir='.*' {error}.*; export to another folder"):
        cfg.validate()
    for elsewhere in (tmp_path / "run" / "export", tmp_path / "run" / "exports" / "v1", tmp_path / "out"):
        cfg.set("train.export_dir", str(elsewhere))
        cfg.validate()


def test_deepspeed_json_mistakes_are_named(tmp_path):
    cfg = TrainConfig()
    bad = tmp_path / "bad.json"
    bad.write_text('{"bf16": {"enabled": true},}')
    with pytest.raises(ValueError, match=r"DeepSpeed config .*bad.json is not valid JSON"):
        deepspeed_config(cfg, str(bad), 1)
    odd = tmp_path / "odd.json"
    odd.write_text(
        json.dumps({"zero_optimisation": {"stage": 2}, "scheduler": {"type": "WarmupLR"}, "bf16": {}})
    )
    with pytest.warns(UserWarning) as caught:
        ds = deepspeed_config(cfg, str(odd), 1)
    messages = [str(w.message) for w in caught]
    assert any(
        "'zero_optimisation' is not a DeepSpeed setting" in m and "'zero_optimization'" in m for m in messages
    )
    assert any("'scheduler' section is ignored: the LR follows the training config" in m for m in messages)
    assert "scheduler" not in ds  # config.yaml records what is in effect
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deepspeed_config(cfg, ZERO2, 1)  # the shipped configs pass silently
        deepspeed_config(cfg, str(ROOT / "configs" / "ds_zero3_offload.json"), 1)
    # Wrong ZeRO values are named here, through DeepSpeed's own schema, not inside deepspeed.initialize after
    # the model was built.
    for section, message in [
        ({"zero_optimization": {"stage": "two"}}, r"zero_optimization.stage='two': Input should be 0, 1, 2"),
        ({"zero_optimization": {"stage": 7}}, r"zero_optimization.stage=7: Input should be 0, 1, 2"),
        ({"zero_optimization": "two"}, r"zero_optimization='two'; expected an object"),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
            r"zero_optimization.offload_param.device='gpu'",
        ),
        ({"optimizer": "Adam"}, r"optimizer='Adam'; expected an object"),
    ]:
        bad.write_text(json.dumps(section))
        with pytest.raises(ValueError, match=rf"DeepSpeed config .*bad.json: {message}"):
            deepspeed_config(cfg, str(bad), 1)


@pytest.mark.parametrize(
    "fields, ds_json, error",
    [
        ({"data.sources": [{"type": "jsonl", "path": "/nonexistent/train.jsonl"}]}, ZERO2, FileNotFoundError),
        ({"data.eval_tasks": ["colour"], "data.eval_docs": 4}, ZERO2, r"tasks \['colour'\]; expected"),
        (
            {"data.seq_len": 16},
            ZERO2,
            r"data.seq_len=16 is shorter than data.sources\[0\]'s synthetic document",
        ),
        ({}, "{tmp}/missing.json", FileNotFoundError),
        (
            {"train.resume": "step10"},
            ZERO2,
            (FileNotFoundError, r"train.resume='step10': no checkpoint 'step10' in .*out/checkpoints"),
        ),
    ],
)
def test_data_and_deepspeed_config_are_checked_before_the_model_is_built(
    tmp_path, monkeypatch, fields, ds_json, error
):
    import scout_mm.train.loop as loop

    def no_model(cfg):
        raise AssertionError("the model was built before the configuration was checked")

    monkeypatch.setattr(loop, "build_model", no_model)
    cfg = tiny_config(tmp_path / "out")
    for key, value in fields.items():
        cfg.set(key, value)
    kind, match = {type: (error, None), str: (ValueError, error), tuple: error}[type(error)]
    with pytest.raises(kind, match=match):
        train(cfg, ds_json.format(tmp=tmp_path))
    assert (
        not (tmp_path / "out" / "config.yaml").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()
    )


def test_logged_loss_is_the_mean_over_label_tokens_and_skips_micro_batches_without_any():
    from scout_mm.train.loop import _Window

    def batch(n_labels: int):
        ids = torch.ones(1, 6, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, 1 : 1 + n_labels] = 1
        made = PackedBatch(ids, labels, ids, ids.bool(), ids * 0, None, [""])
        assert made.n_label_tokens == n_labels  # the targets labels[:, 1:] the loss counts
        return made

    window = _Window(torch.device("cpu"), n_experts=0, n_layers=0)
    window.restart()
    empty = torch.zeros(0)
    window.add(torch.tensor(0.0), 0, None, empty, batch(0), 0.0)  # no label token: the sum is 0
    assert window.summary(1, None)[0]["loss"] is None
    window.add(torch.tensor(2.0), 1, None, empty, batch(1), 0.0)  # summed losses: one token at 2.0
    window.add(torch.tensor(12.0), 3, None, empty, batch(3), 0.0)  # three tokens at 4.0
    assert window.summary(1, None)[0]["loss"] == 3.5  # 14 / 4 tokens, not the mean of the means (3.0)


def test_accumulated_micro_batches_weigh_every_label_token_alike():
    """With grad_accum 2, DeepSpeed's accumulated gradient (each micro-batch's summed loss over
    step_loss_divisor, DeepSpeed dividing by grad_accum) is the gradient of the mean over every label token of
    the step (an fp32 copy of the model as the reference), not that of the mean of the two micro-batch means."""
    import copy

    from scout_mm.train.loop import step_loss_divisor

    cfg = tiny_config("unused", grad_accum=2)
    _, world, _ = init_distributed()
    model, processor = build_model(cfg)
    reference = copy.deepcopy(model).float()
    ds = deepspeed_config(cfg, ZERO2, world)
    ds["gradient_clipping"] = 0.0
    engine, tap, _ = build_engine(cfg, model, ds)
    source = SyntheticSource(processor, "train", seed=3)
    docs = [source[i] for i in range(5)]
    micro = [pack(docs[:1], 384, 128, processor), pack(docs[1:], 384, 128, processor)]
    counts = [b.n_label_tokens for b in micro]
    assert 0 < 3 * counts[0] < counts[1]  # unequal, so the two objectives differ

    def run(module, batch, num_items):
        return module(
            input_ids=batch.input_ids, pixel_values=batch.pixel_values, position_ids=batch.position_ids,
            labels=batch.labels, with_aux_loss=False, num_items_in_batch=num_items,
        ).loss  # fmt: skip

    divisor = step_loss_divisor(counts, grad_accum=2, world=world, device=torch.device("cpu"))
    assert float(divisor) == sum(counts) / 2
    for batch in micro:
        tap.start_forward()
        engine.backward(run(engine, batch, divisor))
        engine.step()
    got = float(engine.get_global_grad_norm())

    def norm_of(loss) -> float:
        reference.zero_grad(set_to_none=True)
        loss.backward()
        return float(
            torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None]).norm()
        )

    sums = [run(reference, b, 1.0) for b in micro]
    token_mean = norm_of(sum(sums) / sum(counts))
    sums = [run(reference, b, 1.0) for b in micro]
    mean_of_means = norm_of((sums[0] / counts[0] + sums[1] / counts[1]) / 2)
    assert got == pytest.approx(token_mean, rel=0.02)  # bf16 training vs the fp32 copy
    assert mean_of_means != pytest.approx(token_mean, rel=0.1)  # the check can tell the two apart
    # Without num_items_in_batch the loss is the plain mean over the batch's own label tokens.
    with torch.no_grad():
        assert float(run(reference, micro[1], None)) == pytest.approx(
            float(run(reference, micro[1], counts[1])), rel=1e-6
        )


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


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train.max_steps", "-1"], "train.max_steps=-1; expected >= 1"),
        (["--deepspeed", "/nonexistent/ds.json"], "/nonexistent/ds.json"),  # found inside train()
    ],
)
def test_train_script_reports_setup_errors_in_one_line(tmp_path, flags, message):
    script = str(ROOT / "scripts" / "train.py")
    command = [sys.executable, script, "--train.output_dir", str(tmp_path), *flags]
    # A fresh MASTER_PORT: this process may hold the inherited one (in-process runs initialise torch.distributed).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "MASTER_PORT": str(_free_port())}  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and message in done.stderr, done.stderr[-2000:]
    assert done.stderr.rstrip().splitlines()[-1].startswith("train.py: error: ")
