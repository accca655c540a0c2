"""The training loop: ``train(config, deepspeed_config_path)`` runs one (possibly resumed) training job."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from scout_mm.train.config import TrainConfig
from scout_mm.train.data import (
    JsonlSource,
    Mixture,
    PackedStream,
    SyntheticSource,
    eval_batches,
    make_loader,
)
from scout_mm.train.engine import (
    Checkpointer,
    apply_configured_schedule,
    barrier,
    build_engine,
    build_model,
    deepspeed_config,
    export_pretrained,
    init_distributed,
    model_setup,
    param_shapes,
    zero_stage,
)
from scout_mm.train.evaluate import answer_accuracy, generation_accuracy
from scout_mm.train.metrics import (
    FlopCounter,
    Logger,
    StepProfiler,
    expert_histogram,
    peak_tflops,
    plot_curve,
)
from scout_mm.train.synthetic import SyntheticTasks


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(
        default_factory=list
    )  # training loss of each log line (every step with log_every=1)
    eval: dict | None = None
    generation: dict | None = None
    export_dir: str | None = None
    truncated_docs: int = 0  # documents longer than data.seq_len, cut to it


def build_source(cfg: TrainConfig, processor):
    """The training documents: the configured sources (jsonl files read and checked here) as one mixture."""
    sources, weights = [], []
    for i, spec in enumerate(cfg.data.sources):
        kind = spec.get("type")
        if kind == "synthetic":
            source = SyntheticSource(processor, "train", cfg.data.seed, spec.get("tasks"))
            _check_synthetic_fits(source, cfg.data.seq_len, f"data.sources[{i}]")
            sources.append(source)
        else:  # "jsonl", with a path: TrainConfig.validate checked each spec's type, path and weight
            sources.append(JsonlSource(processor, spec["path"], cfg.data.seed))
        weights.append(float(spec.get("weight", 1.0)))
    return Mixture(sources, weights, cfg.data.seed)


def _check_synthetic_fits(source: SyntheticSource, seq_len: int, name: str) -> None:
    # A synthetic document cut to seq_len loses its answer (the labelled part comes last): a seq_len that
    # cannot hold the first few documents of each task is a config error, reported before the model is built.
    for index in range(2 * len(source.tasks.tasks)):
        n = len(source[index].ids)
        if n > seq_len:
            raise ValueError(
                f"data.seq_len={seq_len} is shorter than {name}'s synthetic document {index} ({n} tokens); "
                "raise data.seq_len"
            )


def data_position(state: dict, micro_batch_size: int) -> tuple[int, int, str | None]:
    """(global micro-batches consumed, document offset, a line for the log or None) that resume the data
    stream at the first document the checkpoint had not trained on, for any ``micro_batch_size``.

    Micro-batch ``g`` holds documents ``[offset + g * micro_batch_size, ...)``: a checkpoint records the
    documents consumed, so a new micro_batch_size starts at the same document rather than at
    ``consumed x new size`` (which would skip or repeat documents).
    """
    if "documents_consumed" not in state:  # nothing to resume, or a checkpoint from before the count
        return state.get("batches_consumed", 0), 0, None
    documents = state["documents_consumed"]
    consumed, offset = divmod(documents, micro_batch_size)
    saved = state.get("micro_batch_size", micro_batch_size)
    note = (
        f"train.micro_batch_size {micro_batch_size} now, {saved} before: the data continues at document "
        f"{documents}, the first one the checkpoint had not trained on"
    )
    return consumed, offset, note if saved != micro_batch_size else None


@contextlib.contextmanager
def setup_errors():
    """Marks an OSError / ValueError raised inside as a run refused before its model was built (a bad config
    value, data file, eval task, DeepSpeed JSON or checkpoint to resume): ``scripts/train.py`` prints those as
    one line, while errors once training runs keep their tracebacks. The exception's type is kept."""
    try:
        yield
    except (OSError, ValueError) as e:
        e.before_training = True
        raise


def step_loss_divisor(label_counts: list[int], grad_accum: int, world: int, device) -> float | torch.Tensor:
    """What each micro-batch's summed cross-entropy is divided by, so that an optimiser step's gradient is that
    of the mean over every label token of the step, on every rank (HF Trainer's ``num_items_in_batch``):
    the step's label tokens over ``grad_accum * world``, because DeepSpeed divides each micro-batch's loss by
    ``grad_accum`` and averages gradients over the ranks. A mean of per-micro-batch means would weigh a token
    of a micro-batch with few label tokens more than one of a micro-batch with many, so the result would
    depend on how the documents fell into micro-batches.

    ``label_counts``: this rank's micro-batches' :attr:`PackedBatch.n_label_tokens`, read on the host batches;
    several ranks add theirs in one tiny all-reduce of a device scalar, one rank gets a float: no host sync
    either way. A step without label tokens (every conversation
    lacking an assistant turn) has zero sums and zero gradient; the floor of 1 only keeps 0 / 0 out."""
    count = float(sum(label_counts))
    if not (dist.is_initialized() and world > 1):
        return max(count, 1.0) / grad_accum
    total = torch.full((), count, device=device)  # a fill kernel: the value travels as its argument, no copy
    dist.all_reduce(total)
    return total.clamp(min=1.0) / (grad_accum * world)


def train(
    cfg: TrainConfig, deepspeed_config_path: str | None = None, launch_time: float | None = None
) -> TrainResult:
    """Train (or resume) as configured; returns what rank 0 saw. Every rank must call it."""
    launch_time = launch_time or time.time()
    with setup_errors():
        cfg.validate()
        t = cfg.train
        rank, world, local_rank = init_distributed()
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Everything that can be checked without the weights is checked before the model is built (minutes for a
        # large checkpoint): the data files, eval tasks, the DeepSpeed JSON and the checkpoint to resume. A typo
        # then fails in seconds and leaves nothing in output_dir.
        model_config, processor = model_setup(cfg)
        align = (
            model_config.text.attention_chunk_size if cfg.data.pack_align == "chunk" else cfg.data.pack_align
        )
        source = build_source(cfg, processor)
        SyntheticTasks("heldout", cfg.data.seed, **_tasks(cfg))  # the eval task names
        eval_set = []
        if cfg.data.eval_docs:
            heldout = SyntheticSource(processor, "heldout", cfg.data.seed, cfg.data.eval_tasks)
            eval_set = eval_batches(
                heldout, processor, cfg.data.eval_docs, t.micro_batch_size, cfg.data.seq_len, align
            )
        ds_config = deepspeed_config(cfg, deepspeed_config_path, world)
        checkpoints = Checkpointer(None, os.path.join(t.output_dir, "checkpoints"), t.keep_checkpoints, rank)
        resume_tag = checkpoints.resume_tag(t.resume)
        # A checkpoint from another number of ranks is converted to DeepSpeed's universal format first.
        conversion = (
            checkpoints.prepare_resume(resume_tag, world, ds_config, param_shapes(model_config))
            if resume_tag
            else None
        )

    model, _ = build_model(cfg, (model_config, processor))
    engine, tap, schedule = build_engine(cfg, model, ds_config)
    model_config = engine.module.config
    checkpoints.engine = engine
    state = (checkpoints.load(resume_tag) if resume_tag else None) or {}
    schedule_changes = apply_configured_schedule(engine.lr_scheduler, schedule, cfg) if state else []
    step = state.get("step", 0)
    consumed, doc_offset, data_note = data_position(state, t.micro_batch_size)
    logger = Logger(t.output_dir, schedule.total_steps, step, rank == 0, t.tensorboard)
    global_batch = t.micro_batch_size * t.grad_accum * world  # documents per optimiser step
    if conversion:
        logger.print(conversion)
    if state:
        logger.print(f"resumed from {resume_tag}: step {step}, {consumed} micro-batches consumed")
        for line in schedule_changes + ([data_note] if data_note else []):
            logger.print(line)
        saved_batch = state.get("global_batch_docs")
        if saved_batch is not None and saved_batch != global_batch:
            logger.print(
                f"note: {global_batch} documents per step now, {saved_batch} before (set train.grad_accum "
                "so that micro_batch_size x grad_accum x ranks stays the same to continue the same run)"
            )
        if step >= schedule.total_steps:
            logger.print(
                f"{resume_tag} is at step {step} and train.max_steps is {t.max_steps}: nothing left to train "
                "(raise train.max_steps to continue the run)"
            )
    if rank == 0:
        with open(os.path.join(t.output_dir, "config.yaml"), "w") as f:
            import yaml

            yaml.safe_dump({**cfg.to_dict(), "deepspeed": ds_config}, f, sort_keys=False)

    stream = PackedStream(
        source, processor, t.micro_batch_size, cfg.data.seq_len, align, consumed, rank, world, doc_offset
    )
    batches = iter(make_loader(stream, cfg.data.num_workers))

    dtype = next(engine.module.parameters()).dtype
    coef = model_config.text.router_aux_loss_coef
    flops = FlopCounter(model_config)
    peak = peak_tflops(t.peak_tflops)

    def forward(batch, num_items_in_batch=None):
        pixels = batch.pixel_values.to(dtype) if batch.pixel_values is not None else None
        return engine(
            input_ids=batch.input_ids, pixel_values=pixels, position_ids=batch.position_ids,
            labels=batch.labels, with_aux_loss=False, num_items_in_batch=num_items_in_batch,
        )  # fmt: skip

    def evaluate() -> dict:
        engine.eval()
        result = answer_accuracy(forward, eval_set, device)
        engine.train()
        return result

    result = TrainResult(step=step)
    profiler = StepProfiler(t.profile_steps if rank == 0 else None, t.output_dir, device, peak)
    window = _Window(device, tap.n_experts, len(tap.routers))
    # (from step, at step) pairs: time the steps in between, then fit the step count to the budget.
    c = max(t.calibration_steps, 6)
    fit_marks = (
        [] if t.time_budget_min is None else [(0, step + 5), (step + 5, step + c), (step + c, step + 4 * c)]
    )
    marks_time = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine.train()
    window.restart()
    while step < schedule.total_steps:
        profiler.begin_step(step + 1)
        waited = time.time()
        micro_batches = [next(batches) for _ in range(t.grad_accum)]
        window.data_wait += time.time() - waited
        label_counts = [batch.n_label_tokens for batch in micro_batches]  # host batches: no sync
        loss_divisor = step_loss_divisor(label_counts, t.grad_accum, world, device)
        for batch, n_labels in zip(micro_batches, label_counts, strict=True):
            batch = batch.to(device)
            profiler.mark("data")
            tap.start_forward()
            out = forward(batch, loss_divisor)
            aux = tap.aux_loss(batch.token_mask)
            loss = out.loss + coef * aux if aux is not None else out.loss
            profiler.mark("forward")
            engine.backward(loss)
            profiler.mark("backward")
            engine.step()
            profiler.mark("optimizer step")
            n_tiles = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
            batch_flops = flops(*batch.input_ids.shape, n_tiles)
            profiler.add_flops(batch_flops)
            window.add(
                out.loss.detach() * loss_divisor, n_labels, aux, tap.expert_load(batch.token_mask), batch,
                batch_flops,
            )  # fmt: skip
            profiler.mark("loop bookkeeping")
        step += 1
        report = profiler.end_step(step)
        if report:
            logger.print(report)
        consumed += t.grad_accum * world
        logger.advance()

        if fit_marks and step == fit_marks[0][1]:
            # Fit the step count to the time budget from the measured step time, twice: early, and again
            # once the DataLoader and kernel caches are warm. The cosine follows the new total.
            _sync(device)
            now = time.time()
            if marks_time is not None:
                per_step = (now - marks_time) / (step - fit_marks[0][0])
                left = t.time_budget_min * 60 - (now - launch_time) - t.time_reserve_s
                total = _min_over_ranks(min(t.max_steps, step + max(0, int(left / per_step))), device)
                schedule.total_steps = max(total, step)
                schedule.fitted_by_budget = True
                logger.set_total(schedule.total_steps)
                logger.print(
                    f"time budget {t.time_budget_min} min: {per_step * 1e3:.0f} ms/step -> {schedule.total_steps} steps"
                )
            fit_marks.pop(0)
            marks_time = now
        out_of_time = t.time_budget_min is not None and _min_over_ranks(
            int(time.time() - launch_time > t.time_budget_min * 60 - t.time_reserve_s), device, op="max"
        )
        last = step >= schedule.total_steps or out_of_time

        if step % t.log_every == 0 or last:
            scalars, hist = window.summary(world, peak)
            scalars["lr"] = engine.get_lr()[0]
            norm = engine.get_global_grad_norm()
            scalars["grad_norm"] = float(norm) if norm is not None else None
            if device.type == "cuda":
                scalars["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result.losses.append(scalars["loss"])
            logger.log(step, scalars, histograms={"expert_load": hist})
            logger.print(_format(step, scalars))
            if scalars["truncated_docs"]:
                result.truncated_docs += int(scalars["truncated_docs"])
                logger.print(
                    f"warning: {scalars['truncated_docs']:.0f} documents longer than data.seq_len="
                    f"{cfg.data.seq_len} truncated since the last log line ({result.truncated_docs} so far; "
                    f"e.g. {window.truncated_example or 'on another rank'})"
                )
            window.restart()
        if eval_set and ((t.eval_every and step % t.eval_every == 0) or last):
            result.eval = evaluate()
            logger.log(step, {k: v for k, v in result.eval.items() if k != "docs"}, kind="eval")
            logger.print(_format(step, result.eval, prefix="eval"))
            window.restart()  # keep eval time out of the throughput numbers
        if t.save_every and (step % t.save_every == 0 or last):
            checkpoints.save(
                step,
                {
                    "step": step,
                    "batches_consumed": consumed,
                    "documents_consumed": doc_offset + consumed * t.micro_batch_size,
                    "micro_batch_size": t.micro_batch_size,
                    "world_size": world,
                    "global_batch_docs": global_batch,
                },
            )
            window.restart()
        if out_of_time and step < schedule.total_steps:
            logger.print(f"time budget reached at step {step} of {schedule.total_steps}")
            break
    del batches  # stop the DataLoader workers
    result.step = step

    if t.export:
        result.export_dir = t.export_dir or os.path.join(t.output_dir, "export")
        export_pretrained(engine, processor, result.export_dir, t.export_dtype, t.export_shard_size, rank)
        logger.print(f"exported to {result.export_dir}")
    if t.generate_eval_docs and zero_stage(ds_config) < 3 and rank == 0:
        tasks = SyntheticTasks("heldout", cfg.data.seed, **_tasks(cfg))
        try:
            result.generation = generation_accuracy(
                engine.module, processor, [tasks[i] for i in range(t.generate_eval_docs)]
            )
            logger.print(_format(step, result.generation, prefix="generate"))
        except Exception as e:  # a failed check must not cost the trained model or its summary
            result.generation = {"error": repr(e)}
            logger.print(f"generation check failed: {e!r}")
    if rank == 0:
        _write_summary(cfg, ds_config, result, launch_time, world, device)
        plot_curve(
            os.path.join(t.output_dir, "metrics.jsonl"), os.path.join(t.output_dir, "curve.png"),
            title=f"{cfg.model.preset or os.path.basename(os.path.normpath(cfg.model.init_from or 'tiny'))}: "
            "synthetic image-text tasks",
        )  # fmt: skip
    logger.close()
    barrier()
    return result


class _Window:
    """Sums over the steps between two log lines, kept on the device (no host sync per step)."""

    def __init__(self, device, n_experts: int, n_layers: int):
        self.device, self.n_experts, self.n_layers = device, n_experts, n_layers

    def restart(self) -> None:
        # summed loss, aux, micro-steps, tokens
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.label_tokens = 0
        self.truncated = 0
        self.truncated_example = ""
        self.load = torch.zeros(self.n_layers, self.n_experts, dtype=torch.float64, device=self.device)
        self.positions = 0
        self.flops = 0.0
        self.data_wait = 0.0  # seconds the loop waited for the DataLoader
        self.started = time.time()

    def add(self, loss_sum, n_labels: int, aux, load, batch, flops: float) -> None:
        """``loss_sum``: the micro-batch's cross-entropy summed over its ``n_labels`` label tokens (0 without
        any)."""
        aux = aux.detach() if aux is not None else torch.zeros((), device=self.device)
        tokens = batch.token_mask.sum()
        self.sums += torch.stack(
            [
                loss_sum.detach().double(),
                aux.double(),
                torch.ones((), device=self.device, dtype=torch.float64),
                tokens.double(),
            ]
        )
        self.label_tokens += n_labels
        if batch.truncated:
            self.truncated += len(batch.truncated)
            self.truncated_example = self.truncated_example or batch.truncated[0]
        if load.numel():
            self.load += load.double()
        self.positions += batch.input_ids.numel()
        self.flops += flops

    def summary(self, world: int, peak: float | None) -> tuple[dict, torch.Tensor]:
        packed = torch.cat(
            [
                self.sums,
                torch.tensor(
                    [self.label_tokens, self.positions, self.flops, self.truncated],
                    dtype=torch.float64,
                    device=self.device,
                ),
                self.load.flatten(),
            ]
        )
        if dist.is_initialized() and world > 1:
            dist.all_reduce(packed)
        elapsed = max(time.time() - self.started, 1e-9)
        loss, aux, micro, tokens, label_count, positions, flops, truncated = packed[:8].tolist()
        load = packed[8:].view(self.n_layers, self.n_experts)
        scalars = {
            # the mean over every label token of the window (None: there was none)
            "loss": loss / label_count if label_count else None,
            "aux_loss": aux / max(micro, 1) if self.n_layers else None,
            "tokens_per_s": tokens / elapsed,  # document tokens (padding excluded), all ranks
            "positions_per_s": positions / elapsed,  # every position the model ran, padding included
            "tflops_per_gpu": flops / elapsed / world / 1e12,
            "data_wait": self.data_wait / elapsed,  # share of the time spent waiting for batches (rank 0)
            "truncated_docs": truncated,  # documents longer than data.seq_len, all ranks
        }
        if peak:
            scalars["mfu"] = scalars["tflops_per_gpu"] / peak
        if self.n_layers:
            per_layer = load / load.sum(-1, keepdim=True).clamp(min=1) * self.n_experts
            scalars["expert_load_max"] = float(per_layer.max())  # busiest expert / mean load (1 = balanced)
            scalars["expert_load_min"] = float(per_layer.min())
        return scalars, expert_histogram(load).cpu()


def _tasks(cfg: TrainConfig) -> dict:
    return {"tasks": cfg.data.eval_tasks} if cfg.data.eval_tasks else {}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _min_over_ranks(value: int, device, op: str = "min") -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return int(tensor.item())


def _format(step: int, values: dict, prefix: str = "step") -> str:
    parts = [f"{prefix} {step}"]
    for key, value in values.items():
        if isinstance(value, float) and key not in ("time", "truncated_docs"):  # truncation: its own warning
            parts.append(f"{key} {value:.4g}")
    return " | ".join(parts)


def _write_summary(cfg, ds_config, result: TrainResult, launch_time: float, world: int, device) -> None:
    import deepspeed

    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "world_size": world,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "wall_s": time.time() - launch_time,
        "steps": result.step,
        "final_train_loss": next((loss for loss in reversed(result.losses) if loss is not None), None),
        "truncated_docs": result.truncated_docs,
        "eval": result.eval,
        "generation": result.generation,
        "zero_stage": zero_stage(ds_config),
        "config": cfg.to_dict(),
    }
    with open(os.path.join(cfg.train.output_dir, "results.json"), "w") as f:
        json.dump(
            summary,
            f,
            indent=2,
            default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None,
        )
