"""Training metrics: model FLOPs (for MFU), the logger (stdout + tqdm, TensorBoard, a jsonl file) and the
training-curve plot."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from scout_mm.config import ScoutConfig
from scout_mm.model import count_parameters

# Dense bf16 tensor-core peaks (TFLOP/s) by GPU name; override with train.peak_tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_tflops(override: float | None = None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


class FlopCounter:
    """Training FLOPs (forward + backward = 3x forward) of a packed batch, counting every position.

    Text: ``6 * active matmul parameters`` per token (routed experts at top_k / n_experts, no embedding)
    plus attention ``12 * heads * head_dim * keys`` per token and layer, where a chunked (RoPE) layer sees
    about ``min(chunk, seq) / 2`` keys and a global (NoPE) layer ``seq / 2``. Vision: ``6 * parameters`` per
    patch token plus full attention over each tile; the adapter and projector, which run on a quarter of
    the tokens, are counted as if they ran on all (a small overestimate).
    """

    def __init__(self, config: ScoutConfig):
        self.config = config
        counts = count_parameters(config)
        self.text_params = counts["active"] - counts["vision"]
        self.vision_params = counts["vision"]

    def text_flops(self, rows: int, seq_len: int) -> float:
        t = self.config.text
        per_token = 6.0 * self.text_params
        for layer in range(t.num_hidden_layers):
            span = min(t.attention_chunk_size or seq_len, seq_len) if t.uses_rope(layer) else seq_len
            per_token += 12.0 * t.num_attention_heads * t.head_dim * span / 2
        return per_token * rows * seq_len

    def vision_flops(self, n_tiles: int) -> float:
        v = self.config.vision
        if v is None or n_tiles == 0:
            return 0.0
        tokens = (v.image_size // v.patch_size) ** 2 + 1  # patches + class token
        per_tile = (
            6.0 * self.vision_params * tokens + 12.0 * v.hidden_size * tokens * tokens * v.num_hidden_layers
        )
        return per_tile * n_tiles

    def __call__(self, rows: int, seq_len: int, n_tiles: int) -> float:
        return self.text_flops(rows, seq_len) + self.vision_flops(n_tiles)


class Logger:
    """Rank 0 writes log lines (above a tqdm bar), TensorBoard scalars/histograms and ``metrics.jsonl``."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:
                self.print("tensorboard is not installed: logging to stdout and metrics.jsonl only")
        from tqdm.auto import tqdm

        # A progress bar on a terminal; in log files the log lines (which carry the step) are enough.
        if sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def set_total(self, total_steps: int) -> None:
        if self.bar is not None:
            self.bar.total = total_steps
            self.bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def log(self, step: int, scalars: dict[str, float], kind: str = "train", histograms=None) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **scalars}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            for key, values in (histograms or {}).items():
                self.writer.add_histogram(f"{kind}/{key}", values, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def expert_histogram(load: torch.Tensor) -> torch.Tensor:
    """(layers, experts) counts -> one value per (layer, expert): the expert's share of its layer's load,
    for TensorBoard's histogram (uniform routing puts everything at 1 / n_experts)."""
    return (load.float() / load.sum(-1, keepdim=True).clamp(min=1)).flatten()


def plot_curve(metrics_path: str, png_path: str, title: str = "") -> None:
    """Training loss (and held-out loss / answer accuracy, when logged) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = [], []
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            (train if record["kind"] == "train" else evals if record["kind"] == "eval" else []).append(record)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["loss"] for r in evals],
            "o-",
            label="held-out loss",
            color="tab:orange",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if evals and "accuracy" in evals[0]:
        acc = ax.twinx()
        acc.plot(
            [r["step"] for r in evals],
            [100 * r["accuracy"] for r in evals],
            "s-",
            color="tab:green",
            label="held-out answer accuracy",
        )
        acc.set_ylabel("held-out answer accuracy (%)")
        acc.set_ylim(0, 100)
        h2, l2 = acc.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- profiling
# Kernel name patterns -> category, first match wins (Triton kernels appear under their function names).
KERNEL_CATEGORIES = [
    (
        "attention",
        ("_fwd_kernel", "_bwd_dq", "_bwd_dkdv", "_bwd_delta", "flash", "fmha", "sdpa", "attn", "cudnn"),
    ),
    (
        "moe experts",
        ("_route_kernel", "_gate_up_kernel", "_rows_gemm", "_combine_kernel", "_down_bwd", "_expert_grad"),
    ),
    ("dense GEMM", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_", "ampere_")),
    ("optimizer", ("multi_tensor", "adam", "fused_adam")),
    ("communication", ("nccl",)),
    ("copies / memset", ("memcpy", "memset", "copy", "catarray", "cat_", "fill")),
]


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p in lowered for p in patterns):
            return category
    return "elementwise / reductions / other"


class StepProfiler:
    """Profiles optimiser steps ``first..last`` (1-based, inclusive): ``torch.profiler`` for the kernels, and
    CUDA events at phase boundaries (data, forward, backward, optimiser step, loop bookkeeping) for where
    the GPU timeline goes. Writes ``profile.txt`` (summary, phases, kernel time by category, top kernels)
    into ``output_dir``. On CPU the phases are host times and the table lists operators (self CPU time).

    Use: ``begin_step(step)`` before a step's micro-batches, ``mark(phase)`` at the end of each phase,
    ``end_step(step)`` after the step. No cost outside the window or when ``steps`` is None.
    """

    def __init__(self, steps, output_dir: str, device, peak: float | None = None):
        self.enabled = steps is not None
        self.cuda = device.type == "cuda"
        if self.enabled and not (
            len(steps) == 2 and all(isinstance(s, int) for s in steps) and 1 <= steps[0] <= steps[1]
        ):
            raise ValueError(f"train.profile_steps={steps}; expected [first, last] with 1 <= first <= last")
        self.first, self.last = steps if self.enabled else (0, 0)
        self.output_dir, self.peak = output_dir, peak
        self.active = False
        self.path = os.path.join(output_dir, "profile.txt")

    def begin_step(self, step: int) -> None:
        if self.active:
            self._mark("other")  # logging, eval, checkpoint work since the previous step
        if not self.enabled or step != self.first:
            return
        from torch.profiler import ProfilerActivity, profile

        self._sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.marks: list[tuple[str, object]] = []
        self.flops = 0.0
        self.active = True
        self.wall_start = time.perf_counter()
        self._mark("start")

    def mark(self, phase: str) -> None:
        if self.active:
            self._mark(phase)

    def add_flops(self, flops: float) -> None:
        if self.active:
            self.flops += flops

    def _mark(self, phase: str) -> None:
        with torch.profiler.record_function(f"{_MARK}{phase}"):  # a point on the profiler's timeline
            pass
        if self.cuda:
            stamp = torch.cuda.Event(enable_timing=True)
            stamp.record()
        else:
            stamp = time.perf_counter()
        self.marks.append((phase, stamp))

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def end_step(self, step: int) -> str | None:
        """Returns the report when the window closed at this step (else None)."""
        if not self.active or step != self.last:
            return None
        self._mark("other")
        self._sync()
        wall = time.perf_counter() - self.wall_start
        self.profiler.__exit__(None, None, None)
        self.active = False
        report = self._report(wall, self.last - self.first + 1)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(report)
        return report

    def _report(self, wall: float, steps: int) -> str:
        phases: dict[str, float] = {}  # ms
        for (_, previous), (phase, stamp) in zip(self.marks, self.marks[1:]):
            ms = previous.elapsed_time(stamp) if self.cuda else (stamp - previous) * 1e3
            phases[phase] = phases.get(phase, 0.0) + ms
        kernels, intervals = {}, []  # name -> [microseconds, count]
        events = self.profiler.events()
        try:
            by_op = _kernel_time_by_phase_and_op(events) if self.cuda else {}
        except Exception as e:  # an attribution problem must not end the training run
            by_op = {("(attribution failed)", repr(e)): [0.0, 0]}
        for event in events:
            if self.cuda:
                if event.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                duration = event.time_range.end - event.time_range.start
                intervals.append((event.time_range.start, event.time_range.end))
            else:
                duration = event.self_cpu_time_total
            entry = kernels.setdefault(event.name, [0.0, 0])
            entry[0] += duration
            entry[1] += 1
        device = torch.cuda.get_device_name() if self.cuda else "CPU"
        lines = [
            f"profiled steps {self.first}-{self.last} ({steps} steps) on {device}",
            f"wall time per step: {wall * 1e3 / steps:.1f} ms",
        ]
        if intervals:
            busy = _union_length(intervals) / 1e6  # seconds
            lines.append(
                f"GPU busy (union of kernel intervals, all streams): {busy * 1e3 / steps:.1f} ms per step "
                f"= {100 * busy / wall:.1f}% of the wall time"
            )
        if self.flops and self.peak:
            achieved = self.flops / wall / 1e12
            lines.append(
                f"model FLOPs {self.flops / steps / 1e12:.2f} TFLOP per step: {achieved:.1f} TFLOP/s = "
                f"{100 * achieved / self.peak:.1f}% MFU over the window"
                + (
                    f" ({100 * self.flops / busy / 1e12 / self.peak:.1f}% of GPU-busy time)"
                    if intervals
                    else ""
                )
            )
        what = "GPU timeline (CUDA events on the compute stream)" if self.cuda else "host time"
        lines += [
            "",
            f"Phases, {what}; time the GPU idles waiting for the host counts in the phase the host was in:",
            "| phase | ms per step | share |",
            "|---|---|---|",
        ]
        total = sum(phases.values()) or 1.0
        for phase, ms in phases.items():
            lines.append(f"| {phase} | {ms / steps:.1f} | {100 * ms / total:.1f}% |")
        categories: dict[str, list] = {}
        for name, (us, count) in kernels.items():
            c = categories.setdefault(kernel_category(name), [0.0, 0])
            c[0] += us
            c[1] += count
        kernel_total = sum(us for us, _ in kernels.values()) or 1.0
        unit = "kernel" if self.cuda else "operator (self CPU)"
        lines += [
            "",
            f"{unit} time by category (sums of durations; overlapping streams count twice):",
            "| category | ms per step | calls per step | share |",
            "|---|---|---|---|",
        ]
        for category, (us, count) in sorted(categories.items(), key=lambda kv: -kv[1][0]):
            lines.append(
                f"| {category} | {us / 1e3 / steps:.1f} | {count / steps:.0f} | {100 * us / kernel_total:.1f}% |"
            )
        if by_op:
            lines += [
                "",
                "Kernel time by phase and the operator that launched it (top 30; the phase is the one the host "
                "was in when it launched the kernel):",
                "| phase | operator | kernel ms per step | kernels per step |",
                "|---|---|---|---|",
            ]
            for (phase, op), (us, count) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:30]:
                lines.append(f"| {phase} | `{op}` | {us / 1e3 / steps:.2f} | {count / steps:.0f} |")
        lines += [
            "",
            f"Top {unit}s:",
            "| name | category | ms per step | calls per step | mean us |",
            "|---|---|---|---|---|",
        ]
        for name, (us, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:30]:
            short = name if len(name) <= 200 else name[:197] + "..."
            lines.append(
                f"| `{short}` | {kernel_category(name)} | {us / 1e3 / steps:.2f} | {count / steps:.0f} | "
                f"{us / count:.1f} |"
            )
        return "\n".join(lines) + "\n"


_MARK = "scout_phase_end:"


def _kernel_time_by_phase_and_op(events) -> dict:
    """{(phase, launching CPU operator): [kernel microseconds, kernel count]}: a CPU operator belongs to the
    phase of the first phase mark after its start."""
    import bisect

    marks = sorted((e.time_range.start, e.name[len(_MARK) :]) for e in events if e.name.startswith(_MARK))
    starts = [t for t, _ in marks]
    out: dict = {}
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU or not event.kernels:
            continue
        i = bisect.bisect_left(starts, event.time_range.start)
        phase = marks[i][1] if i < len(marks) else "other"
        entry = out.setdefault((phase, event.name), [0.0, 0])
        entry[0] += sum(k.duration for k in event.kernels)
        entry[1] += len(event.kernels)
    return out


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total
