"""How long GPTQ takes on Scout-size decoder layers, and its peak GPU memory (no Scout weights needed).

Builds the ``scout-17b-16e`` preset with ``--layers`` decoder layers (random bf16 weights on the GPU, the vision
tower included but skipped by the default skip list), then times ``quantize_model`` with RTN and with GPTQ on
random-token calibration sequences, and prints per-layer seconds and how each matrix was quantized. Random
tokens route unlike real text, so the row counts per expert are only indicative; the time per layer is what the
full model's ``scripts/quantize.py --method gptq`` pays 48 times.

    PYTHONPATH=$PWD python bench/gptq_scout_layers.py --layers 2 --samples 16 --seq-len 2048
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from scout_mm import ScoutConfig, ScoutForConditionalGeneration
from scout_mm.quant import CalibrationWarning, QuantConfig, quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    device = torch.device("cuda")
    config = ScoutConfig.from_preset("scout-17b-16e", num_hidden_layers=args.layers)
    torch.manual_seed(0)
    start = time.perf_counter()
    torch.set_default_dtype(
        torch.bfloat16
    )  # built in bf16 directly: an fp32 copy would need twice the memory
    with torch.device(device):
        model = ScoutForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    torch.cuda.synchronize()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {args.layers} Scout layers ({n_params / 1e9:.2f}B parameters with embeddings, LM head and vision "
          f"tower) in {time.perf_counter() - start:.1f} s on {torch.cuda.get_device_name()}")  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    calibration = [
        # ids below 200000: Llama 4's special tokens (the image token among them) start there
        {"input_ids": torch.randint(0, 200_000, (1, args.seq_len), generator=generator)}
        for _ in range(args.samples)
    ]
    tokens = args.samples * args.seq_len
    for method, act_order in (("rtn", True), ("gptq", True), ("gptq", False)):
        cfg = QuantConfig(method=method, gptq_act_order=act_order)
        copy_ = copy.deepcopy(model)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            quantized = quantize_model(copy_, cfg, calibration if method == "gptq" else None)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        name = method.upper() + ("" if method == "rtn" else " act order" if act_order else " natural order")
        print(f"{name}: {seconds:.1f} s = {seconds / args.layers:.1f} s per layer ({tokens} calibration tokens), "
              f"peak {peak:.1f} GiB above the model; {quantized.quant_report.summary()}")  # fmt: skip
        del copy_, quantized
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
