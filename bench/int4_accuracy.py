"""Model-level accuracy of Int4 weights on a trained model: the shipped tiny demo model in float vs RTN / GPTQ
Int4 (default skip list, and with an Int4 LM head), scored on the held-out synthetic documents.

    python bench/int4_accuracy.py [--docs 600] [--group-sizes 32,64] [--device cpu|cuda] [--out FILE.md]

Reports per variant: held-out answer accuracy (teacher-forced exact answers, as `scout_mm.train.evaluate`),
answer-token loss and perplexity, and the relative L2 error of the answer-position logits to the float model.
Runs on the CPU (the Int4 modules then use the PyTorch references) or on CUDA (the Triton kernels).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import time

import torch

from scout_mm import Processor, ScoutForConditionalGeneration
from scout_mm.config import write_text_atomically
from scout_mm.quant import QuantConfig, calibration_set, quantize_model
from scout_mm.quant.format import default_skip
from scout_mm.train.data import IGNORE_INDEX
from scout_mm.train.evaluate import answer_accuracy, heldout_examples, model_forward, pack_examples

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scout_mm", "assets", "tiny")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=TINY)
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--group-sizes", default="128,32", help="comma-separated group sizes to try")
    parser.add_argument("--calibration", type=int, default=32, help="GPTQ calibration samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base = ScoutForConditionalGeneration.from_pretrained(args.model, dtype=dtype, device=args.device).eval()
    processor = Processor.from_config(base.config, tokenizer_path=args.model)
    examples = heldout_examples(processor, args.docs)
    batches = pack_examples(examples, max(len(e.ids) for e in examples), processor)
    calibration = calibration_set(processor, args.calibration)

    def evaluate(model):
        answer_logits = []
        run = model_forward(model)

        def forward(batch):
            out = run(batch)
            answer = batch.labels[:, 1:] != IGNORE_INDEX
            answer_logits.append(out.logits[:, :-1][answer].float().cpu())
            return out

        with torch.no_grad():
            report = answer_accuracy(forward, batches, args.device)
        return report, torch.cat(answer_logits)

    rows, summaries = [], []
    t0 = time.perf_counter()
    ref_report, ref_logits = evaluate(base)
    rows.append((f"float ({str(dtype).removeprefix('torch.')})", ref_report, 0.0))
    for group in [int(g) for g in args.group_sizes.split(",")]:
        for method in ("rtn", "gptq"):
            for lm_head in (False, True):
                cfg = QuantConfig(
                    group_size=group, method=method, skip=default_skip(quantize_lm_head=lm_head)
                )
                model = quantize_model(copy.deepcopy(base), cfg, calibration if method == "gptq" else None)
                report, logits = evaluate(model)
                err = float((logits - ref_logits).norm() / ref_logits.norm())
                name = f"Int4 {method.upper()} g{group}" + (" + Int4 LM head" if lm_head else "")
                rows.append((name, report, err))
                summaries.append(f"- {name}: {model.quant_report.summary()}")
                print(
                    f"{name}: accuracy {report['accuracy']:.3f} loss {report['loss']:.4f} logit err {err:.4f}"
                )
    elapsed = time.perf_counter() - t0

    tasks = sorted(k.split("/", 1)[1] for k in ref_report if k.startswith("accuracy/"))
    lines = [
        f"Model `{os.path.relpath(args.model)}`, {args.docs} held-out documents, device {args.device}"
        f" ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU, PyTorch references'}),"
        f" torch {torch.__version__}, {datetime.date.today()}, {elapsed:.0f} s.",
        "",
        "| weights | accuracy | answer loss | perplexity | logit rel. err | " + " | ".join(tasks) + " |",
        "|---|---|---|---|---|" + "---|" * len(tasks),
    ]
    for name, report, err in rows:
        per_task = " | ".join(f"{100 * report[f'accuracy/{t}']:.1f}" for t in tasks)
        lines.append(
            f"| {name} | {100 * report['accuracy']:.1f}% | {report['loss']:.4f} | {math.exp(report['loss']):.4f}"
            f" | {err:.4f} | {per_task} |"
        )
    lines += [
        "",
        f"GPTQ calibration: {len(calibration)} samples of `calibration_set`, "
        f"{sum(c['input_ids'].shape[1] for c in calibration)} tokens. How each matrix was quantized:",
        *summaries,
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text_atomically(args.out, text + "\n")


if __name__ == "__main__":
    main()
