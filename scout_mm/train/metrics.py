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
